"""The CPU kernels the fast path may pick: linear layers y = x Wᵀ + b, GEGLU, and attention
over long key sequences -- each either PyTorch's own or oneDNN's, whichever `autotune` measured
faster on this machine for this shape. The modules of minip2p/fast/__init__.py call them once
`install` has put them in a model; the reference model never does.

PyTorch sends an fp32 `nn.Linear` on the CPU to MKL's sgemm. PyTorch also ships oneDNN (it runs
its convolutions), and registers oneDNN's matmul for its compiler's CPU backend as
`torch.ops.mkldnn._linear_pointwise`, which can also fuse an activation or a product into the
matmul (`geglu` below). Which is faster depends on the machine (CPU model, PyTorch build,
threads): on some CPUs oneDNN wins clearly at the UNet's shapes, on others it loses
(`python -m tools.bench_kernels` times both; figures in tools/README.md). So the choice is
measured, per shape (fast/autotune.py).

Convolutions: oneDNN wants a weight in a blocked layout of its own and, handed PyTorch's plain
one, reorders it on every call -- a cost that does not shrink with the batch and, at the 16² and
8² levels of SD's UNet, exceeds the convolution itself. `conv` can instead pack the weight once
(`pack`: the blocked copy becomes the layer's only copy, fast/__init__.py's `FastConv2d`) and run
oneDNN's convolution on it, where the tuner measured that faster for the layer's first shape.

The candidates run in fp32 or bf16 (oneDNN's bf16 matmul on AMX/AVX512-BF16, fast/precision.py);
that op has no backward (its inputs get no gradient), so it is a candidate only where autograd
is off; everything else -- training, null-text inversion's gradient steps, GPU, fp16 -- takes
PyTorch's `F.linear`, as a model without the fast path does. tests/test_fast.py and tests/test_autotune.py prove
every candidate gives the explicit path's outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autotune import tuner

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def tune_rows(n: int, cin: int, cout: int) -> int:
    """Rows of the real input the tuner times a linear candidate on: about 0.5 GFLOP,
    at least 256 rows (or all of them) so the kernel runs at its large-matrix speed."""
    rows = 256
    while rows < 2048 and 2 * rows * cin * cout < 5e8:
        rows *= 2
    return min(n, rows)


def _dnn(x, w, b, attr="none", algorithm=""):
    """oneDNN's x Wᵀ + b, with `attr` ("gelu": its exact erf algorithm "none") fused after it."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], algorithm)


def onednn_ok(x: torch.Tensor) -> bool:
    """May this call go to oneDNN? CPU, fp32 or bf16, no autograd (its op has no backward)."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_grad_enabled())


def _key(x: torch.Tensor, *shape) -> tuple:
    """The tuner's shape key: bf16 sites are measured apart from fp32 ones (the same names)."""
    return shape if x.dtype == torch.float32 else (*shape, "bf16")


def linear(layer: nn.Linear | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """layer(x) on tokens x: (..., in) -> (..., out), through oneDNN when `onednn_ok`.

    `layer` may also be a 1×1 `nn.Conv2d` (SD 1.x's proj_in/proj_out): on a token sequence it is
    the same linear map, with its weight (out, in, 1, 1) read as (out, in)."""
    w, b = layer.weight.flatten(1), layer.bias                        # (out, in): a view
    if onednn_ok(x):
        def candidates():                                             # timed on a slice
            xs = x.reshape(-1, w.shape[1])
            xs = xs[:tune_rows(len(xs), *w.shape[::-1])]
            return {"torch": lambda: F.linear(xs, w, b), "onednn": lambda: _dnn(xs, w, b)}
        shape = _key(x, x.numel() // w.shape[1], *w.shape[::-1])        # (tokens, in, out)
        if tuner().pick("linear", shape, candidates) == "onednn":
            return _dnn(x, w, b)
    return F.linear(x, w, b)


def geglu(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """GEGLU (Shazeer 2020): [a, g] = x Wᵀ + b, out = a · GELU(g). x: (..., in) -> (..., out/2).

    The oneDNN candidate is two matmuls with the GELU and the product fused into them (no
    (…, 2·inner) tensor, no separate GELU or multiply pass)."""
    if onednn_ok(x):
        def candidates():
            xs = x.reshape(-1, proj.in_features)
            xs = xs[:tune_rows(len(xs), proj.in_features, proj.out_features)]
            return {"torch": lambda: _geglu_torch(proj, xs),
                    "onednn": lambda: _geglu_dnn(proj, xs)}
        shape = _key(x, x.numel() // proj.in_features, proj.in_features, proj.out_features)
        if tuner().pick("geglu", shape, candidates) == "onednn":
            return _geglu_dnn(proj, x)
    return _geglu_torch(proj, x)


def _geglu_torch(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    a, g = linear(proj, x).chunk(2, dim=-1)
    return a * F.gelu(g)


def _geglu_dnn(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    inner = proj.out_features // 2
    w, b = proj.weight, proj.bias
    wa, wg = w[:inner], w[inner:]                                     # row blocks: views
    ba, bg = (None, None) if b is None else (b[:inner], b[inner:])
    gate = _dnn(x, wg, bg, "gelu", "none")                                  # GELU(x W_gᵀ + b_g)
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, wa, ba, "mul")     # (x W_aᵀ + b_a)·gate


def conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for a `FastConv2d`: x (b, c_in, h, w) -> (b, c_out, h', w'), on its packed
    weight once the tuner picked "packed" at the layer's first call (where `onednn_ok`).

    Packing is decided once per layer: after it the layer keeps running packed (other shapes too:
    oneDNN reorders nothing as long as its layout fits, which it does for any batch here). Under
    autograd a packed layer computes with a temporary plain copy of its weight (`F.conv2d`'s
    backward reaches x); a weight that wants a gradient itself (training) is never packed."""
    packed = layer.__dict__.get("packed")
    if onednn_ok(x) and x.dtype == layer.dtype:
        if packed is None and not layer.weight.requires_grad:
            trial = {}                                 # the packed weight timed, if timed

            def candidates():
                trial["w"] = pack(layer.weight, layer, x.shape)
                return {"torch": lambda: _conv_torch(layer, x, layer.weight),
                        "packed": lambda: _conv_dnn(layer, x, trial["w"])}
            shape = _key(x, *x.shape, layer.out_channels, layer.kernel_size[0], layer.stride[0])
            if tuner().pick("conv", shape, candidates) == "packed":
                layer.pack(x.shape, trial.get("w"))
                packed = layer.__dict__["packed"]
        if packed is not None:
            return _conv_dnn(layer, x, packed)
    return _conv_torch(layer, x, packed.to_dense(layer.dtype) if packed is not None
                       else layer.weight)


def pack(w: torch.Tensor, layer: nn.Conv2d, shape) -> torch.Tensor:
    """`w` (c_out, c_in, k, k) in oneDNN's own layout for `layer`'s convolution on inputs of
    `shape`: an opaque (mkldnn) tensor; `.to_dense(dtype)` gives `w` back exactly."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        w.detach().to_mkldnn(), list(layer.padding), list(layer.stride), list(layer.dilation),
        layer.groups, list(shape))


def _conv_dnn(layer: nn.Conv2d, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    # the output comes channels-last (b, h, w, c in memory), and is passed on so: the next
    # packed convolution reads it without a reorder, and a transformer's (b, h·w, c) tokens are
    # then a view
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, layer.bias, list(layer.padding), list(layer.stride), list(layer.dilation),
        layer.groups, "none", [], "")


def _conv_torch(layer: nn.Conv2d, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         min_keys: int = 1024) -> torch.Tensor:
    """softmax(Q Kᵀ/√d + mask)·V without keeping M. q: (b, h, n, d); k, v: (b, h, m, d) ->
    (b, h, n, d); `mask` (additive, broadcast to (b, h, n, m)) goes to PyTorch's kernel.

    `F.scaled_dot_product_attention`, or, for long key sequences (m ≥ `min_keys`: the 64² and 32²
    self-attention at 512 px) on the oneDNN path when the tuner measured it faster on one
    image·head, `dnn_attention`'s query slices."""
    m = k.shape[2]
    if mask is None and onednn_ok(q) and m >= min_keys:
        def candidates():
            q1, k1, v1 = (t[:1, :1].contiguous() for t in (q, k, v))  # one image, one head
            return {"sdpa": lambda: F.scaled_dot_product_attention(q1, k1, v1),
                    "onednn": lambda: dnn_attention(q1, k1, v1)}
        if tuner().pick("attention", _key(q, q.shape[2], m, q.shape[3]), candidates) == "onednn":
            return dnn_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def dnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  chunk: int = 1 << 22) -> torch.Tensor:
    """Per (image, head), slices of queries through two oneDNN matmuls -- S = Q_i Kᵀ/√d,
    P = softmax(S), O_i = P V -- so only a slice of M of at most `chunk` entries (16 MB) exists at
    a time. Shapes as `sdpa`."""
    b, h, n, d = q.shape
    m = k.shape[2]
    qs = (q * d ** -0.5).reshape(b * h, n, d)                          # Q/√d, (b·h, n, d)
    ks = k.reshape(b * h, m, d).contiguous()                           # (b·h, m, d)
    vt = v.transpose(-1, -2).reshape(b * h, d, m).contiguous()         # Vᵀ, (b·h, d, m)
    out = q.new_empty(b * h, n, d)
    rows = max(1, min(n, chunk // m))                                  # queries per slice
    for j in range(b * h):
        for i in range(0, n, rows):
            s = _dnn(qs[j, i:i + rows], ks[j], None)                   # (rows, d) · (d, m)
            p = s.softmax(dim=-1, dtype=torch.float32).to(s.dtype)     # fp32 softmax (bf16)
            out[j, i:i + rows] = _dnn(p, vt[j], None)                  # (rows, m) · (m, d)
    return out.view(b, h, n, d)
