"""The one place where attention is computed:  out = softmax(Q Kᵀ / √d) · V.

Every attention layer of the UNet (self-attention `attn1`, cross-attention `attn2`) calls
`attention()` below. The probabilities M = softmax(QKᵀ/√d) are an ordinary tensor here, and
between the softmax and the product with V a *controller* (minip2p.control) may look at M and
return the M to use instead -- that is the whole mechanism of Prompt-to-Prompt. A controller may
instead return the attention output itself (`attend`: MasaCtrl's queries reading the source's keys
and values). The controller is an explicit argument; the call site is described by a `Site`, so no
controller has to count calls or guess the layer order. Its hooks run only where it `wants` the
site, on both paths.

The reference model computes every attention explicitly and calls its linear layers plainly.
The fast path is installed on a loaded model from outside (minip2p/fast/, `load_model(fast=True)`,
switched off by `fast.uninstall` or `--explicit`): it sets each `Attention`'s `fused` kernel
(PyTorch's scaled-dot-product attention, or oneDNN query slices for long key sequences on the
CPU), which `attention()` takes for the sites no controller wants, so M is never kept there, and
swaps the projections for modules with the same weights that pick their kernel by measurement.
The kernel also reaches controllers that compute attention themselves as `site.run.fused`
(`softmax_attention`). Tests prove both paths equal. `upcast=True` (SD 2.x's
`upcast_attention`) forms QKᵀ and the softmax in fp32 when the model runs in fp16/bf16.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .control import Controller, Site

__all__ = ["Site", "Controller", "attention", "softmax_attention", "Attention"]


def softmax_attention(q, k, v, fused=None, upcast: bool = False, mask=None):
    """softmax(QKᵀ/√d + mask)·V for q: (b, h, n, d), k, v: (b, h, m, d) -> (b, h, n, d): through
    the kernel `fused` when given (M never kept; `site.run.fused`), else explicit. For
    controllers that compute attention themselves."""
    if fused is not None:
        return fused(q, k, v, mask)
    scale = q.shape[-1] ** -0.5                                           # 1/√d
    logits = (q.float() @ k.float().transpose(-1, -2)) if upcast else q @ k.transpose(-1, -2)
    logits = logits * scale if mask is None else logits * scale + mask
    return logits.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v     # fp32 softmax


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              site: Site | None = None, control: Controller | None = None,
              fused=None, upcast: bool = False) -> torch.Tensor:
    """Multi-head attention. q: (b, n, h·d); k, v: (b, m, h·d). Returns (b, n, h·d).
    `fused(q, k, v)`: the kernel for sites no controller wants (None: every M formed)."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    wanted = control is not None and control.wants(site)
    out = control.attend(q, k, v, site) if wanted else None            # the controller's own
    if out is None and fused is not None and not wanted:
        out = fused(q, k, v)                                              # fused, M never kept
    elif out is None:
        scale = q.shape[-1] ** -0.5                                       # 1/√d
        logits = (q.float() @ k.float().transpose(-1, -2)) if upcast else q @ k.transpose(-1, -2)
        probs = (logits * scale).softmax(dim=-1, dtype=torch.float32).to(v.dtype)  # M, fp32 exp
        if wanted:
            probs = control.probs(probs, site)                            # the P2P hook
        out = probs @ v                                                   # (b, h, n, d)
    return rearrange(out, "b h n d -> b n (h d)")


class Attention(nn.Module):
    """Projections around `attention()`. Names match the checkpoints: to_q, to_k, to_v, to_out.0.

    `context_dim=None` makes it self-attention (keys from the same pixels). `fused`: the
    attention kernel the fast path installed (minip2p/fast/), None: explicit.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False,
                 upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.fused = None

    def forward(self, x, context=None, site=None, control=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = attention(q, k, v, self.heads, site, control, self.fused, self.upcast)
        return self.to_out[0](out)
