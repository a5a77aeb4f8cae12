"""How far the picture moves from fp32 at another precision or with int8 weights: the same prompt,
seed and steps generated at each setting (each model loaded in turn, one held at a time), the
decoded images' PSNR against fp32's, and max |Δ| of the final latents.

    python -m tools.eval_precision --model SD15_FOLDER --size 512 --steps 10 --threads 2
    python -m tools.eval_precision --steps 50          (the toy model, 64 px)

The toy model's accuracy and cleanliness per setting are the evaluations' own `--clean … --dtype
… --weights …` (tools/judge.py); this tool is the distance at any shape, e.g. SD 1.5's.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from minip2p.load import load_model
from minip2p.pipeline import decode, generate
from minip2p.real.images import psnr

SETTINGS = [("fp32", "full"), ("bf16", "full"), ("bf16", "int8"), ("fp32", "int8")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the toy model)")
    ap.add_argument("--size", type=int, default=None, help="image side (the model's native)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1, help="images per setting (seeds 0 …)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", default="a painting of a squirrel eating a burger")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref, rows = None, []
    for dtype, weights in SETTINGS:
        t0 = time.perf_counter()
        model = load_model(args.model, dtype=dtype, weights=weights)
        z = torch.cat([generate(model, [args.prompt], seed, args.steps, height=args.size,
                                width=args.size, progress=False, return_latents=True)
                       for seed in range(args.seeds)])
        images = decode(model, z)
        secs = time.perf_counter() - t0
        if ref is None:
            ref = (z, images)
        p = [psnr(a, b) for a, b in zip(images, ref[1])]
        rows.append((dtype, weights, min(p), sum(p) / len(p), (z - ref[0]).abs().max().item(),
                     secs))
        print(f"{dtype} {weights}: PSNR {min(p):.2f} dB (min of {len(p)}), {secs:.0f} s",
              flush=True)
        del model
        gc.collect()
    print(f"\n{args.model or 'toy'}, {args.size or 'native'} px, {args.steps} DDIM steps, "
          f"{args.seeds} seed(s), prompt {args.prompt!r}\n")
    print("| precision | weights | PSNR vs fp32, min dB | mean dB | max abs Δ z_0 | s |")
    print("|---|---|---:|---:|---:|---:|")
    for d, w, lo, mean, dz, s in rows:
        print(f"| {d} | {w} | {lo:.2f} | {mean:.2f} | {dz:.3g} | {s:.0f} |")


if __name__ == "__main__":
    main()
