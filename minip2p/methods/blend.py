"""Prompt-to-Prompt's LocalBlend (Hertz et al., §3.2 "local editing"): after each step the
edited images keep the source's latents outside the region the named words attend to,

    z*_b ← z_0 + α_b · (z*_b − z_0),   α_b = M(source words) ∨ M(words of prompt b)

with the masks read from the AttentionStore's cross-attention maps of the same run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..control import AttentionStore, Controller, map_shape

__all__ = ["LocalBlend"]


class LocalBlend(Controller):
    """Keep everything outside the edited object: after each step (from `start` on),
    z*_b ← z_0 + α_b · (z*_b − z_0), α_b = M(source words) ∨ M(words of prompt b).

    M(words): the stored cross-attention of the words' tokens at the coarsest down/up resolution
    (16² at 512 px: 2 down + 3 up layers), averaged over layers and heads, summed over tokens,
    3×3 max-pooled, nearest-upsampled to the latents, divided by its max, > threshold.
    `subtract`: words whose mask (no pooling; source ∨ own again) is removed from the blend
    (null-text notebook).
    Unlike the official stable notebook, any number of edited prompts works."""

    def __init__(self, tok, prompts, words, store: AttentionStore, steps: int,
                 threshold=0.3, start=0.0, subtract=None, subtract_threshold=0.3):
        self.store, self.threshold, self.sub_threshold = store, threshold, subtract_threshold
        self.start = int(start * steps)
        self.words = self._token_mask(tok, prompts, words)                 # (B, 77)
        self.sub = self._token_mask(tok, prompts, subtract) if subtract else None

    @staticmethod
    def _token_mask(tok, prompts, words):
        """words[b] (a word or list of words) for each prompt b -> (B, 77) 0/1."""
        m = torch.zeros(len(prompts), 77)
        for b, (prompt, ws) in enumerate(zip(prompts, words)):
            for w in [ws] if isinstance(ws, (str, int)) else ws:
                m[b, tok.word_positions(prompt, w)] = 1
        return m

    def _mask(self, z, tokens, threshold, pool):
        pixels = self.store.coarsest("cross")
        maps = self.store.average("cross", pixels)                         # (B, p, 77)
        maps = (maps * tokens.to(maps)[:, None, :]).sum(-1)                # (B, p)
        maps = maps.reshape(-1, 1, *map_shape(pixels, tuple(z.shape[2:])))
        if pool:
            maps = F.max_pool2d(maps, 3, stride=1, padding=1)
        maps = F.interpolate(maps, size=z.shape[2:])                       # nearest
        maps = maps / maps.amax(dim=(2, 3), keepdim=True)
        return maps > threshold                                            # (B, 1, h, w)

    def after_step(self, z, step):
        if step < self.start:
            return z
        alpha = self._mask(z, self.words, self.threshold, pool=True)
        alpha = alpha[:1] | alpha                                          # source ∨ own
        if self.sub is not None:                       # subtracted: also source ∨ own (official)
            sub = self._mask(z, self.sub, self.sub_threshold, pool=False)
            alpha = alpha & ~(sub[:1] | sub)
        return z[:1] + alpha.to(z) * (z - z[:1])
