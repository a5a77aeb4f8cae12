"""Visii on the toy InstructPix2Pix model (weights/toy-instruct), end to end: learn an instruction
from ONE drawn pair (a red circle -> the same circle blue; minip2p/train/visii.py), apply it to 24
other red toy objects (squares, triangles and circles of every size, place and background), and
read each result back with the toy analyser (tools/toydata.py): right when the object turned blue
and kept its shape. For comparison the same 24 with the typed instruction, and with the init
phrase before learning.

    python -m tools.eval_visii                                   # minutes on a laptop CPU
    python -m tools.eval_visii --init "make it look like this" --steps 1000

The learning resumes from its checkpoint in OUT_DIR if killed; `--sheet` writes the pictures.
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
from minip2p.methods import instruct
from minip2p.pipeline import encode_text, to_pil
from minip2p.train import visii
from tools.toydata import COLOR_NAMES, SHAPES, analyse, draw

OUT = Path(__file__).parent / "out" / "visii"
MODEL = Path(__file__).resolve().parent.parent / "weights" / "toy-instruct"


def picture(color: str, shape: str, size: int, pos: int, bg: int, seed: int) -> Image.Image:
    """One toy picture; the same seed draws the same geometry whatever the colour."""
    a = torch.tensor([[COLOR_NAMES.index(color), SHAPES.index(shape), size, pos, bg, -1, -1]])
    x = draw(a, torch.Generator().manual_seed(seed))[0]
    return Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def test_set(n: int = 24) -> list[tuple]:
    """n red objects other than the training pair: shapes × sizes × places × grounds."""
    g = torch.Generator().manual_seed(7)
    cases = []
    grounds = [-1, COLOR_NAMES.index("white"), COLOR_NAMES.index("yellow"),
               COLOR_NAMES.index("green")]
    for i in range(n):
        shape = SHAPES[i % 3]
        size, pos = int(torch.randint(3, (1,), generator=g)), int(torch.randint(6, (1,),
                                                                               generator=g))
        cases.append(("red", shape, size, pos, grounds[i % len(grounds)], 100 + i))
    return cases


def judge(image, shape: str) -> dict:
    a = analyse(image)
    return dict(blue=a["color"] == "blue", shape=a["shape"] == shape)


def run(model, cases, cond, args) -> tuple[dict, list]:
    rows, images = [], []
    for c in cases:
        before = picture(*c)
        out = instruct.edit(model, before, "", seed=args.seed, steps=args.sample_steps,
                            progress=False, cond=cond)[0]
        rows.append(judge(out, c[1]))
        images.append(out)
    right = sum(r["blue"] and r["shape"] for r in rows)
    return dict(right=right, blue=sum(r["blue"] for r in rows),
                shape_kept=sum(r["shape"] for r in rows), of=len(rows)), images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--init", default="make it blue")
    ap.add_argument("--typed", default="make it blue", help="the typed instruction to compare")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--out-dir", type=Path, default=OUT)
    ap.add_argument("--sheet", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--learned-only", action="store_true", help="skip the two comparisons")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pair = ("circle", 2, 0, -1, 1)                    # a big circle, anywhere, grey ground
    picture("red", *pair).save(args.out_dir / "before.png")
    picture("blue", *pair).save(args.out_dir / "after.png")
    model = load_model(args.model)
    p = visii.Params(init=args.init, steps=args.steps, lr=args.lr, seed=args.seed)
    t0, w0 = time.process_time(), time.time()
    out = args.out_dir / f"instruction-{args.init.replace(' ', '-')}.safetensors"
    learned = visii.learn(model, p, args.out_dir / "before.png", args.out_dir / "after.png", out)
    result = dict(init=args.init, steps=args.steps, lr=args.lr,
                  learn_cpu_s=round(time.process_time() - t0, 1),
                  learn_wall_s=round(time.time() - w0, 1))
    cases = test_set(args.cases)
    conds = {"learned": learned, "init phrase, not learned": encode_text(model, [args.init]),
             f"typed {args.typed!r}": encode_text(model, [args.typed])}
    if args.learned_only:
        conds = {"learned": learned}
    for name, cond in conds.items():
        result[name], images = run(model, cases, cond, args)
        if args.sheet:
            befores = [torch.from_numpy(np.array(picture(*c))).permute(2, 0, 1).float() / 255
                       for c in cases]
            sheet = torch.cat([torch.cat(befores, -1), torch.cat(images, -1)], -2)
            to_pil(sheet[None])[0].save(args.out_dir / f"sheet-{name.split()[0]}.png")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
