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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import softmax_attention
from ..control import Controller, Site, map_shape
from ..errors import MinipError
from ..guidance import TEXT
from ..real.invert import Inversion
from .base import ParameterError, Result, Settings, check_word, param
from .editing import RealImage, edit_prompts

__all__ = ["MutualSelfAttention", "MutualSelfAttentionMasked", "Params", "check", "build", "run",
           "default_layer", "mask_pixels_for"]


def default_layer(unet) -> int:
    """L: the first transformer layer of the decoder's two finest resolutions (SD 1.x: 10, the
    paper's value; the toy model: 3, its whole decoder)."""
    with_attention = [blk for blk in unet.up_blocks if blk.attentions is not None]
    last_two = sum(len(t.transformer_blocks) for blk in with_attention[-2:] for t in blk.attentions)
    return len(unet.transformer_blocks()) - last_two          # the up blocks run last


def mask_pixels_for(height: int, width: int, downscale: int = 8) -> int:
    """The cross-attention resolution the masks come from: the third UNet level, a quarter of
    the latent sides rounded up as the UNet does (16² at 512 px, as the official code)."""
    h, w = height // downscale, width // downscale
    for _ in range(2):
        h, w = -(-h // 2), -(-w // 2)
    return h * w


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
    cross-attention maps the masks come from (16² at 512 px: the third UNet level); `latent`:
    the latents' (h, w), which gives the maps' shapes (None: square maps)."""

    def __init__(self, tok, prompts: list[str], words: tuple[str, str], steps: int,
                 start_step: int = 4, start_layer: int = 10, layers: int = 16,
                 threshold: float = 0.1, mask_pixels: int = 16 ** 2,
                 latent: tuple[int, int] | None = None):
        super().__init__(steps, start_step, start_layer, layers)
        self.latent = latent
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
        if self.latent is not None:
            side, res = map_shape(maps.shape[1], self.latent), map_shape(pixels, self.latent)
        else:
            side, res = (math.isqrt(maps.shape[1]),) * 2, (math.isqrt(pixels),) * 2
            if side[0] ** 2 != maps.shape[1] or res[0] ** 2 != pixels:
                raise MinipError("mask-guided MasaCtrl without the latents' size needs square maps")
        m = torch.stack([maps[b][:, t].sum(-1) for b, t in enumerate(self.tokens)])   # (B, p)
        lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
        m = ((m - lo) / (hi - lo)).reshape(-1, 1, *side)                  # min-max to [0, 1]
        return F.interpolate(m, size=res).flatten(1) >= self.threshold    # nearest

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


NAME, EDITS_PICTURES = "masactrl", "optional"
SUMMARY = "MasaCtrl: the target's self-attention reads the source's keys and values"


@dataclass
class Params(RealImage):
    """MasaCtrl's parameters; None: the paper's S = 4 (the last step of a shorter run) and L =
    the decoder's two finest resolutions (10 of SD 1.x's 16)."""
    start_step: int | None = param(None, "mutual self-attention from this step on (S = 4)",
                                   kind=int)
    start_layer: int | None = param(None, "… in transformer layers from this one on (L = 10 "
                                          "of SD 1.x's 16)", kind=int)
    mask_words: list | None = param(None, "mask-guided: a word of the source, then one of the "
                                          "target", kind="words")

    def check(self, prompts: list[str], s: Settings) -> None:
        self.check_real(s, Params)
        n = len(prompts) + isinstance(s.image, Inversion)
        if n < 2:
            raise ParameterError("prompts", "MasaCtrl needs a source prompt and at least one "
                                            "target prompt")
        step = self.step(s.steps)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < s.steps:
            raise ParameterError("start_step", f"must be in [0, {s.steps}) (a step of the "
                                               f"{s.steps} denoising steps), got {step!r}")
        if self.mask_words is not None:
            if len(self.mask_words) != 2:
                raise ParameterError("mask_words", f"needs two words (source, target), got "
                                                   f"{len(self.mask_words)}")
            if s.image is None:
                src, tgt = self.mask_words
                check_word("mask_words", src, prompts[0], "the source prompt")
                for prompt in prompts[1:]:
                    check_word("mask_words", tgt, prompt, "the target prompt")

    def step(self, steps: int) -> int:
        return min(4, steps - 1) if self.start_step is None else self.start_step


def check(steps: int, start_step: int, start_layer: int, layers: int,
          default: int | None = None) -> None:
    """Refuse a start step or start layer outside the run (`default`: the model's own layer,
    named in the message)."""
    if not 0 <= start_step < steps:
        raise ParameterError("start_step", f"must be in [0, steps) = [0, {steps}), got "
                                           f"{start_step}")
    if not 0 <= start_layer < layers:
        default = "" if default is None else (f"; leave it out for this model's default, "
                                              f"{default} (the decoder's two finest resolutions)")
        raise ParameterError("start_layer", f"must be in [0, {layers}): this model has {layers} "
                                            f"transformer layers, got {start_layer}{default}")


def build(tok, prompts, steps, start_step=4, start_layer=10, layers=16,
          mask_words=None, mask_pixels: int = 16 ** 2, latent=None) -> Controller:
    """MasaCtrl from its parameters: plain, or mask-guided when `mask_words` = (source word,
    target word); `latent`: the latents' (h, w) (mask-guided at any size)."""
    check(steps, start_step, start_layer, layers)
    if len(prompts) < 2:
        raise ParameterError("prompts", "MasaCtrl needs a source prompt and at least one target "
                                        "prompt")
    if mask_words is None:
        return MutualSelfAttention(steps, start_step, start_layer, layers)
    if len(mask_words) != 2:
        raise ParameterError("mask_words", f"needs two words (source, target), got "
                                           f"{len(mask_words)}")
    return MutualSelfAttentionMasked(tok, prompts, tuple(mask_words), steps, start_step,
                                     start_layer, layers, mask_pixels=mask_pixels, latent=latent)


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    """MasaCtrl from noise, from SDEdit's noised picture, or from an inversion, whose source row
    is pinned to the picture's DDIM trajectory where there is one."""
    from ..control import AttentionStore, Compose, PinSource
    from ..pipeline import check_size
    layers = len(model.unet.transformer_blocks())
    layer = default_layer(model.unet) if p.start_layer is None else p.start_layer
    check(s.steps, p.step(s.steps), layer, layers, default_layer(model.unet))
    height, width = check_size(model, s.height, s.width)

    def make_control(model, prompts, steps, step_pixels, trajectory):
        ctrl = build(model.tokenizer, prompts, steps, p.step(s.steps), layer,
                     layers, tuple(p.mask_words) if p.mask_words else None,
                     mask_pixels_for(height, width, model.vae.cfg.downscale),
                     (height // model.vae.cfg.downscale, width // model.vae.cfg.downscale))
        store = AttentionStore(len(prompts), step_pixels=step_pixels) if s.maps else None
        if trajectory is not None:                             # the source on its trajectory
            ctrl = Compose(PinSource(trajectory), ctrl)
        return Compose(ctrl, store), store
    return edit_prompts(model, prompts, p, s, make_control)
