"""The CPU kernels the fast path picks: linear layers y = x Wᵀ + b, and attention over long
key sequences.

PyTorch sends an fp32 `nn.Linear` on the CPU to MKL's sgemm. On the AMD EPYC (AVX-512) machines
this project is built on, that runs at about half the speed of oneDNN's matmul, which PyTorch
also ships (it is what runs its convolutions): at the UNet's shapes, 2 threads, about 130-190 vs
210-420 GFLOP/s (`python tools/bench_kernels.py`). So the fast path calls oneDNN directly through
`torch.ops.mkldnn._linear_pointwise`, the oneDNN linear op PyTorch registers for its compiler's
CPU backend (it can also fuse an activation or a product into the matmul: `geglu` below).

That op has no backward (its inputs get no gradient), so it is used only where autograd is
off; everything else -- the explicit path, training, null-text inversion's gradient steps, GPU,
fp16 -- takes `nn.Linear` unchanged. `tests/test_fast.py` proves both give the same outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_ok(x: torch.Tensor, fast: bool) -> bool:
    """May this call go to oneDNN? CPU, fp32, no autograd, fast path asked for."""
    return (fast and ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled())


def linear(layer: nn.Linear | nn.Conv2d, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """layer(x) on tokens x: (..., in) -> (..., out), through oneDNN when `onednn_ok`.

    `layer` may also be a 1×1 `nn.Conv2d` (SD 1.x's proj_in/proj_out): on a token sequence it is
    the same linear map, with its weight (out, in, 1, 1) read as (out, in)."""
    w = layer.weight.flatten(1)                                       # (out, in): a view
    if onednn_ok(x, fast):
        return torch.ops.mkldnn._linear_pointwise(x, w, layer.bias, "none", [], "")
    return F.linear(x, w, layer.bias)


def geglu(proj: nn.Linear, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """GEGLU (Shazeer 2020): [a, g] = x Wᵀ + b, out = a · GELU(g). x: (..., in) -> (..., out/2).

    The fast path runs it as two oneDNN matmuls with the GELU and the product fused into them
    (no (…, 2·inner) tensor, no separate GELU or multiply pass)."""
    if not onednn_ok(x, fast):
        a, g = proj(x).chunk(2, dim=-1)
        return a * F.gelu(g)
    inner = proj.out_features // 2
    w, b = proj.weight, proj.bias
    wa, wg = w[:inner], w[inner:]                                     # row blocks: views
    ba, bg = (None, None) if b is None else (b[:inner], b[inner:])
    gate = torch.ops.mkldnn._linear_pointwise(x, wg, bg, "gelu", [], "none")     # GELU(x W_gᵀ + b_g)
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, wa, ba, "mul")     # (x W_aᵀ + b_a)·gate


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fast: bool = False,
         mask: torch.Tensor | None = None, min_keys: int = 1024,
         chunk: int = 1 << 22) -> torch.Tensor:
    """softmax(Q Kᵀ/√d + mask)·V without keeping M. q: (b, h, n, d); k, v: (b, h, m, d) ->
    (b, h, n, d); `mask` (additive, broadcast to (b, h, n, m)) goes to PyTorch's kernel.

    `F.scaled_dot_product_attention`, except for long key sequences (m ≥ `min_keys`: the 64² and
    32² self-attention at 512 px) on the oneDNN path: there, per (image, head), slices of
    queries go through two oneDNN matmuls -- S = Q_i Kᵀ, P = softmax(S), O_i = P V -- so only a
    slice of M of at most `chunk` entries (16 MB) exists at a time. Measured against PyTorch's
    fused CPU kernel at 64² (4 × 8 heads × 4096 × 40): 470 vs 626 ms (`tools/bench_kernels.py`)."""
    b, h, n, d = q.shape
    m = k.shape[2]
    if mask is not None or not (onednn_ok(q, fast) and m >= min_keys):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    qs = (q * d ** -0.5).reshape(b * h, n, d)                          # Q/√d, (b·h, n, d)
    ks = k.reshape(b * h, m, d)                                        # (b·h, m, d)
    vt = v.transpose(-1, -2).reshape(b * h, d, m)                      # Vᵀ, (b·h, d, m)
    out = q.new_empty(b * h, n, d)
    rows = max(1, min(n, chunk // m))                                  # queries per slice
    for j in range(b * h):
        for i in range(0, n, rows):
            s = torch.ops.mkldnn._linear_pointwise(qs[j, i:i + rows], ks[j], None, "none", [], "")
            out[j, i:i + rows] = torch.ops.mkldnn._linear_pointwise(    # (rows, m) · (m, d)
                s.softmax(dim=-1), vt[j], None, "none", [], "")
    return out.view(b, h, n, d)
