"""ControlNet (Zhang, Rao & Agrawala, ICCV 2023): a trainable copy of the UNet's encoder that
reads a spatial hint c_f (edges, depth, pose ...) and returns one residual per skip connection.

    h₀  = conv_in(z_t) + E(c_f)                  E: the hint encoder, full resolution → latents
    h_i = the copied encoder's i-th output       (the same outputs the UNet keeps as skips)
    c_i = Z_i(h_i),  i = 0 … n−1                 Z_i: zero-initialised 1×1 convs
    c_n = Z_n(mid(h_{n−1}))                      after the copied mid block
    the UNet then reads skip_i + s_i·c_i in its decoder and mid(·) + s_n·c_n   (model/unet.py)

Same z_t, t and text context c as the UNet. The hint encoder E is the official code's, not the
paper's (which describes four 4×4 convs with ReLU, 16-32-64-128): 3×3 convs each followed by SiLU,
channels 3→16, 16→16, 16→32 (stride 2), 32→32, 32→96 (stride 2), 96→96, 96→256 (stride 2), then a
zero-initialised 3×3 conv to the UNet's first width (320). Its widths come from
`conditioning_embedding_out_channels`, one stride-2 conv between two of them, so it maps the hint
at image resolution onto the latent grid (8× down for SD 1.x, 4× for the toy model).

Module names equal the diffusers checkpoint keys (time_embedding.linear_1, conv_in,
controlnet_cond_embedding.blocks.3, down_blocks.1.attentions.0 …, controlnet_down_blocks.7,
controlnet_mid_block), so `lllyasviel/control_v11p_sd15_canny` loads with no renaming; the
original single-file layout is renamed in load/controlnet.py. The encoder blocks are the UNet's
own (UNetBlock, UNetMidBlock2DCrossAttn), built from a UNetConfig.

Training forward pass (what a trainer needs):

    net = ControlNet.from_unet(model.unet, downscale=model.vae.cfg.downscale)   # or load_controlnet
    down, mid = net(z_t, t, context, hint)                   # hint (b, 3, H, W) in [0, 1]
    eps = model.unet(z_t, t, context, residuals=(down, mid))
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..control import Run, Site
from .config import UNetConfig, _build
from .unet import (TimestepEmbedding, UNet2DConditionModel, UNetBlock, UNetMidBlock2DCrossAttn,
                   timestep_embedding)

# the UNet fields a ControlNet config.json shares (the decoder's are mirrored from the encoder's)
UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclass(frozen=True)
class ControlNetConfig:
    """The copied encoder's architecture (a UNetConfig) and the hint encoder's."""
    unet: UNetConfig = UNetConfig()
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False           # shuffle nets: residuals averaged over space

    def __post_init__(self):
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("controlnet_conditioning_channel_order must be rgb or bgr")

    @property
    def downscale(self) -> int:
        """Hint pixels per latent along one side: 2^(stride-2 convs)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict, source: str = "controlnet config") -> "ControlNetConfig":
        data = dict(data)
        data.pop("up_block_types", None)
        down = data.get("down_block_types", UNetConfig.down_block_types)
        data["up_block_types"] = [UP.get(t, t) for t in reversed(down)]
        unet = UNetConfig.from_dict(data, source)
        own = {k: data[k] for k in ("conditioning_channels", "conditioning_embedding_out_channels",
                                    "controlnet_conditioning_channel_order",
                                    "global_pool_conditions") if data.get(k) is not None}
        return _build(cls, {**own, "unet": unet}, source, {})

    @classmethod
    def of_unet(cls, unet: UNetConfig, downscale: int | None = None, **hint) -> "ControlNetConfig":
        """A ControlNet for `unet`. The hint encoder's widths: `conditioning_embedding_out_channels`
        if given, else SD 1.x's (16, 32, 96, 256) cut to `downscale` (the VAE's, e.g. 4 for the
        toy model: (16, 32, 96)); none given: SD 1.x's, 8×."""
        if downscale is not None and "conditioning_embedding_out_channels" not in hint:
            if downscale < 2 or downscale & (downscale - 1) or downscale > 8:
                raise ValueError(f"downscale must be 2, 4 or 8, got {downscale}")
            hint["conditioning_embedding_out_channels"] = \
                cls.conditioning_embedding_out_channels[:downscale.bit_length()]
        return cls(unet=unet, **hint)


class ConditioningEmbedding(nn.Module):
    """E: hint (b, 3, H, W) -> (b, c₀, H/f, W/f). SiLU after every conv but the last (zero) one."""

    def __init__(self, cin: int, widths: tuple, cout: int):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], cout, 3, padding=1)

    def forward(self, hint):
        h = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        ch, n, L = u.block_out_channels, len(u.block_out_channels), u.layers_per_block
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4)
        self.conv_in = nn.Conv2d(u.in_channels, ch[0], 3, padding=1)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, ch[0])
        self.down_blocks = nn.ModuleList()
        zero = [ch[0]]                                   # one zero conv per skip the UNet keeps
        for i, kind in enumerate(u.down_block_types):
            last = i == n - 1
            self.down_blocks.append(UNetBlock(
                u, i, [ch[max(i - 1, 0)]] + [ch[i]] * (L - 1), ch[i],
                attn=kind.startswith("CrossAttn"), sampler=None if last else "down"))
            zero += [ch[i]] * (L + (0 if last else 1))
        self.mid_block = UNetMidBlock2DCrossAttn(u)
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, 1) for c in zero])
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)
        self.fused = None                                # the fast path's kernel (minip2p/fast/)

    @property
    def outputs(self) -> int:
        """How many residuals it returns: one per UNet skip, and the mid block's (13 at SD 1.x)."""
        return len(self.controlnet_down_blocks) + 1

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, copy: bool = True, downscale=None,
                  **hint) -> "ControlNet":
        """A ControlNet for `unet`, as training starts it: the encoder copied from the UNet's
        weights (`copy`), the zero convs zero (so it adds nothing until trained). `downscale`:
        the VAE's (model.vae.cfg.downscale), which sets the hint encoder (`of_unet`)."""
        net = cls(ControlNetConfig.of_unet(unet.cfg, downscale, **hint))
        if copy:
            mine = net.state_dict()
            net.load_state_dict({**mine, **{k: v for k, v in unet.state_dict().items()
                                            if k in mine}})
        for zero in [*net.controlnet_down_blocks, net.controlnet_mid_block,
                     net.controlnet_cond_embedding.conv_out]:
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)
        return net

    def forward(self, z, t, context, hint, scales=1.0):
        """z: (b, c, h, w) the UNet's input; t: scalar or (b,); context (b, 77, d); hint
        (b, 3, f·h, f·w) in [0, 1]; `scales`: one number or one per output.
        -> (down: n tensors, one per UNet skip in the order the UNet keeps them, mid)."""
        u = self.cfg.unet
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        temb = self.time_embedding(timestep_embedding(t, u.block_out_channels[0],
                                                      u.flip_sin_to_cos, u.freq_shift).to(z.dtype))
        if self.cfg.controlnet_conditioning_channel_order == "bgr":
            hint = hint.flip(1)
        x = self.conv_in(z) + self.controlnet_cond_embedding(hint.to(z.dtype))
        site = Site("down", 0, 0, 0, "res", 0, run=Run(None, u.upcast_attention, self.fused))
        outs = [x]
        for i, block in enumerate(self.down_blocks):
            x, o = block(x, temb, context, replace(site, block=i))
            outs += o
        x = self.mid_block(x, temb, context, replace(site, place="mid"))
        res = [zc(h) for zc, h in zip(self.controlnet_down_blocks, outs)]
        res.append(self.controlnet_mid_block(x))
        if self.cfg.global_pool_conditions:
            res = [r.mean(dim=(2, 3), keepdim=True) for r in res]
        s = [float(scales)] * len(res) if isinstance(scales, (int, float)) else list(scales)
        if len(s) != len(res):
            raise ValueError(f"{len(s)} scales for {len(res)} ControlNet outputs")
        res = [r * k for r, k in zip(res, s)]
        return res[:-1], res[-1]
