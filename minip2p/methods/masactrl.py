"""MasaCtrl: mutual self-attention (Cao et al., ICCV 2023, arXiv 2304.08465): a target image is
generated beside the source and, in the later steps and decoder layers, its self-attention
queries read the *source's* content, so it keeps the source's look while following its own
prompt's layout.

Self-attention of an image, Attention(Q, K, V) = softmax(Q Kᵀ/√d) V, becomes for the target

    Attention(Q_tgt, K_src, V_src)      at steps t ≥ S and transformer layers l ≥ L

(paper: S = 4 of 50 steps, L = 10 of SD 1.x's 16: the decoder's 32² and 64² layers; the
official code counts steps from 0 and layers in forward order, as `Site.step`, `Site.index`).
It applies to the unconditional and the conditional half alike: each row reads the source row
under its own condition; the source row reads itself, so it is unchanged. Cross-attention is
untouched.

Mask-guided (the official `MutualSelfAttentionControlMaskAuto`): the foreground of a chosen word
in each image, M_src and M_tgt, comes from the cross-attention maps of the current step at
16² pixels (512 px), averaged over heads and over the layers seen so far in this step, summed
over the word's tokens, min-max normalised and thresholded (≥ 0.1), nearest-resized to the layer:

    O_fg = softmax(Q_tgt K_srcᵀ/√d + B_fg) V_src,   B_fg = 0 on M_src, −∞ elsewhere
    O_bg = softmax(Q_tgt K_srcᵀ/√d + B_bg) V_src,   B_bg = 0 off M_src, −∞ on it
    O_tgt = M_tgt · O_fg + (1 − M_tgt) · O_bg

(−∞ is the dtype's lowest finite value, as the official code). Before the first 16² cross
layer of a step there is no map yet, and the plain mutual attention is used.

Real images: the source row is pinned to its DDIM inversion trajectory
(`Compose(control.PinSource(trajectory), masa)`, the official `ref_intermediate_latents`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention import softmax_attention
from ..control import Controller, Site
from ..errors import MinipError
from ..guidance import TEXT

__all__ = ["MutualSelfAttention", "MutualSelfAttentionMasked", "check", "build", "default_layer",
           "mask_pixels_for"]


def default_layer(unet) -> int:
    """L: the first transformer layer of the decoder's two finest resolutions (SD 1.x: 10, the
    paper's value; the toy model: 3, its whole decoder)."""
    with_attention = [blk for blk in unet.up_blocks if blk.attentions is not None]
    last_two = sum(len(t.transformer_blocks) for blk in with_attention[-2:] for t in blk.attentions)
    return len(unet.transformer_blocks()) - last_two          # the up blocks run last


def mask_pixels_for(height: int, width: int, downscale: int = 8) -> int:
    """The cross-attention resolution the masks come from: a quarter of the latent side (16² at
    512 px, as the official code)."""
    return (height // downscale // 4) * (width // downscale // 4)


class MutualSelfAttention(Controller):
    """Attention(Q, K_src, V_src) in self-attention at steps ≥ start_step, layers ≥ start_layer."""

    def __init__(self, steps: int, start_step: int = 4, start_layer: int = 10, layers: int = 16):
        self.steps, self.start_step = steps, start_step
        self.start_layer, self.layers = start_layer, layers

    def _active(self, site: Site) -> bool:
        return (site.kind == "self" and site.step is not None
                and self.start_step <= site.step < self.steps
                and self.start_layer <= site.index < self.layers)

    def wants(self, site: Site) -> bool:
        return self._active(site)

    def attend(self, q, k, v, site: Site):
        batch = site.batch_of(q.shape[0])
        src = [batch.source_row(r) for r in range(q.shape[0])]          # same condition, image 0
        return softmax_attention(q, k[src], v[src], site.run.fused)


class MutualSelfAttentionMasked(MutualSelfAttention):
    """Mask-guided: foreground queries read the source's foreground, background its background.
    `words` = (word in the source prompt, word in the target prompts); `mask_pixels`: the
    cross-attention maps the masks come from (16² at 512 px: the third UNet level)."""

    def __init__(self, tok, prompts: list[str], words: tuple[str, str], steps: int,
                 start_step: int = 4, start_layer: int = 10, layers: int = 16,
                 threshold: float = 0.1, mask_pixels: int = 16 ** 2):
        super().__init__(steps, start_step, start_layer, layers)
        self.tokens = [tok.word_positions(p, words[0] if b == 0 else words[1])
                       for b, p in enumerate(prompts)]                  # token positions per image
        self.threshold, self.mask_pixels = threshold, mask_pixels
        self.maps: list[torch.Tensor] = []                               # this step's (B, p, 77)
        self.step = None

    def wants(self, site: Site) -> bool:
        reads = (site.kind == "cross" and site.pixels == self.mask_pixels
                 and site.step is not None and self.start_step <= site.step < self.steps)
        return reads or self._active(site)

    def _record(self, site: Site):
        if site.step != self.step:                                       # a new step: forget
            self.maps, self.step = [], site.step

    def probs(self, M, site: Site):
        self._record(site)
        batch = site.batch_of(M.shape[0])
        rows = [batch.row(b, TEXT) for b in range(len(self.tokens))]
        self.maps.append(M[rows].float().mean(dim=1))                    # heads averaged: (B, p, 77)
        return M

    def masks(self, pixels: int) -> torch.Tensor:
        """(B, pixels) bool: each image's foreground at a layer of `pixels` positions."""
        maps = torch.stack(self.maps).mean(0)                             # over layers: (B, p, 77)
        side, res = math.isqrt(maps.shape[1]), math.isqrt(pixels)
        if side * side != maps.shape[1] or res * res != pixels:
            raise MinipError("mask-guided MasaCtrl needs a square image (as the official code)")
        m = torch.stack([maps[b][:, t].sum(-1) for b, t in enumerate(self.tokens)])   # (B, p)
        lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
        m = ((m - lo) / (hi - lo)).reshape(-1, 1, side, side)             # min-max to [0, 1]
        return F.interpolate(m, size=(res, res)).flatten(1) >= self.threshold   # nearest

    def attend(self, q, k, v, site: Site):
        if site.kind != "self":
            return None                                                   # only reads cross maps
        self._record(site)
        if not self.maps:                   # no 16² cross map yet this step: plain mutual
            return super().attend(q, k, v, site)
        batch = site.batch_of(q.shape[0])
        src = batch.rows_of(image=0)
        tgt = [r for r in range(q.shape[0]) if r not in src]
        ks, vs = k[[batch.source_row(r) for r in tgt]], v[[batch.source_row(r) for r in tgt]]
        fg = self.masks(site.pixels)                                      # (B, n)
        low = torch.finfo(q.dtype).min
        keys = fg[0].view(1, 1, 1, -1)                                    # the source's mask
        bias_fg = torch.where(keys, 0.0, low).to(q.dtype)                 # keys: source fg only
        bias_bg = torch.where(keys, low, 0.0).to(q.dtype)                 # keys: source bg only
        o_fg = softmax_attention(q[tgt], ks, vs, site.run.fused, mask=bias_fg)
        o_bg = softmax_attention(q[tgt], ks, vs, site.run.fused, mask=bias_bg)
        fg_tgt = fg[[batch.rows[r][0] for r in tgt]][:, None, :, None]    # (t, 1, n, 1) queries
        out = torch.empty_like(q)
        out[src] = softmax_attention(q[src], k[src], v[src], site.run.fused)
        out[tgt] = torch.where(fg_tgt, o_fg, o_bg)
        return out


def check(steps: int, start_step: int, start_layer: int, layers: int) -> None:
    """Refuse a start step or start layer outside the run."""
    if not 0 <= start_step < steps:
        raise MinipError(f"--masa-step must be in [0, steps) = [0, {steps}), got {start_step}")
    if not 0 <= start_layer < layers:
        raise MinipError(f"--masa-layer must be in [0, {layers}): this model has {layers} "
                         f"transformer layers, got {start_layer}")


def build(tok, prompts, steps, start_step=4, start_layer=10, layers=16,
          mask_words=None, mask_pixels: int = 16 ** 2) -> Controller:
    """MasaCtrl from options: plain, or mask-guided when `mask_words` = (source word, target word)."""
    check(steps, start_step, start_layer, layers)
    if len(prompts) < 2:
        raise MinipError("MasaCtrl needs a source prompt and at least one target prompt")
    if mask_words is None:
        return MutualSelfAttention(steps, start_step, start_layer, layers)
    if len(mask_words) != 2:
        raise MinipError(f"the mask needs two words (source, target), got {len(mask_words)}")
    return MutualSelfAttentionMasked(tok, prompts, tuple(mask_words), steps, start_step,
                                     start_layer, layers, mask_pixels=mask_pixels)
