"""The one place where attention is computed:  out = softmax(Q Kᵀ / √d) · V.

Every attention layer of the UNet (self-attention `attn1`, cross-attention `attn2`) calls
`attention()` below. The probabilities M = softmax(QKᵀ/√d) are an ordinary tensor here, and
between the softmax and the product with V a *controller* may look at M and return the M to use
instead -- that is the whole mechanism of Prompt-to-Prompt. The controller is an explicit
argument; the call site is described by a `Site` (where in the UNet, which resolution, self or
cross, which denoising step), so no controller has to count calls or guess the layer order.

`fast=True` selects fused attention (`ops.sdpa`: PyTorch's scaled-dot-product attention, or
oneDNN query slices for long key sequences on the CPU) for the call sites whose maps no
controller asks for (see `Controller.wants`), and oneDNN linear layers (`ops.linear`); tests
prove it equals the explicit path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from einops import rearrange
from torch import nn

from .ops import linear, sdpa


@dataclass(frozen=True)
class Site:
    """Where an attention call happens.

    place:  "down", "mid" or "up"
    block:  index of the UNet block within its place (down_blocks[block] ...)
    layer:  index of the transformer (spatial attention) within that block
    depth:  index of the transformer block inside the spatial transformer (0 for SD 1.x)
    kind:   "self" (attn1: pixels attend to pixels) or "cross" (attn2: pixels attend to tokens)
    pixels: number of query positions, h·w (4096 = 64² ... 64 = 8² at 512 px)
    step:   index of the denoising step, 0 .. steps-1 (None outside a sampling loop)
    """
    place: str
    block: int
    layer: int
    depth: int
    kind: str
    pixels: int
    step: int | None = None

    @property
    def name(self) -> str:
        """A readable, unique label, e.g. 'down1.0.cross@32x32'."""
        side = int(round(self.pixels ** 0.5))
        return f"{self.place}{self.block}.{self.layer}.{self.kind}@{side}x{side}"


class Controller(Protocol):
    """What the UNet needs from a Prompt-to-Prompt controller (see minip2p.p2p)."""

    def wants(self, site: Site) -> bool:
        """Does this controller read or rewrite the probabilities M at `site`?"""

    def __call__(self, probs: torch.Tensor, site: Site) -> torch.Tensor:
        """probs: M, (batch, heads, pixels, tokens). Return the M to multiply with V."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              site: Site | None = None, control: Controller | None = None,
              fast: bool = False, upcast: bool = False) -> torch.Tensor:
    """Multi-head attention. q: (b, n, h·d); k, v: (b, m, h·d). Returns (b, n, h·d).
    `upcast`: the scores and softmax in fp32 (SD 2.1 under fp16; the fused path does so anyway)."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    if fast and (control is None or not control.wants(site)):
        out = sdpa(q, k, v, fast)                                         # fused, M never kept
    else:
        scale = q.shape[-1] ** -0.5                                       # 1/√d
        if upcast:
            q, k = q.float(), k.float()
        probs = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1).to(v.dtype)  # M: (b, h, n, m)
        if control is not None:
            probs = control(probs, site)                                  # the P2P hook
        out = probs @ v                                                   # (b, h, n, d)
    return rearrange(out, "b h n d -> b n (h d)")


class Attention(nn.Module):
    """Projections around `attention()`. Names match the checkpoints: to_q, to_k, to_v, to_out.0.

    `context_dim=None` makes it self-attention (keys from the same pixels).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False,
                 upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None, site=None, control=None, fast=False):
        context = x if context is None else context
        q, k, v = (linear(w, t, fast) for w, t in ((self.to_q, x), (self.to_k, context),
                                                   (self.to_v, context)))
        return linear(self.to_out[0], attention(q, k, v, self.heads, site, control, fast, self.upcast), fast)
