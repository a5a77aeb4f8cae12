"""Does the toy InstructPix2Pix (weights/toy-instruct, tools/train_instruct.py) carry out its
instructions and keep the rest?

48 cases, the 13 instructions in turn, each on a picture DRAWN by the toy domain (toydata.draw,
seeds 10 000 + k): no training pair was drawn (they were all made by the toy model). The
captions are drawn afresh (seed 1 here), but the grammar is small: about half the cases' caption
and instruction also occur among the training captions (their pictures never do). Each case is
edited once (InstructPix2Pix, s_T 7.5, s_I 1.5, Euler ancestral) and both pictures are read by
the toy analyser (tools/make_instruct_pairs.read, toydata.analyse):

    carried out   the output's colour / shape is the instruction's; "make it big / small": the
                  object's area grows / shrinks by at least SIZE_AREA
    rest kept     every other attribute the same: colour and shape, the background, the place
                  (centre within MAX_SHIFT px), the size (area ratio in KEEP_AREA) for the
                  instructions that do not ask for it
    clean         tools/artifacts.py's judgement of the output (one object)

    python -m tools.eval_instruct                          # weights/toy-instruct, 20 steps
    python -m tools.eval_instruct --steps 100 --model DIR  # the official 100 steps, another model
    python -m tools.eval_instruct --case-seed 7 --picture-seed 20000   # 48 other cases

Writes a contact sheet (tools/out/sheets/instruct.png; --figure also into tools/figures/): each
drawn picture beside its edit, framed green when carried out with the rest kept.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

from tools import toydata
from tools.artifacts import artifacts
from tools.make_instruct_pairs import caption_of, instructions, judge_pair, read, source_for
from tools.sheets import contact_sheet

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).parent / "out" / "sheets"
FIGURES = Path(__file__).parent / "figures"


def cases(n: int = 48, seed: int = 1) -> list[tuple[dict, str, str, str]]:
    """[(source attributes, instruction, attribute, value)]: the instructions in turn."""
    rng, ins = random.Random(seed), instructions()
    out = []
    for k in range(n):
        text, attr, value = ins[k % len(ins)]
        out.append((source_for(attr, value, rng), text, attr, value))
    return out


def drawn(a: dict, seed: int) -> torch.Tensor:
    """The toy domain's drawing of source attributes -> (1, 3, 64, 64) in [-1, 1]."""
    row = torch.tensor([[toydata.COLOR_NAMES.index(a["color"]), toydata.SHAPES.index(a["shape"]),
                         toydata.SIZES.index(a["size"]), toydata.POSITIONS.index(a["pos"]),
                         toydata.COLOR_NAMES.index(a["bg"]) if a["bg"] else -1, -1, -1]])
    return toydata.draw(row, torch.Generator().manual_seed(seed))


def evaluate(model, n: int, steps: int, seed: int = 0, image_guidance: float = 1.5,
             progress=print, case_seed: int = 1, picture_seed: int = 10_000) -> tuple[dict, list]:
    from minip2p.methods.instruct import edit
    rows, sheet = [], []
    for k, (a, text, attr, value) in enumerate(cases(n, case_seed)):
        x = drawn(a, picture_seed + k)
        y = edit(model, x, text, seed=seed + k, steps=steps, image_guidance=image_guidance,
                 progress=False)[0]
        r0, r1 = read((x[0] + 1) / 2), read(y)
        v = judge_pair(r0, r1, attr, value)
        v["clean"] = artifacts(y, 1)["clean"]
        rows.append(dict(v, instruction=text, kind=attr, source=caption_of(a)))
        sheet.append(((x[0] + 1) / 2, y, v["done"] and v["kept"]))
        progress(f"{k + 1:2d}/{n} {caption_of(a):45s} {text:24s} done={v['done']} "
                 f"kept={v['kept']} clean={v['clean']} shift={v.get('shift')} "
                 f"ratio={v.get('ratio')}")
    return rows, sheet


def pct(xs) -> str:
    xs = list(xs)
    return f"{100 * sum(xs) / max(len(xs), 1):.1f} % ({sum(xs)}/{len(xs)})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights" / "toy-instruct"))
    p.add_argument("--cases", type=int, default=48)
    p.add_argument("--steps", type=int, default=20, help="Euler ancestral steps (20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-guidance", type=float, default=1.5, help="s_I (1.5)")
    p.add_argument("--case-seed", type=int, default=1,
                   help="seed of the case list (1; another: cases no checkpoint was picked on)")
    p.add_argument("--picture-seed", type=int, default=10_000,
                   help="the k-th case's picture is drawn from this seed + k (10000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--figure", action="store_true", help="also write tools/figures/instruct.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from minip2p.load import load_model
    model = load_model(args.model)
    t0 = time.time()
    rows, sheet = evaluate(model, args.cases, args.steps, args.seed, args.image_guidance,
                           case_seed=args.case_seed, picture_seed=args.picture_seed)
    took = time.time() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    paths = [contact_sheet(sheet, OUT / "instruct.png", columns=6)]
    if args.figure:
        paths.append(contact_sheet(sheet, FIGURES / "instruct.png", columns=6))
    print(f"\n| measure ({args.cases} cases, {args.steps} Euler-a steps, s_I "
          f"{args.image_guidance:g}, {took:.0f} s) | value |")
    print("|---|---|")
    print(f"| instruction carried out | {pct(r['done'] for r in rows)} |")
    print(f"| rest kept | {pct(r['kept'] for r in rows)} |")
    print(f"| both | {pct(r['done'] and r['kept'] for r in rows)} |")
    print(f"| clean | {pct(r['clean'] for r in rows)} |")
    for kind in ("color", "shape", "size"):
        sub = [r for r in rows if r["kind"] == kind]
        print(f"| {kind}: carried out / rest kept | {pct(r['done'] for r in sub)} / "
              f"{pct(r['kept'] for r in sub)} |")
    print("sheets: " + ", ".join(str(x) for x in paths))


if __name__ == "__main__":
    main()
