"""The SD 1.x UNet ε_θ(z_t, t, c), read top to bottom.

Module names equal the diffusers checkpoint keys, so a diffusers `unet/` folder loads as is.

    z_t ─ conv_in ─ down_blocks ─ mid_block ─ up_blocks ─ norm/SiLU/conv_out ─ ε
                        │ skips ────────────────►│
    t ─ sinusoidal embedding ─ MLP ─► every ResBlock
    c (CLIP tokens) ─────────────────► every cross-attention (attn2)

SD 1.x at 512 px: latents 4×64×64, widths 320/640/1280/1280, 2 ResBlocks per level,
a spatial transformer after each ResBlock in the first three levels, 8 heads everywhere.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..attention import Attention
from ..control import Controller, Run, Site
from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos=True, shift=0.0):
    """Sinusoidal embedding of the timestep (Transformer-style): t (b,) -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - shift))
    args = t.float()[:, None] * freqs[None].to(t.device)                # (b, half)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, cin, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, add the time embedding, GroupNorm-SiLU-conv, plus a skip.

    Shared with the VAE (there `temb_dim=None`: no time input). In the UNet a controller that
    wants the "res" site sees the residual branch h after conv2, before the skip is added."""

    def __init__(self, cin, cout, temb_dim=None, groups=32, eps=1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb=None, site: Site | None = None, control: Controller | None = None):
        fresh = not torch.is_grad_enabled()        # no graph: SiLU in place on the norm's output
        h = self.conv1(F.silu(self.norm1(x), inplace=fresh))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h), inplace=fresh))
        if control is not None:
            site = replace(site, pixels=h.shape[-2] * h.shape[-1])
            if control.wants(site):
                h = control.features(h, site)                         # plug-and-play's hook
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        a, g = self.proj(x).chunk(2, dim=-1)                          # [a, g] = x Wᵀ + b
        return a * F.gelu(g)                                          # a · GELU(g) (Shazeer 2020)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """x += attn1(x) [self]; x += attn2(x, c) [cross]; x += FF(x) -- each after a LayerNorm."""

    def __init__(self, dim, heads, context_dim, upcast=False):
        super().__init__()
        self.index = None              # place in the UNet's forward order, set by the UNet
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, upcast=upcast)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context, site: Site, control=None):
        site = replace(site, pixels=x.shape[1], index=self.index)
        x = x + self.attn1(self.norm1(x), None, replace(site, kind="self"), control)
        x = x + self.attn2(self.norm2(x), context, replace(site, kind="cross"), control)
        return x + self.ff(self.norm3(x))


class TokenConv(nn.Conv2d):
    """SD 1.x's proj_in/proj_out: a 1×1 convolution, applied to the token sequence (b, h·w, c) as
    the same linear map per token, its weight (out, in, 1, 1) read as (out, in)."""

    def __init__(self, dim):
        super().__init__(dim, dim, 1)

    def forward(self, x):
        return F.linear(x, self.weight.flatten(1), self.bias)


class Transformer2DModel(nn.Module):
    """Spatial transformer: feature map (b, c, h, w) <-> token sequence (b, h·w, c)."""

    def __init__(self, dim, heads, context_dim, depth=1, groups=32, linear_proj=False,
                 upcast=False):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        proj = (lambda: nn.Linear(dim, dim)) if linear_proj else (lambda: TokenConv(dim))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(dim, heads, context_dim, upcast) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x, context, site: Site, control=None):
        h, w = x.shape[-2:]
        res = x
        x = rearrange(self.norm(x), "b c h w -> b (h w) c")              # tokens (b, h·w, c)
        x = self.proj_in(x)                      # a 1×1 conv (SD 1.x) is a linear map per token
        for depth, block in enumerate(self.transformer_blocks):
            x = block(x, context, replace(site, depth=depth), control)
        x = self.proj_out(x)
        # res first: the sum takes res's memory layout. (x's view first would make it channels-last,
        # and PyTorch would then copy the next convolution's weight to that layout at every call.)
        return res + rearrange(x, "b (h w) c -> b c h w", h=h, w=w)


class Downsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size=None):
        # nearest ×2, or to the size of the next skip when latents are not a power-of-two multiple
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else \
            F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class UNetBlock(nn.Module):
    """One level of the UNet: ResBlocks, each optionally followed by a spatial transformer,
    then an optional down- or up-sampler. `skips` > 0 makes it an up block that concatenates
    that many skip tensors from the down path, one before each ResBlock."""

    def __init__(self, cfg: UNetConfig, level, cins, cout, attn, sampler):
        super().__init__()
        temb, g = cfg.block_out_channels[0] * 4, cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(c, cout, temb, g, cfg.norm_eps) for c in cins])
        self.attentions = nn.ModuleList([
            Transformer2DModel(cout, cfg.heads(level), cfg.cross_attention_dim,
                               cfg.transformer_layers_per_block, g, cfg.use_linear_projection,
                               cfg.upcast_attention) for _ in cins]) if attn else None
        if sampler == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(cout)])
        elif sampler == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, x, temb, context, site: Site, control=None, skips=None, up_size=None):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)                 # (b, c + c_skip, h, w)
            x = resnet(x, temb, replace(site, layer=i, kind="res"), control)
            if self.attentions is not None:
                x = self.attentions[i](x, context, replace(site, layer=i), control)
            outputs.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            outputs.append(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, up_size)
        return x, outputs


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c, temb, g = cfg.block_out_channels[-1], cfg.block_out_channels[0] * 4, cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb, g, cfg.norm_eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(
            c, cfg.heads(len(cfg.block_out_channels) - 1), cfg.cross_attention_dim,
            cfg.transformer_layers_per_block, g, cfg.use_linear_projection,
            cfg.upcast_attention)])

    def forward(self, x, temb, context, site: Site, control=None):
        x = self.resnets[0](x, temb, replace(site, layer=0, kind="res"), control)
        x = self.attentions[0](x, context, replace(site, layer=0), control)
        return self.resnets[1](x, temb, replace(site, layer=1, kind="res"), control)


class UNet2DConditionModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, n, L = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4)
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            cin = ch[max(i - 1, 0)]
            self.down_blocks.append(UNetBlock(
                cfg, i, [cin] + [ch[i]] * (L - 1), ch[i], attn=kind.startswith("CrossAttn"),
                sampler="down" if i < n - 1 else None))
        self.mid_block = UNetMidBlock2DCrossAttn(cfg)
        self.up_blocks = nn.ModuleList()
        rch = ch[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            prev, skip_in = rch[max(i - 1, 0)], rch[min(i + 1, n - 1)]
            # ResBlock j sees: the previous output (+ the matching skip of the down path)
            cins = [(prev if j == 0 else rch[i]) + (skip_in if j == L else rch[i])
                    for j in range(L + 1)]
            self.up_blocks.append(UNetBlock(
                cfg, n - 1 - i, cins, rch[i], attn=kind.startswith("CrossAttn"),
                sampler="up" if i < n - 1 else None))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.fused = None             # the fast path's attention kernel, for controllers (Run)
        # every transformer block learns its place in the forward order (Site.index)
        for i, block in enumerate(self.transformer_blocks()):
            block.index = i

    def transformer_blocks(self) -> list[BasicTransformerBlock]:
        """The transformer blocks in forward order: down, mid, up (SD 1.x: 6 + 1 + 9 = 16)."""
        blocks = [*self.down_blocks, self.mid_block, *self.up_blocks]
        return [tb for b in blocks for t in (b.attentions or []) for tb in t.transformer_blocks]

    def forward(self, z, t, context, control: Controller | None = None, step: int | None = None,
                batch=None, residuals=None):
        """ε_θ(z_t, t, c).  z: (b, 4, h, w); t: scalar or (b,); context: (b, 77, 768). `control`
        sees every site it wants (`step` in each Site; `batch`, precision and the fast path's kernel
        in `site.run`). At the "h" site `control.features` may return k·b rows ([h; h + Δh]): ε has
        k·b rows. `residuals`: ControlNets' (down, mid), added to the skips and h (conditioning/)."""
        h, skips, temb, site = self.encode(z, t, context, control, step, batch)
        if residuals is not None:                       # ControlNet: skip_k + c_k, h + c_mid
            skips, h = [s + c for s, c in zip(skips, residuals[0], strict=True)], h + residuals[1]
        h_site = replace(site, place="mid", kind="h", pixels=h.shape[-2] * h.shape[-1])  # Asyrp
        if control is not None and control.wants(h_site):
            h = control.features(h, h_site)
            if (k := h.shape[0] // z.shape[0]) > 1:  # [h; h + Δh]: the same skips, per copy
                skips = [s.repeat(k, 1, 1, 1) for s in skips]
                temb, context = temb.repeat(k, 1), context.repeat(k, 1, 1)
        return self.decode(h, skips, temb, context, site, control)

    def encode(self, z, t, context, control: Controller | None = None, step: int | None = None,
               batch=None):
        """Down path and mid block -> (h, skips, temb, site); h: Asyrp's h-space (1280×8×8)."""
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        temb = timestep_embedding(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos,
                                  self.cfg.freq_shift)
        temb = self.time_embedding(temb.to(z.dtype))                    # (b, 4·c0)
        run = Run(batch, self.cfg.upcast_attention, self.fused)
        site = Site("down", 0, 0, 0, "res", 0, step=step, run=run)
        x = self.conv_in(z)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, outs = block(x, temb, context, replace(site, block=i), control)
            skips += outs
        x = self.mid_block(x, temb, context, replace(site, place="mid"), control)
        return x, skips, temb, site

    def decode(self, x, skips, temb, context, site: Site, control: Controller | None = None):
        """The up path from h with the down path's skips -> ε."""
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            up_size = skips[-1].shape[-2:] if skips else None            # size of the next level
            x, _ = block(x, temb, context, replace(site, place="up", block=i), control,
                         skips=mine, up_size=up_size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
