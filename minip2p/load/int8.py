"""8-bit weights (`load_model(weights="int8")`): per-output-channel, weight-only, symmetric int8
quantisation of the UNet's and the text encoder's linear and convolution layers, at load.

For a weight W with output channel o (a row of a linear layer, a filter of a convolution):

    s_o = max |W_o| / 127,   q_o = round(W_o / s_o) ∈ [−127, 127] (int8),   Ŵ_o = q_o · s_o

so every element is off by at most s_o / 2 (plus the compute dtype's rounding of Ŵ). The layer
keeps q (1 byte per weight) and s (one value per output channel, in the compute dtype); its
`weight` is Ŵ, dequantised at each use into a temporary of one layer, so the forward pass --
the reference path and the fast path's kernels alike -- is unchanged. Activations, biases and
norms stay in the compute dtype.

Folders are quantised tensor by tensor while the file is read (checkpoint.read_safetensors'
`convert`): the full-precision UNet never exists in memory, only one tensor of it at a time.
A single-file checkpoint is read whole, then quantised.

The VAE is left in the compute dtype: it is small (84M parameters at SD 1.x, a tenth of the
UNet) and its decoder writes the pixels directly, so it is where rounding shows first. A LoRA
is refused with int8 weights (it merges into weights that no longer exist at full precision),
and so is fp16 on a CPU. Picture quality against fp32 is measured, not assumed (tools/README.md,
"Precision and 8-bit weights").
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.unet import TokenConv

QMAX = 127


class Int8Weight:
    """Mixin for a linear or convolution layer whose weight is q (int8) · s (per output channel):
    the buffers `weight_q` and `weight_scale` replace the parameter `weight`."""

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q.to(self.weight_scale.dtype).mul_(self.weight_scale)  # one temporary


class Int8Linear(Int8Weight, nn.Linear):
    pass


class Int8Conv2d(Int8Weight, nn.Conv2d):
    pass


class Int8TokenConv(Int8Weight, TokenConv):
    pass


INT8 = {nn.Linear: Int8Linear, nn.Conv2d: Int8Conv2d, TokenConv: Int8TokenConv}


def quantize(w: torch.Tensor, dtype: torch.dtype, inplace: bool = False) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """W (out, …) -> (q int8, s of shape (out, 1, …) in `dtype`), as the module docstring.
    `inplace`: W may be overwritten (nothing else reads it), so no second fp32 copy is made."""
    w = w.float()
    lo, hi = w.flatten(1).aminmax(dim=1)                              # max |W_o| without |W|
    s = torch.maximum(-lo, hi).clamp_min(1e-12) / QMAX
    s = s.view(-1, *[1] * (w.dim() - 1))
    q = (w.div_(s) if inplace else w / s).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, s.to(dtype)


def prepare(module: nn.Module) -> set[str]:
    """Turn every linear and convolution layer of `module` (built on the meta device) into its
    int8 class, with meta buffers `weight_q`, `weight_scale` in place of `weight`; returns the
    state-dict names of the weights that are now quantised."""
    names = set()
    for prefix, layer in module.named_modules():
        cls = INT8.get(type(layer))
        if cls is None:
            continue
        w = layer._parameters.pop("weight")
        layer.__class__ = cls
        layer.register_buffer("weight_q", torch.empty(w.shape, dtype=torch.int8, device="meta"))
        layer.register_buffer("weight_scale", torch.empty(w.shape[0], *[1] * (w.dim() - 1),
                                                          device="meta"))
        names.add(f"{prefix}.weight" if prefix else "weight")
    return names


def converter(names: set[str], dtype: torch.dtype, keymap=None):
    """`convert(key, tensor)` for checkpoint.read_safetensors: a weight in `names` (after the
    component's `keymap` of file names) -> its q and s; any other floating tensor -> `dtype`."""
    def convert(key, t):
        mapped = next(iter(keymap({key: None})), None) if keymap else key
        if mapped in names:
            q, s = quantize(t, dtype, inplace=True)              # t: freshly read
            return {key + "_q": q, key + "_scale": s}
        return {key: t.to(dtype) if t.is_floating_point() else t}
    return convert


def quantize_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Quantise a built module in place (single files): layer by layer, each full-precision
    weight freed as its q and s replace it."""
    for _, layer in module.named_modules():
        cls = INT8.get(type(layer))
        if cls is None:
            continue
        q, s = quantize(layer._parameters.pop("weight").detach(), dtype, inplace=True)
        layer.__class__ = cls
        layer.register_buffer("weight_q", q)
        layer.register_buffer("weight_scale", s)
    return module


def is_int8(model) -> bool:
    return isinstance(model.unet.conv_in, Int8Weight)
