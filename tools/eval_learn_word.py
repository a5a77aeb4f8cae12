"""Textual inversion on the toy model, end to end: draw 8 pictures of one object whose colour and
shape the toy never saw together (a small purple triangle: a held-out pair), learn `<my-thing>`
from them (minip2p/train/textual_inversion.py, template "a {}"), then generate
"a <my-thing> on the left" for 24 seeds and read each picture back with the toy analyser
(tools/toydata.py): the object is right when its colour and shape are the pictures' and its
centre lies in the left 40 % of the picture.

    python -m tools.eval_learn_word                       # minutes on a laptop CPU
    python -m tools.eval_learn_word --steps 800 --lr 5e-2 --batch 4 --out-dir tools/out/learn-word

The learning resumes from its checkpoint in OUT_DIR if killed; `--sheet` writes the 24 pictures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minip2p.load import load_model
from minip2p.pipeline import generate, to_pil
from minip2p.train import textual_inversion as ti
from tools.toydata import COLOR_NAMES, SHAPES, SIZES, analyse, draw

OUT = Path(__file__).parent / "out" / "learn-word"


def draw_pictures(folder: Path, color: str, shape: str, size: str | None, n: int, seed: int):
    """n toy pictures of one object (random place, grey ground) as PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    attrs = torch.tensor([[COLOR_NAMES.index(color), SHAPES.index(shape), SIZES.index(size),
                           0, -1, -1, -1]] * n)
    x = draw(attrs, torch.Generator().manual_seed(seed))
    for i, im in enumerate(x):
        a = ((im.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(a).save(folder / f"{i}.png")


def judge(image, color: str, shape: str) -> dict:
    a = analyse(image)
    W = image.shape[-1]
    left = a["color"] is not None and a["center"][0] < 0.4 * W
    return dict(color=a["color"] == color, shape=a["shape"] == shape, left=bool(left),
                area=a["area"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--color", default="purple")
    ap.add_argument("--shape", default="triangle")
    ap.add_argument("--size", default="small", choices=["small", "big", "none"])
    ap.add_argument("--pictures", type=int, default=8)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=5e-2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vectors", type=int, default=1)
    ap.add_argument("--init", default="triangle")
    ap.add_argument("--template", action="append", default=None)
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--prompt", default="a <my-thing> on the left")
    ap.add_argument("--out-dir", type=Path, default=OUT)
    ap.add_argument("--sheet", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = None if args.size == "none" else args.size
    pics = args.out_dir / "pictures"
    draw_pictures(pics, args.color, args.shape, size, args.pictures, seed=1)
    model = load_model(None)
    p = ti.Params(token="<my-thing>", init=args.init, vectors=args.vectors, steps=args.steps,
                  lr=args.lr, batch=args.batch, templates=args.template or ["a {}"])
    t0 = time.process_time()
    w0 = time.time()
    ti.learn(model, p, pics, args.out_dir / "my-thing.safetensors")
    cpu, wall = time.process_time() - t0, time.time() - w0
    rows = []
    images = []
    for seed in range(args.seeds):
        im = generate(model, [args.prompt], seed=seed, steps=args.sample_steps, progress=False)[0]
        images.append(im)
        rows.append(judge(im, args.color, args.shape))
    ok = [r["color"] and r["shape"] and r["left"] for r in rows]
    result = dict(prompt=args.prompt, object=f"{args.size} {args.color} {args.shape}",
                  steps=args.steps, lr=args.lr, batch=args.batch, vectors=args.vectors,
                  learn_cpu_s=round(cpu, 1), learn_wall_s=round(wall, 1),
                  right=f"{sum(ok)}/{len(ok)}", colour=sum(r["color"] for r in rows),
                  shape=sum(r["shape"] for r in rows), left=sum(r["left"] for r in rows),
                  median_area=float(np.median([r["area"] for r in rows])))
    print(json.dumps(result))
    if args.sheet:
        sheet = torch.cat(images, -1)
        to_pil(sheet[None])[0].save(args.out_dir / "sheet.png")
    return result


if __name__ == "__main__":
    main()
