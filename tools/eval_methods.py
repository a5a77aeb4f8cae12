"""MasaCtrl beside Prompt-to-Prompt Replace, and plug-and-play, on the toy model, measured with
the drawn domain's analyser (minip2p/toydata.py). Prints markdown tables.

    python -m tools.eval_methods                      # weights/toy, a few minutes on 2 CPU cores

size / shape changes  "a big C S" -> "a small C S" and "a C circle" -> "a C square" (and
                      square -> triangle), for 4 colours × seeds; each pair generated with
                      P2P Replace (τ_c 0.8, τ_s 0.4), MasaCtrl (S, L below) and without control.
                      Measured on the target: area ratio target/source (a size change should
                      move it: < 1 for big -> small), shape = the target's word, colour and
                      background kept, object-mask IoU with the source (layout kept).
plug-and-play         drawn pictures "a red circle" etc. (toydata.draw) translated to "a blue
                      square …": layout IoU of the target's mask with the picture's, new colour
                      and shape shown, against the plain target prompt from the inverted z_T.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from minip2p.load import load_model
from minip2p.methods import masactrl, p2p, pnp
from minip2p.pipeline import generate
from tools.toydata import Captions, analyse, draw, iou
from tools import clean_runs, judge

COLOURS = ["red", "blue", "green", "yellow"]
CHANGES = {"size (big -> small)": ("a big {c} {s}", "a small {c} {s}", ["circle", "square"]),
           "shape (circle -> square)": ("a {c} circle", "a {c} square", [None]),
           "shape (square -> triangle)": ("a {c} square", "a {c} triangle", [None])}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else float("nan")


def pct(xs):
    xs = [bool(x) for x in xs if x is not None]
    return f"{100 * np.mean(xs):.0f} %" if xs else "n/a"


def run_pair(model, method, prompts, seed, args):
    tok, steps = model.tokenizer, args.steps
    if method == "P2P Replace":
        control, _ = p2p.build(tok, prompts, steps, "replace", store=False)
    elif method == "MasaCtrl":
        control = masactrl.build(tok, prompts, steps, args.masa_step, args.masa_layer,
                                 len(model.unet.transformer_blocks()))
    else:
        control = None
    return generate(model, prompts, seed=seed, steps=steps, guidance=args.guidance,
                    control=control, progress=False)


def changes(model, args):
    print(f"\n### Size and shape changes ({len(COLOURS)} colours × {args.seeds} seeds per change, "
          f"{args.steps} steps, MasaCtrl S = {args.masa_step}, L = {args.masa_layer})\n")
    print("| change | method | area ratio tgt/src | target shape shown | colour kept | "
          "background kept | mask IoU with source |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, (src_t, tgt_t, shapes) in CHANGES.items():
        for method in ("no control", "P2P Replace", "MasaCtrl"):
            rows = []
            for c in COLOURS:
                for s in shapes:
                    prompts = [src_t.format(c=c, s=s), tgt_t.format(c=c, s=s)]
                    for seed in range(args.seeds):
                        src, tgt = (analyse(im) for im in run_pair(model, method, prompts, seed, args))
                        want = prompts[1].split()[-1]
                        rows.append(dict(
                            ratio=tgt["area"] / src["area"] if src["area"] else None,
                            shape=tgt["shape"] == want, colour=tgt["color"] == c,
                            bg=tgt["background"] == src["background"],
                            iou=iou(src["mask"], tgt["mask"])))
            print(f"| {name} | {method} | {mean([r['ratio'] for r in rows]):.2f} | "
                  f"{pct([r['shape'] for r in rows])} | {pct([r['colour'] for r in rows])} | "
                  f"{pct([r['bg'] for r in rows])} | {mean([r['iou'] for r in rows]):.2f} |")


def plug_and_play(model, args):
    caps = Captions(model.tokenizer)
    pairs = [("a red circle", "a blue square"), ("a green square", "a yellow circle"),
             ("a blue triangle", "a red square"), ("a yellow circle", "a purple triangle")]
    print(f"\n### Plug-and-play on drawn pictures ({len(pairs)} pictures × {args.seeds} draws, "
          f"{args.steps} steps, τ_f 0.8, τ_A 0.5, source prompt \"\")\n")
    print("| run | layout IoU with the picture | new colour shown | new shape shown |")
    print("|---|---:|---:|---:|")
    res = {"plug-and-play": [], "target prompt from the inverted z_T (τ_f = τ_A = 0)": []}
    for src_prompt, tgt_prompt in pairs:
        attrs = caps.attrs[caps.find(src_prompt)][None]
        for seed in range(args.seeds):
            x = draw(attrs, torch.Generator().manual_seed(seed))                 # (1, 3, 64, 64)
            src = analyse((x[0] + 1) / 2)
            for name, (f, a) in zip(res, ((0.8, 0.5), (0.0, 0.0))):
                out = pnp.edit(model, x, tgt_prompt, "", steps=args.steps, guidance=args.guidance,
                               features=f, attention=a, progress=False)
                tgt = analyse(out[1])
                res[name].append(dict(iou=iou(src["mask"], tgt["mask"]),
                                      colour=tgt["color"] == tgt_prompt.split()[1],
                                      shape=tgt["shape"] == tgt_prompt.split()[2]))
    for name, rows in res.items():
        print(f"| {name} | {mean([r['iou'] for r in rows]):.2f} | "
              f"{pct([r['colour'] for r in rows])} | {pct([r['shape'] for r in rows])} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the shipped toy model")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--masa-step", type=int, default=4)
    ap.add_argument("--masa-layer", type=int, default=None,
                    help="default: masactrl.default_layer(model) (the decoder's two finest "
                         "resolutions, 10 for SD 1.x, 3 for the toy model)")
    ap.add_argument("--threads", type=int, default=None)
    judge.add_args(ap, list(clean_runs.EDITS))
    args = ap.parse_args()
    if judge.maybe_run(args, clean_runs.EDITS):
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    if args.masa_layer is None:
        args.masa_layer = masactrl.default_layer(model.unet)
    t0 = time.time()
    changes(model, args)
    plug_and_play(model, args)
    print(f"\n({time.time() - t0:.0f} s, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
