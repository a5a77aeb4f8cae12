"""Textual inversion on the toy model, end to end: draw 8 pictures of one object whose colour and
shape the toy never saw together (a small purple triangle: a held-out pair), learn `<my-thing>`
from them (minip2p/train/textual_inversion.py, template "a {}"), then generate
"a <my-thing> on the left" for 24 seeds and read each picture back with the toy analyser
(tools/toydata.py): the object is right when its colour and shape are the pictures' and its
centre lies in the left 40 % of the picture. Also "a <my-thing>" and, for comparison, the words
("a small purple triangle on the left"). Figures in tools/README.md.

    python -m tools.eval_learn_word                       # minutes on a laptop CPU
    python -m tools.eval_learn_word --steps 800 --lr 5e-2 --batch 4 --vectors 1 --sheet

The learning resumes from its checkpoint in OUT_DIR if killed (and a finished one is reused:
only the prompts run again); `--sheet` writes each prompt's 24 pictures.
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


def learner_pictures(folder: Path) -> list[torch.Tensor]:
    from minip2p.real import images
    return [images.to_tensor(images.open_image(p))[0] for p in sorted(folder.glob("*.png"))]


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
    ap.add_argument("--vectors", type=int, default=2)
    ap.add_argument("--init", default="triangle")
    ap.add_argument("--template", action="append", default=None)
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--prompt", default="a <my-thing> on the left")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="default tools/out/learn-word/VECTORSv-STEPS-LR (the checkpoint's)")
    ap.add_argument("--sheet", action="store_true")
    ap.add_argument("--no-words", action="store_true", help="skip the prompt with the words")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = None if args.size == "none" else args.size
    args.out_dir = args.out_dir or OUT / f"{args.vectors}v-{args.steps}-{args.lr:g}"
    pics = args.out_dir / "pictures"
    draw_pictures(pics, args.color, args.shape, size, args.pictures, seed=1)
    model = load_model(None)
    p = ti.Params(token="<my-thing>", init=args.init, vectors=args.vectors, steps=args.steps,
                  lr=args.lr, batch=args.batch, templates=args.template or ["a {}"])
    t0 = time.process_time()
    w0 = time.time()
    ti.learn(model, p, pics, args.out_dir / "my-thing.safetensors")
    cpu, wall = time.process_time() - t0, time.time() - w0
    words = " ".join(w for w in (size, args.color, args.shape) if w)
    prompts = {"learned": args.prompt, "learned, no place": args.prompt.split(" on the ")[0],
               "the words": args.prompt.replace("<my-thing>", words)}
    areas = [analyse((x + 1) / 2)["area"] for x in learner_pictures(pics)]
    result = dict(object=words, steps=args.steps, lr=args.lr, batch=args.batch,
                  vectors=args.vectors, learn_cpu_s=round(cpu, 1), learn_wall_s=round(wall, 1),
                  pictures_area=[min(areas), max(areas)])
    for name, prompt in prompts.items():
        if name == "the words" and args.no_words:
            continue
        images = [generate(model, [prompt], seed=s, steps=args.sample_steps, progress=False)[0]
                  for s in range(args.seeds)]
        rows = [judge(im, args.color, args.shape) for im in images]
        result[name] = dict(prompt=prompt, right=sum(r["color"] and r["shape"] and r["left"]
                                                      for r in rows),
                            colour_and_shape=sum(r["color"] and r["shape"] for r in rows),
                            colour=sum(r["color"] for r in rows),
                            shape=sum(r["shape"] for r in rows),
                            left=sum(r["left"] for r in rows), of=len(rows),
                            median_area=float(np.median([r["area"] for r in rows])))
        if args.sheet:
            name = name.replace(" ", "-").replace(",", "")
            to_pil(torch.cat(images, -1)[None])[0].save(args.out_dir / f"sheet-{name}.png")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
