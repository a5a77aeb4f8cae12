"""Evaluate the toy ControlNet (weights/toy-controlnet): does the generation follow the hint's
outline while the prompt sets the colour? Measured with the toy analyser (tools/toydata.py).

Each case: a hint picture drawn by tools/toydata.py (a shape of some size at some place, in a
colour the prompt does NOT name), its Canny edges (minip2p/real/canny.py, 100 / 200) as the
hint, and a prompt "a [size] COLOUR SHAPE" with no position words (the hint says where). The
same seed is sampled with and without the net. Measures, over prompts × seeds:

    outline IoU   IoU of the generated object's mask with the hint picture's object mask
                  (both by toydata.analyse), with the net and without it
    colour        the generated object's colour is the prompt's (toydata.analyse)
    shape         the generated object's shape is the prompt's

Prints a markdown table; writes a contact sheet (each row: hint, without, with) to --sheet.

    python -m tools.eval_controlnet                      # weights/toy-controlnet, 24 × 2 cases
    python -m tools.eval_controlnet --seeds 1 --steps 20 # quicker
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from minip2p.conditioning import Control, conditioned
from minip2p.load import load_model
from minip2p.load.controlnet import load_controlnet
from minip2p.pipeline import decode, denoise, encode_text, initial_noise
from tools.toy_layout import ROOT
from tools.toydata import COLOR_NAMES, POSITIONS, SHAPES, SIZES, analyse, draw, iou
from tools.train_controlnet import hints_of

SHOWN_SIZES = [None, "big", "small"]


def cases(n: int = 24):
    """n (prompt, hint attributes) pairs: every shape, colour, size; the hint's shape placed
    left / right / top / bottom / middle / anywhere, drawn in another colour than the prompt's
    on a grey or coloured background."""
    out = []
    for k in range(n):
        s, c, z = k % 3, k % 8, SHOWN_SIZES[(k // 3) % 3]
        hint_colour, pos = (k + 3) % 8, (k % 5) + 1 if k % 6 else 0
        bg = -1 if k % 4 else (k + 5) % 8
        bg = -1 if bg in (c, hint_colour) else bg
        attrs = torch.tensor([hint_colour, s, SIZES.index(z), pos, bg, -1, -1])
        words = ["a"] + ([z] if z else []) + [COLOR_NAMES[c], SHAPES[s]]
        out.append((" ".join(words), attrs))
    return out


def hint_pictures(attrs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The hint pictures (n, 3, 64, 64) in [-1, 1], drawn from their own generator."""
    return draw(attrs, torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model, prompts, seeds, hints=None, net=None, steps=50, guidance=7.5, scale=1.0):
    """One picture per prompt from its seed, with the net and its hint (one per prompt) or,
    net None, without -> (n, 3, 64, 64) in [0, 1]."""
    m = conditioned(model, [Control(net, list(hints), scale)]) if net is not None else model
    z = torch.cat([initial_noise(model, s, 64, 64) for s in seeds])
    z = denoise(m, encode_text(model, prompts), encode_text(model, [""]), z, steps, guidance,
                progress=False)
    return decode(model, z)


def score(images, prompts, hint_masks):
    rows = []
    for im, prompt, want in zip(images, prompts, hint_masks):
        a = analyse(im)
        rows.append(dict(iou=iou(a["mask"], want), colour=a["color"] == prompt.split()[-2],
                         shape=a["shape"] == prompt.split()[-1]))
    return rows


def sheet(hints, without, with_, path: Path, columns: int = 4, px: int = 64):
    """Each case a strip hint | without | with; `columns` strips a row."""
    gap, n = 6, len(hints)
    strip = 3 * px + 2 * 2
    rows = -(-n // columns)
    im = Image.new("RGB", (columns * (strip + gap) + gap, rows * (px + gap) + gap + 14), "white")
    ImageDraw.Draw(im).text((gap, 2), "each: Canny hint | without the net | with it", fill=(0, 0, 0))
    for i, trio in enumerate(zip(hints, without, with_)):
        x0, y0 = gap + (i % columns) * (strip + gap), 14 + gap + (i // columns) * (px + gap)
        for j, p in enumerate(trio):
            a = (np.asarray(p.permute(1, 2, 0).clamp(0, 1)) * 255).round().astype(np.uint8)
            im.paste(Image.fromarray(a), (x0 + j * (px + 2), y0))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the base model (default: the shipped toy)")
    p.add_argument("--controlnet", default=str(ROOT / "weights" / "toy-controlnet"))
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (0, 1, …)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scale", type=float, default=1.0, help="the net's conditioning scale")
    p.add_argument("--sheet", default=str(ROOT / "tools" / "out" / "controlnet" / "sheet.png"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args.model)
    net = load_controlnet(args.controlnet, base=model)
    cs = cases(args.prompts)
    prompts = [c[0] for c in cs for _ in range(args.seeds)]
    seeds = [s for _ in cs for s in range(args.seeds)]
    pics = hint_pictures(torch.stack([c[1] for c in cs for _ in range(args.seeds)]))
    hints = hints_of(pics)
    masks = [analyse((x + 1) / 2)["mask"] for x in pics]
    without = generate(model, prompts, seeds, steps=args.steps, guidance=args.guidance)
    with_ = generate(model, prompts, seeds, hints, net, args.steps, args.guidance, args.scale)
    a, b = score(without, prompts, masks), score(with_, prompts, masks)
    n = len(prompts)

    def mean(rows, key, where=lambda i: True):
        v = [float(r[key]) for i, r in enumerate(rows) if where(i)]
        return np.mean(v), np.min(v), len(v)

    print(f"| measure ({len(cs)} prompts × {args.seeds} seeds = {n} cases, {args.steps} DDIM steps, "
          f"guidance {args.guidance}, scale {args.scale}) | without the net | with the net |")
    print("|---|---|---|")
    iw, iw_min, _ = mean(a, "iou")
    ic, ic_min, _ = mean(b, "iou")
    print(f"| outline IoU, mean (min) | {iw:.3f} ({iw_min:.3f}) | **{ic:.3f}** ({ic_min:.3f}) |")
    for z in SHOWN_SIZES:
        sel = lambda i, z=z: (z or "") == (prompts[i].split()[1] if len(prompts[i].split()) == 4 else "")  # noqa: E731
        if not any(sel(i) for i in range(n)):
            continue
        x, y = mean(a, "iou", sel), mean(b, "iou", sel)
        print(f"| outline IoU, size {z or 'unnamed'} ({x[2]} cases) | {x[0]:.3f} | {y[0]:.3f} |")
    print(f"| IoU ≥ 0.8 | {100 * np.mean([r['iou'] >= 0.8 for r in a]):.1f} % | "
          f"{100 * np.mean([r['iou'] >= 0.8 for r in b]):.1f} % |")
    for key, name in (("colour", "the prompt's colour"), ("shape", "the prompt's shape")):
        print(f"| {name} | {100 * mean(a, key)[0]:.1f} % | {100 * mean(b, key)[0]:.1f} % |")
    print(f"\nsheet: {sheet(hints, without, with_, Path(args.sheet))}; "
          f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
