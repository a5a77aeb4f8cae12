"""AutoencoderKL: images (3×H×W, in [-1, 1]) <-> latents (4×H/8×W/8 for SD 1.x).

    encode: x ─ Encoder ─ quant_conv ─ (mean, log σ²) of the posterior q(z|x)
    decode: z ─ post_quant_conv ─ Decoder ─ x̂

The diffusion model works on z·scaling_factor (0.18215 for SD 1.x); `pipeline.py` applies it.
Module names equal the diffusers checkpoint keys.

The encoder may be left unread (on the meta device) with `encoder_state` set, a function giving
its tensors (load_folder does this: a generated picture never needs it): the first `encode` reads
them then, in the decoder's dtype and device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attention
from ..errors import MinipError
from .config import VAEConfig
from .unet import ResnetBlock2D


ENCODER = ("encoder.", "quant_conv.")  # the state-dict keys only `encode` uses


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels of the bottleneck, with a residual."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)               # (b, h·w, c)
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderDownsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        # The reference pads asymmetrically: one column right, one row below (0,1,0,1), then a
        # stride-2 conv with no padding. Shapes equal padding=1; pixels do not.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DecoderUpsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResBlocks at one resolution, then an optional resampler."""

    def __init__(self, cins, cout, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, cout, None, groups, 1e-6) for c in cins])
        if down:
            self.downsamplers = nn.ModuleList([EncoderDownsample(cout)])
        if up:
            self.upsamplers = nn.ModuleList([DecoderUpsample(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", []) or getattr(self, "upsamplers", []):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, L, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Level([ch[max(i - 1, 0)]] + [ch[i]] * (L - 1), ch[i], g, down=i < n - 1)
            for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rch, g, L, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.layers_per_block, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = MidBlock(rch[0], g)
        self.up_blocks = nn.ModuleList([
            Level([rch[max(i - 1, 0)]] + [rch[i]] * L, rch[i], g, up=i < n - 1)
            for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    encoder_state = None            # () -> {key: tensor} of ENCODER, when left unread

    def load_encoder(self):
        """Read the encoder's tensors if it was left on the meta device (see the docstring)."""
        if self.encoder_state is None or not self.quant_conv.weight.is_meta:
            return                                   # read already (or being built: no file)
        like = self.post_quant_conv.weight
        state = {k: v.to(like.device, like.dtype if v.is_floating_point() else v.dtype)
                 for k, v in self.encoder_state().items()}
        want = {k for k in nn.Module.state_dict(self) if k.startswith(ENCODER)}
        if set(state) != want:
            raise MinipError(f"the VAE encoder's tensors changed on disk: "
                             f"{sorted(set(state) ^ want)[:3]}")
        self.load_state_dict(state, strict=False, assign=True)
        self.encoder.requires_grad_(False), self.quant_conv.requires_grad_(False)

    def state_dict(self, *args, **kw):
        """Every tensor, the encoder's too (read first if it was left unread): a state_dict is
        the whole model (weight fingerprints, comparisons, saving)."""
        self.load_encoder()
        return super().state_dict(*args, **kw)

    def encode(self, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """x: (b, 3, H, W) in [-1, 1] -> posterior mean (or a sample) of z: (b, 4, H/8, W/8)."""
        self.load_encoder()
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + std * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (b, 4, h, w) -> x̂: (b, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def decode_tiled(self, z: torch.Tensor, tile: int, overlap: int | None = None,
                     layout=torch.contiguous_format) -> torch.Tensor:
        """x̂ decoded in overlapping tiles of `tile` × `tile` latents (neighbours share `overlap`,
        default tile/4), each blended into the next with linear weights over the shared pixels,
        as diffusers' `tiled_decode`: the decoder's activations are one tile's, not the picture's.
        Returns fp32. Not D(z) exactly: GroupNorm's statistics and the bottleneck's attention
        see one tile (tests/test_decode_tiles.py bounds the difference on a random VAE)."""
        b, _, h, w = z.shape
        f = self.cfg.downscale
        overlap = tile // 4 if overlap is None else overlap
        if not 0 <= overlap < tile:
            raise ValueError(f"a tile of {tile} latents cannot overlap its neighbour by {overlap}")
        out = z.new_zeros(b, self.cfg.out_channels, f * h, f * w, dtype=torch.float32)
        weight = z.new_zeros(f * h, f * w, dtype=torch.float32)
        for i in _starts(h, tile, overlap):
            for j in _starts(w, tile, overlap):
                x = self.decode(z[:, :, i:i + tile, j:j + tile].contiguous(memory_format=layout))
                th, tw = x.shape[-2:]
                ramp = (_ramp(th, f * overlap, i > 0, i + tile < h)[:, None]
                        * _ramp(tw, f * overlap, j > 0, j + tile < w)[None]).to(out.device)
                out[..., f * i:f * i + th, f * j:f * j + tw] += x.float() * ramp
                weight[f * i:f * i + th, f * j:f * j + tw] += ramp
                del x
        return out / weight


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """First latent row (or column) of each tile: a stride of tile − overlap, the last tile
    flush with the edge (it may then share more than `overlap`: the weights are normalised)."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _ramp(n: int, e: int, up: bool, down: bool) -> torch.Tensor:
    """A tile's blending weights along one axis: rising over its first `e` pixels where a
    neighbour comes before it (`up`), falling over its last `e` where one follows (`down`);
    a rise and the neighbour's fall sum to 1."""
    w = torch.ones(n)
    r = (torch.arange(min(e, n)) + 0.5) / max(e, 1)
    if up and e:
        w[:len(r)] = r
    if down and e:
        w[n - len(r):] = torch.minimum(w[n - len(r):], r.flip(0))
    return w
