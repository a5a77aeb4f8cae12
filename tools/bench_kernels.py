#!/usr/bin/env python
"""The fast path's kernel candidates (minip2p/fast/kernels.py) side by side at full size, at the shapes of
the SD 1.5 UNet at 512 px (batch 4 = two prompts with guidance) -- what minip2p/fast/autotune.py
chooses between, per shape, on slices.

For each linear shape: GFLOP/s of `F.linear` (PyTorch's default, MKL sgemm) and of oneDNN's
matmul (`ops._dnn`, the oneDNN candidate of `ops.linear`), the best of --reps runs, and max|Δ| between their
outputs; then the fused GEGLU (`ops._geglu_dnn`) against chunk + GELU + multiply; then self-attention
at 64² and 32² (`F.scaled_dot_product_attention` against `ops.dnn_attention`'s oneDNN query slices).
Usage:
  python -m tools.bench_kernels --threads 2
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from minip2p.fast import kernels as ops
from tools.harness import best_of as best, set_threads

# (tokens, in, out): q/k/v/out and proj_in/out, GEGLU half, FF out -- at 64², 32², 16²
SHAPES = [(16384, 320, 320), (16384, 320, 1280), (16384, 1280, 320),
          (4096, 640, 640), (4096, 640, 2560), (4096, 2560, 640),
          (1024, 1280, 1280), (1024, 1280, 5120), (1024, 5120, 1280)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    set_threads(args.threads)
    if not ops.ONEDNN:
        sys.exit("error: this PyTorch build has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.reps}")
    print(f"{'tokens x in -> out':>24} {'F.linear':>10} {'oneDNN':>10} {'speed-up':>9} {'max|Δ|':>9}")
    total = {"mkl": 0.0, "dnn": 0.0}
    with torch.no_grad():
        for n, cin, cout in SHAPES:
            x = torch.randn(n, cin, generator=g)
            layer = nn.Linear(cin, cout)
            flop = 2 * n * cin * cout
            t_mkl = best(lambda: F.linear(x, layer.weight, layer.bias), args.reps)
            t_dnn = best(lambda: ops._dnn(x, layer.weight, layer.bias), args.reps)
            d = (ops._dnn(x, layer.weight, layer.bias) - layer(x)).abs().max().item()
            total["mkl"] += t_mkl
            total["dnn"] += t_dnn
            print(f"{f'{n} x {cin} -> {cout}':>24} {flop / t_mkl / 1e9:>7.0f} GF/s {flop / t_dnn / 1e9:>5.0f} "
                  f"GF/s {t_mkl / t_dnn:>8.2f}x {d:>9.1e}")
        print(f"{'all shapes, time':>24} {total['mkl']:>8.3f} s {total['dnn']:>8.3f} s "
              f"{total['mkl'] / total['dnn']:>8.2f}x")
        for n, dim in [(16384, 320), (4096, 640), (1024, 1280)]:
            x = torch.randn(n, dim, generator=g)
            proj = nn.Linear(dim, dim * 8)
            def plain():                                             # chunk + GELU + multiply
                a, gate = proj(x).chunk(2, dim=-1)
                return a * F.gelu(gate)
            t_ref = best(plain, args.reps)
            t_dnn = best(lambda: ops._geglu_dnn(proj, x), args.reps)
            d = (ops._geglu_dnn(proj, x) - plain()).abs().max().item()
            print(f"GEGLU {n} x {dim}: chunk+GELU+mul {t_ref * 1e3:.0f} ms, fused oneDNN "
                  f"{t_dnn * 1e3:.0f} ms ({t_ref / t_dnn:.2f}x), max|Δ| {d:.1e}")
        for side, dim in [(64, 320), (32, 640)]:                     # 8 heads, batch 4
            q, k, v = (torch.randn(4, 8, side * side, dim // 8, generator=g) for _ in range(3))
            t_ref = best(lambda: F.scaled_dot_product_attention(q, k, v), args.reps)
            t_dnn = best(lambda: ops.dnn_attention(q, k, v), args.reps)
            d = (ops.dnn_attention(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max()
            print(f"self-attention {side}x{side} (4, 8, {side * side}, {dim // 8}): SDPA "
                  f"{t_ref * 1e3:.0f} ms, oneDNN slices {t_dnn * 1e3:.0f} ms "
                  f"({t_ref / t_dnn:.2f}x), max|Δ| {d.item():.1e}")


if __name__ == "__main__":
    main()
