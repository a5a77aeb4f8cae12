"""Prompt-to-Prompt controllers (Hertz et al., ICLR 2023): small objects that look at the
attention probabilities M = softmax(QKᵀ/√d) inside the UNet and return the M to use.

The UNet calls `controller.probs(M, site)` at every attention layer the controller `wants` (see
control.py). M has shape (rows, heads, pixels, tokens); `site.batch_of(n)` says which rows are the
prompts' conditional rows -- source first (P), then the edited prompts (P*_1 … P*_{B-1}); the
unconditional rows are never touched. `site.step` is the denoising step t (index 0 … N−1).

    Replace   M*[…, n] = Σ_w M[…, w] · mapper[w, n]                   word swap        (§3.2)
    Refine    M*[…, n] = M[…, mapper[n]] where aligned, else own     adding a phrase
    Reweight  M*[…, n] = c_n · Edit(M)[…, n]                         attention re-weighting
    schedule  M* ← w_t · Edit(M) + (1 − w_t) · M*,  w_t = 1 for t inside the cross window τ_c
              (per word; align.cross_replace_window), else 0
    self-attn M*_self ← M_self  while t < τ_s (the self window) and pixels ≤ self_max_pixels (16²)
    LocalBlend  after each step: z* ← z + α · (z* − z)  with the mask α from stored maps

Controllers compose with `Compose(edit, store, blend)`: the edit runs first, so the store keeps
the edited maps -- as the official code does (it stores a tensor it then edits in place).

Fast path, cross sites no other controller reads: every edit is linear in the maps,
Edit(M)_b = M_src·A_b + M_b·diag(D_b) (Replace: A = mapper, D = 0; Refine: A selects the aligned
source tokens, D = 1 − aligned; Reweight: either, times diag(c)), so by associativity

    M*_b · V_b = softmax(Q_src K_srcᵀ/√d) · (A_b diag(w) V_b) + softmax(Q_b K_bᵀ/√d) · (diag(w D_b + 1 − w) V_b)

two fused attentions with changed values; M* is never formed (`Edit.attend`; tests/test_fast.py
proves it equals the explicit path). Outside the window (w = 0) the edit does not want the site.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import softmax_attention
from ..control import AttentionStore, Compose, Controller, Site
from ..guidance import TEXT
from ..real.invert import Inversion
from . import align
from .blend import LocalBlend
from .base import ParameterError, Result, Settings, check_number, check_word, param, words_of
from .editing import RealImage, edit_prompts

__all__ = ["AttentionStore", "Compose", "Edit", "Replace", "Refine", "Reweight", "LocalBlend",
           "equalizer", "Params", "build", "run"]


class Edit(Controller):
    """Base of the cross-attention edits: applies the α schedule and the self-attention window.
    Subclasses give `edit_cross(base, edits)`: source map (h, p, t), edited maps (B-1, h, p, t)
    -> what the edited prompts' maps become (B-1, h, p, t)."""

    def __init__(self, tok, prompts, steps, cross_replace=0.8, self_replace=0.4,
                 self_max_pixels: int = 16 ** 2):
        self.B = len(prompts)
        self.tau_cross = align.cross_replace_window(tok, prompts, steps, cross_replace)  # (N+1, B-1, 77)
        self.tau_self = align.self_replace_range(steps, self_replace)   # [start, end) steps
        self.self_max_pixels = self_max_pixels

    shortcut = True            # `attend` only avoids forming M* (control.Controller.shortcut)

    def _self_active(self, site: Site) -> bool:
        return site.pixels <= self.self_max_pixels and \
            self.tau_self[0] <= site.step < self.tau_self[1]

    def wants(self, site: Site) -> bool:
        if site.kind == "cross":                       # w_t = 0 for every token: nothing to do
            return site.step is None or bool(self.tau_cross[site.step].any())
        return site.kind == "self" and self._self_active(site)

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (B-1, 77, 77), D (B-1, 77)) with edit_cross(base, edits)_b = base·A_b + edits_b·D_b."""
        raise NotImplementedError

    @functools.cached_property
    def _linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear_form()                      # fixed by the prompts: built once

    def _tail(self, src: int, tgt: list[int], rows: int) -> bool:
        """The usual layout [∅ × B, c × B]: the edited rows are the last ones, after the source."""
        return tgt == list(range(src + 1, src + self.B)) and src + self.B == rows

    def attend(self, q, k, v, site: Site):
        """Fast path, cross sites: the edited rows' output without forming M* (module docstring)."""
        fused = site.run.fused
        if fused is None or site.kind != "cross" or site.step is None:
            return None
        batch = site.batch_of(q.shape[0])
        src, tgt = batch.row(0, TEXT), [batch.row(b, TEXT) for b in range(1, self.B)]
        A, D = (t.to(v) for t in self._linear)
        w = self.tau_cross[site.step].to(v)                                # (B-1, 77)
        vt = v[tgt]                                                        # (B-1, h, 77, d)
        v_src = torch.einsum("bwn,bhnd->bhwd", A * w[:, None, :], vt)     # A_b diag(w) V_b
        srcs = [src] * len(tgt)
        new = softmax_attention(q[srcs], k[srcs], v_src, fused)
        own = w * D + 1 - w                                                # (B-1, 77)
        if own.abs().max() > 0:
            new = new + softmax_attention(q[tgt], k[tgt], own[:, None, :, None] * vt, fused)
        if self._tail(src, tgt, q.shape[0]):                               # the other rows only
            head = slice(0, src + 1)
            return torch.cat([softmax_attention(q[head], k[head], v[head], fused), new])
        out = softmax_attention(q, k, v, fused)                             # (rows, h, n, d)
        return out.index_copy(0, torch.tensor(tgt, device=out.device), new)

    def probs(self, M, site: Site):
        if site.step is None:
            raise ValueError("P2P edits follow the denoising step: call unet(..., step=i)")
        batch = site.batch_of(M.shape[0])
        src, tgt = batch.row(0, TEXT), [batch.row(b, TEXT) for b in range(1, self.B)]
        base, edits = M[src], M[tgt]                          # (h, p, t), (B-1, h, p, t)
        if site.kind == "cross":
            w = self.tau_cross[site.step].to(M)[:, None, None, :]         # (B-1, 1, 1, 77)
            new = w * self.edit_cross(base, edits) + (1 - w) * edits
        else:
            new = base.expand_as(edits)                                   # take the source's map
        if self._tail(src, tgt, M.shape[0]):
            return torch.cat([M[:src + 1], new.to(M.dtype)])              # [∅ × B, c × B]
        return M.index_copy(0, torch.tensor(tgt, device=M.device), new.to(M.dtype))

    def edit_cross(self, base, edits):
        raise NotImplementedError


class Replace(Edit):
    """Word swap: prompts with the same number of words; mapper from align.replace_mappers."""

    def __init__(self, tok, prompts, steps, **kw):
        super().__init__(tok, prompts, steps, **kw)
        self.mapper = align.replace_mappers(tok, prompts)                  # (B-1, 77, 77)

    def edit_cross(self, base, edits):
        return torch.einsum("hpw,bwn->bhpn", base, self.mapper.to(base))

    def linear_form(self):
        return self.mapper, torch.zeros(self.mapper.shape[:2])


class Refine(Edit):
    """Added/removed words: aligned target tokens take their source column, new ones keep theirs."""

    def __init__(self, tok, prompts, steps, **kw):
        super().__init__(tok, prompts, steps, **kw)
        self.mapper, self.aligned = align.refine_mappers(tok, prompts)     # (B-1, 77) each

    def edit_cross(self, base, edits):
        mapped = base[:, :, self.mapper].permute(2, 0, 1, 3)               # (B-1, h, p, 77)
        aligned = self.aligned.to(base)[:, None, None, :]                  # 1: has a source token
        return mapped * aligned + edits * (1 - aligned)

    def linear_form(self):
        a = self.aligned.float()
        A = torch.zeros(*a.shape, a.shape[1]).scatter_(                    # A[b, mapper[b, n], n]
            1, self.mapper.long().clamp(min=0)[:, None, :], a[:, None, :])
        return A, 1 - a


class Reweight(Edit):
    """Scale the cross-attention of chosen tokens of each edited prompt by factors c (no
    renormalisation; negative allowed), on top of `prev` (a Replace or Refine) or alone.
    `factors`: (B-1, 77) tensor, 1 where nothing changes (see `equalizer`)."""

    def __init__(self, tok, prompts, steps, factors, prev: Edit | None = None, **kw):
        super().__init__(tok, prompts, steps, **kw)
        self.factors, self.prev = factors, prev

    def edit_cross(self, base, edits):
        mapped = self.prev.edit_cross(base, edits) if self.prev else base.expand_as(edits)
        return mapped * self.factors.to(base)[:, None, None, :]

    def linear_form(self):
        c = self.factors.float()
        if self.prev is None:
            return torch.eye(c.shape[1]).expand(c.shape[0], -1, -1) * c[:, None, :], torch.zeros_like(c)
        A, D = self.prev.linear_form()
        return A * c[:, None, :], D * c


def equalizer(tok, prompts, reweight: dict[str, float]) -> torch.Tensor:
    """{word: c} -> (B-1, 77) factors; each word is looked up in every edited prompt."""
    eq = torch.ones(len(prompts) - 1, 77)
    for b, prompt in enumerate(prompts[1:]):
        for word, c in reweight.items():
            eq[b, tok.word_positions(prompt, word)] = float(c)
    return eq


NAME, EDITS_PICTURES = "p2p", "optional"
SUMMARY = "Prompt-to-Prompt: edit the source prompt's image by editing the attention maps"


@dataclass
class Params(RealImage):
    """Prompt-to-Prompt's parameters; the defaults are the official notebook's."""
    mode: str = param("auto", "replace: word swap (same word count); refine: words added; auto: "
                              "replace when the word counts match, else refine",
                      ("auto", "replace", "refine"))
    cross_replace: Any = param(0.8, "cross-attention window τ_c: s, (start, end), or "
                                     "{\"default_\": s, word: s}", kind="window")
    self_replace: Any = param(0.4, "self-attention window τ_s: s or (start, end)", kind="window")
    blend: list | None = param(None, "LocalBlend: a word of the source, then one of each target",
                               kind="words")
    blend_threshold: float = param(0.3, "LocalBlend threshold on the mask")
    reweight: dict | None = param(None, "scale the attention of words of the targets, e.g. "
                                        "{\"smiling\": 2}", kind="reweight")

    def check(self, prompts: list[str], s: Settings) -> None:
        self.check_real(s, Params)
        if self.mode not in ("auto", "replace", "refine"):
            raise ParameterError("mode", f"must be auto, replace or refine, got {self.mode!r}")
        if isinstance(self.self_replace, dict):
            raise ParameterError("self_replace", "takes a number (0.4) or a (start, end) pair")
        for name in ("cross_replace", "self_replace"):
            align.check_window(name, getattr(self, name))
        check_number("blend_threshold", self.blend_threshold)
        for word, c in (self.reweight or {}).items():
            check_number(f"reweight[{word!r}]", c)
        n = len(prompts) + isinstance(s.image, Inversion)
        if self.blend is not None and len(self.blend) != n:
            raise ParameterError("blend", f"needs one word per prompt ({n}), got "
                                          f"{len(self.blend)}")
        if not isinstance(s.image, Inversion):             # the words of the prompts given
            for word, prompt in zip(self.blend or [], prompts):
                if isinstance(word, str):
                    check_word("blend", word, prompt)
            for word in self.reweight or {}:
                if not any(word in words_of(p) for p in prompts[1:] or prompts):
                    raise ParameterError("reweight", f"{word!r}: the word is in none of the "
                                                     f"edited prompts; give a word of them")
        if n < 2 and (s.image is None or self.strength is not None):
            raise ParameterError("prompts", "an edit needs a SOURCE prompt and at least one "
                                            "TARGET prompt (or a picture to invert and no "
                                            "TARGET: its reconstruction)")


def build(tok, prompts, steps, mode=Params.mode, cross_replace=Params.cross_replace,
          self_replace=Params.self_replace, reweight: dict | None = None,
          blend: list | None = None, blend_threshold=Params.blend_threshold, blend_start=0.0,
          blend_subtract=None, self_max_pixels=16 ** 2, store=True,
          step_pixels: int | None = None):
    """The usual P2P controller from its parameters -> (Compose(edit, store, blend), store).

    mode: "replace" (word swap), "refine" (added words) or "auto" (replace when every prompt
    has as many words as the source, else refine). Identical prompts with `reweight` give a
    pure re-weighting. `blend`: one word (or list of words) per prompt, source first.
    `step_pixels`: the store also keeps each step's cross maps up to this size (AttentionStore).
    """
    if len(prompts) < 2:
        raise ParameterError("prompts", "an edit needs a source prompt and at least one target "
                                        "prompt")
    if mode not in ("auto", "replace", "refine"):
        raise ParameterError("mode", f"must be auto, replace or refine, got {mode!r}")
    kw = dict(cross_replace=cross_replace, self_replace=self_replace,
              self_max_pixels=self_max_pixels)
    if mode == "auto":
        counts = {len(words_of(p)) for p in prompts}
        mode = "replace" if len(counts) == 1 else "refine"
    if reweight and all(p == prompts[0] for p in prompts):
        edit = Reweight(tok, prompts, steps, equalizer(tok, prompts, reweight), **kw)
    else:
        edit = (Replace if mode == "replace" else Refine)(tok, prompts, steps, **kw)
        if reweight:
            edit = Reweight(tok, prompts, steps, equalizer(tok, prompts, reweight), prev=edit, **kw)
    st = AttentionStore(len(prompts), step_pixels=step_pixels) if (store or blend) else None
    lb = None
    if blend:
        if len(blend) != len(prompts):
            raise ParameterError("blend", f"needs one word per prompt ({len(prompts)}), got "
                                          f"{len(blend)}")
        lb = LocalBlend(tok, prompts, blend, st, steps, blend_threshold, blend_start, blend_subtract)
    return Compose(edit, st, lb), st


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    """Prompt-to-Prompt from noise, from SDEdit's noised picture, or from an inversion."""
    def make_control(model, prompts, steps, step_pixels, trajectory):
        return build(model.tokenizer, prompts, steps, p.mode, p.cross_replace, p.self_replace,
                     p.reweight, p.blend, p.blend_threshold, store=s.maps,
                     step_pixels=step_pixels)
    return edit_prompts(model, prompts, p, s, make_control)
