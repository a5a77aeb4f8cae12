"""The fast path: kernels picked by measurement on this machine (kernels.py, autotune.py),
installed on a loaded model from outside and switched off again. The reference model never needs
it and never imports it; tests prove a model with it installed gives the explicit path's outputs.

`install(model)` (what `load_model` does unless `fast=False`):

  - every projection of the UNet's spatial transformers -- proj_in/proj_out, attention's to_q,
    to_k, to_v, to_out.0, the feed-forward's GEGLU and output layer -- becomes an instance of a
    subclass that adds no state (the same parameters, the same state_dict keys) and whose forward
    is `kernels.linear` / `kernels.geglu`: y = x Wᵀ + b, a · GELU(g) on PyTorch's kernel or
    oneDNN's, whichever the tuner measured faster here for that shape; the feed-forward runs
    on at most FF_ROWS tokens at a time, so its (tokens, 4·dim) inner activations -- a UNet
    call's largest tensors at 512 px -- exist for one slice only (each token is independent);
  - each `Attention` of the UNet gets `fused = kernels.sdpa`: `attention()` computes
    softmax(QKᵀ/√d)·V through it wherever no controller wants the site (M never kept), and the
    UNet hands it to controllers that compute attention themselves as `site.run.fused`;
  - every convolution of the UNet's ResNet blocks (3×3, and the 1×1 shortcuts), down- and
    upsamplers becomes a `FastConv2d`: `kernels.conv`, which may pack its weight once into
    oneDNN's layout. The packed copy is then the layer's only copy (the parameter keeps its
    name, shape and dtype on the "meta" device, holding no memory); whatever reads `.weight` --
    a LoRA merge, `.to()`, a state_dict, `uninstall` -- gets the plain weight back first,
    exactly, and the layer packs again at its next call;
  - `model.fast = True`: `pipeline.decode` runs the VAE decoder in the memory layout the tuner
    picked.

`uninstall(model)` gives the plain modules back, `fused = None` and `model.fast = False`: the
reference path, every M formed, the tuner never asked. `switched(model, on)` does either for a
`with` block and then restores what was there.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..attention import Attention
from ..load.checkpoint import Model
from ..load.int8 import Int8Linear, Int8TokenConv, Int8Weight
from ..model.unet import GEGLU, FeedForward, TokenConv, Transformer2DModel
from . import kernels

FF_ROWS = 4096                 # tokens per feed-forward slice: one 64² image at 512 px


class FastLinear(nn.Linear):
    """nn.Linear, y = x Wᵀ + b on the kernel the tuner picked for this shape."""

    def forward(self, x):
        return kernels.linear(self, x)


class FastTokenConv(TokenConv):
    """SD 1.x's 1×1 proj_in/proj_out on tokens, as `FastLinear`."""

    def forward(self, x):
        return kernels.linear(self, x)


class FastGEGLU(GEGLU):
    """a · GELU(g), [a, g] = x Wᵀ + b: three passes, or two oneDNN matmuls with the GELU and the
    product fused into them, whichever the tuner picked."""

    def forward(self, x):
        return kernels.geglu(self.proj, x)


class FastConv2d(nn.Conv2d):
    """nn.Conv2d through `kernels.conv`; `packed` holds its weight in oneDNN's layout once
    the tuner chose that, and `weight` is then an empty meta-device placeholder."""

    packed = None

    @property
    def dtype(self) -> torch.dtype:
        return self._parameters["weight"].dtype

    def forward(self, x):
        return kernels.conv(self, x)

    def pack(self, shape, packed=None):
        """Make the packed weight (`packed`, or packed now for inputs of `shape`) the only copy."""
        w = self._parameters["weight"]
        self.packed = kernels.pack(w, self, shape) if packed is None else packed
        self._parameters["weight"] = nn.Parameter(torch.empty_like(w, device="meta"),
                                                  requires_grad=False)

    def unpack(self):
        """Give the layer its plain weight back (bit-exact) and drop the packed copy."""
        if self.packed is not None:
            w = self.packed.to_dense(self.dtype)
            self._parameters["weight"] = nn.Parameter(w, requires_grad=False)
            self.packed = None

    def __getattr__(self, name):
        if name == "weight":
            self.unpack()
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        self.unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.unpack()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kw):
        self.unpack()
        super()._load_from_state_dict(*args, **kw)


class FastFeedForward(FeedForward):
    """FF(x) = W₂ GEGLU(x) + b₂ on slices of FF_ROWS tokens, written into one output."""

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if len(flat) <= FF_ROWS:
            return super().forward(x)
        out = flat.new_empty(len(flat), self.net[2].out_features)
        for i in range(0, len(flat), FF_ROWS):
            out[i:i + FF_ROWS] = super().forward(flat[i:i + FF_ROWS])
        return out.view(*x.shape[:-1], -1)


class FastInt8Linear(Int8Weight, FastLinear):
    """`FastLinear` with int8 weights (load/int8.py): W dequantised, then the tuned kernel."""


class FastInt8TokenConv(Int8Weight, FastTokenConv):
    """`FastTokenConv` with int8 weights."""


FAST = {nn.Linear: FastLinear, TokenConv: FastTokenConv, GEGLU: FastGEGLU,
        FeedForward: FastFeedForward, Int8Linear: FastInt8Linear, Int8TokenConv: FastInt8TokenConv}
PLAIN = {fast: plain for plain, fast in FAST.items()}


def _recast(module: nn.Module, cls: type) -> nn.Module:
    """The same module -- its parameters, buffers, children and settings, shared -- as an
    instance of `cls`, a subclass (or the base) of its class that adds no state."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def _swap(unet: nn.Module, table: dict[type, type]):
    """Replace, inside every spatial transformer, each module whose exact class is in `table`."""
    for spatial in [m for m in unet.modules() if isinstance(m, Transformer2DModel)]:
        for parent in list(spatial.modules()):
            for name, child in list(parent.named_children()):
                if type(child) in table:
                    setattr(parent, name, _recast(child, table[type(child)]))


def _packable(m: nn.Module) -> bool:
    """A convolution worth packing: the 3×3 ones but the few-channel conv_in / conv_out, and
    the 1×1 shortcuts of ResNet blocks (proj_in/proj_out are `TokenConv`s: linear layers here)."""
    return (type(m) in (nn.Conv2d, FastConv2d) and m.kernel_size in ((3, 3), (1, 1))
            and m.groups == 1
            and min(m.in_channels, m.out_channels) >= 32)


def _swap_convs(unet: nn.Module, cls: type):
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if _packable(child) and type(child) is not cls:
                if isinstance(child, FastConv2d):
                    child.unpack()
                setattr(parent, name, _recast(child, cls))


def _set_fused(unet: nn.Module, fused):
    unet.fused = fused
    for m in unet.modules():
        if isinstance(m, Attention):
            m.fused = fused


def install(model):
    """Put the fast path into `model` (a load.Model, or a bare UNet: training); returns it.
    Installing twice is a no-op."""
    unet = model.unet if isinstance(model, Model) else model
    _swap(unet, FAST)
    _swap_convs(unet, FastConv2d)
    _set_fused(unet, kernels.sdpa)
    model.fast = True
    return model


def uninstall(model):
    """Give `model` its plain modules back: the reference path, no tuner asked; returns it."""
    unet = model.unet if isinstance(model, Model) else model
    _swap(unet, PLAIN)
    _swap_convs(unet, nn.Conv2d)
    _set_fused(unet, None)
    model.fast = False
    return model


def to_meta(module: nn.Module) -> nn.Module:
    """Drop `module`'s weights (moved to the meta device, nothing read from them): a packed
    convolution's packed copy is let go as it is, not unpacked first (one reorder a layer)."""
    for m in module.modules():
        if isinstance(m, FastConv2d):
            m.packed = None                # its `weight` is already the meta placeholder
    return module.to("meta")


@contextmanager
def switched(model, on: bool):
    """`with switched(model, False): …` runs the block on the reference path (`True`: the fast
    one), then leaves the model as it was."""
    was = model.fast
    (install if on else uninstall)(model)
    try:
        yield model
    finally:
        (install if was else uninstall)(model)
