"""Prompt-to-Prompt controllers (Hertz et al., ICLR 2023): small objects that look at the
attention probabilities M = softmax(QKᵀ/√d) inside the UNet and return the M to use.

The UNet calls `controller(M, site)` at every attention layer whose `controller.wants(site)`
(see attention.py). M has shape (2B, heads, pixels, tokens) for B prompts: rows [0, B) are the
unconditional half of the guidance batch and are never touched; rows [B, 2B) are the prompts,
source first (P) then the edited prompts (P*_1 … P*_{B-1}). `site.step` is the denoising step.

    Replace   M*[…, n] = Σ_w M[…, w] · mapper[w, n]                   word swap        (§3.2)
    Refine    M*[…, n] = M[…, mapper[n]] where aligned, else own     adding a phrase
    Reweight  M*[…, n] = c_n · Edit(M)[…, n]                         attention re-weighting
    schedule  M* ← α_t · Edit(M) + (1 − α_t) · M*  (α from align.cross_replace_alpha)
    self-attn M*_self ← M_self  while step ∈ self window and pixels ≤ self_max_pixels (16²)
    LocalBlend  after each step: z* ← z + mask · (z* − z)  with the mask from stored maps

Controllers compose with `Compose(edit, store, blend)`: the edit runs first, so the store keeps
the edited maps -- as the official code does (it stores a tensor it then edits in place).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import align
from .attention import Site


def _split(probs, B):
    """(2B, h, p, t) -> unconditional rows, source row (h, p, t), edited rows (B-1, h, p, t)."""
    return probs[:B], probs[B], probs[B + 1:]


class AttentionStore:
    """Sums, over steps, the prompts' attention maps at sites with ≤ max_pixels query pixels
    (32² by default, as the reference), averaged over heads: sums[key] is (B, pixels, tokens)."""

    def __init__(self, n_prompts: int, max_pixels: int = 32 ** 2):
        self.B, self.max_pixels = n_prompts, max_pixels
        self.sums: dict[tuple, torch.Tensor] = {}
        self.steps_seen: set[int] = set()

    @staticmethod
    def key(site: Site) -> tuple:
        return site.place, site.block, site.layer, site.depth, site.kind, site.pixels

    def wants(self, site: Site) -> bool:
        return site.pixels <= self.max_pixels

    def __call__(self, probs, site: Site):
        maps = probs[self.B:].float().mean(dim=1)                       # (B, pixels, tokens)
        k = self.key(site)
        self.sums[k] = self.sums[k] + maps if k in self.sums else maps
        self.steps_seen.add(site.step)
        return probs

    def resolutions(self, kind: str = "cross", places=("up", "down")) -> list[int]:
        """Pixel counts of the stored resolutions of this kind, coarsest first."""
        return sorted({p for (place, *_, k, p) in self.sums if k == kind and place in places})

    def coarsest(self, kind: str = "cross", places=("up", "down")) -> int | None:
        """Pixel count of the coarsest stored resolution (16² at 512 px: the maps the P2P
        reference views and blends with), or None if nothing is stored."""
        return next(iter(self.resolutions(kind, places)), None)

    def average(self, kind: str = "cross", pixels: int | None = None, places=("up", "down")):
        """Mean over steps and over the matching layers: (B, pixels, tokens). Layers of one
        resolution only: `pixels`, by default the coarsest stored."""
        pixels = pixels or self.coarsest(kind, places)
        picked = [v for (place, *_, k, p), v in self.sums.items()
                  if k == kind and place in places and (pixels is None or p == pixels)]
        if not picked:
            raise ValueError(f"no stored {kind}-attention maps at {pixels} pixels in {places}")
        return torch.stack(picked).mean(0) / max(len(self.steps_seen), 1)


class Edit:
    """Base of the cross-attention edits: applies the α schedule and the self-attention window.
    Subclasses give `edit_cross(base, edits)`: source map (h, p, t), edited maps (B-1, h, p, t)
    -> what the edited prompts' maps become (B-1, h, p, t)."""

    def __init__(self, tok, prompts, steps, cross_replace=0.8, self_replace=0.4,
                 self_max_pixels: int = 16 ** 2):
        self.B = len(prompts)
        self.alpha = align.cross_replace_alpha(tok, prompts, steps, cross_replace)  # (N+1, B-1, 77)
        self.self_range = align.self_replace_range(steps, self_replace)
        self.self_max_pixels = self_max_pixels

    def _self_active(self, site: Site) -> bool:
        return site.pixels <= self.self_max_pixels and \
            self.self_range[0] <= site.step < self.self_range[1]

    def wants(self, site: Site) -> bool:
        return site.kind == "cross" or self._self_active(site)

    def __call__(self, probs, site: Site):
        if site.step is None:
            raise ValueError("P2P edits follow the denoising step: call unet(..., step=i)")
        uncond, base, edits = _split(probs, self.B)
        if site.kind == "cross":
            a = self.alpha[site.step].to(probs)[:, None, None, :]         # (B-1, 1, 1, 77)
            new = a * self.edit_cross(base, edits) + (1 - a) * edits
        elif self._self_active(site):
            new = base.expand_as(edits)                                   # take the source's map
        else:
            return probs
        return torch.cat([uncond, base[None], new.to(probs.dtype)])

    def edit_cross(self, base, edits):
        raise NotImplementedError


class Replace(Edit):
    """Word swap: prompts with the same number of words; mapper from align.replace_mappers."""

    def __init__(self, tok, prompts, steps, **kw):
        super().__init__(tok, prompts, steps, **kw)
        self.mapper = align.replace_mappers(tok, prompts)                  # (B-1, 77, 77)

    def edit_cross(self, base, edits):
        return torch.einsum("hpw,bwn->bhpn", base, self.mapper.to(base))


class Refine(Edit):
    """Added/removed words: aligned target tokens take their source column, new ones keep theirs."""

    def __init__(self, tok, prompts, steps, **kw):
        super().__init__(tok, prompts, steps, **kw)
        self.mapper, self.tok_alpha = align.refine_mappers(tok, prompts)   # (B-1, 77) each

    def edit_cross(self, base, edits):
        mapped = base[:, :, self.mapper].permute(2, 0, 1, 3)               # (B-1, h, p, 77)
        a = self.tok_alpha.to(base)[:, None, None, :]
        return mapped * a + edits * (1 - a)


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


def equalizer(tok, prompts, reweight: dict[str, float]) -> torch.Tensor:
    """{word: c} -> (B-1, 77) factors; each word is looked up in every edited prompt."""
    eq = torch.ones(len(prompts) - 1, 77)
    for b, prompt in enumerate(prompts[1:]):
        for word, c in reweight.items():
            eq[b, tok.word_positions(prompt, word)] = float(c)
    return eq


class LocalBlend:
    """Keep everything outside the edited object: after each step (from `start` on),
    z*_b ← z_0 + mask_b · (z*_b − z_0), mask_b = M(source words) ∨ M(words of prompt b).

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
        self.alpha = self._token_mask(tok, prompts, words)                 # (B, 77)
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
        s = round((z.shape[2] * z.shape[3] / pixels) ** 0.5)                # latent px per map px
        maps = (maps * tokens.to(maps)[:, None, :]).sum(-1)                # (B, p)
        maps = maps.reshape(-1, 1, z.shape[2] // s, z.shape[3] // s)
        if pool:
            maps = F.max_pool2d(maps, 3, stride=1, padding=1)
        maps = F.interpolate(maps, size=z.shape[2:])                       # nearest
        maps = maps / maps.amax(dim=(2, 3), keepdim=True)
        return maps > threshold                                            # (B, 1, h, w)

    def after_step(self, z, step):
        if step < self.start:
            return z
        mask = self._mask(z, self.alpha, self.threshold, pool=True)
        mask = mask[:1] | mask                                             # source ∨ own
        if self.sub is not None:                       # subtracted: also source ∨ own (official)
            sub = self._mask(z, self.sub, self.sub_threshold, pool=False)
            mask = mask & ~(sub[:1] | sub)
        return z[:1] + mask.to(z) * (z - z[:1])


class Compose:
    """Several controllers in order (edit, then store, then blend). `wants` is the union."""

    def __init__(self, *controllers):
        self.controllers = [c for c in controllers if c is not None]

    def wants(self, site):
        return any(c.wants(site) for c in self.controllers if hasattr(c, "wants"))

    def __call__(self, probs, site):
        for c in self.controllers:
            if hasattr(c, "wants") and c.wants(site):
                probs = c(probs, site)
        return probs

    def after_step(self, z, step):
        for c in self.controllers:
            if hasattr(c, "after_step"):
                z = c.after_step(z, step)
        return z


def build(tok, prompts, steps, mode="auto", cross_replace=0.8, self_replace=0.4,
          reweight: dict | None = None, blend: list | None = None, blend_threshold=0.3,
          blend_start=0.0, blend_subtract=None, self_max_pixels=16 ** 2, store=True):
    """The usual P2P controller from options -> (Compose(edit, store, blend), store).

    mode: "replace" (word swap), "refine" (added words) or "auto" (replace when every prompt
    has as many words as the source, else refine). Identical prompts with `reweight` give a
    pure re-weighting. `blend`: one word (or list of words) per prompt, source first.
    """
    from .errors import MinipError
    if len(prompts) < 2:
        raise MinipError("an edit needs a source prompt and at least one target prompt")
    if mode not in ("auto", "replace", "refine"):
        raise MinipError(f"unknown edit mode {mode!r}; use auto, replace or refine")
    kw = dict(cross_replace=cross_replace, self_replace=self_replace,
              self_max_pixels=self_max_pixels)
    if mode == "auto":
        counts = {len(p.split(" ")) for p in prompts}
        mode = "replace" if len(counts) == 1 else "refine"
    if reweight and all(p == prompts[0] for p in prompts):
        edit = Reweight(tok, prompts, steps, equalizer(tok, prompts, reweight), **kw)
    else:
        edit = (Replace if mode == "replace" else Refine)(tok, prompts, steps, **kw)
        if reweight:
            edit = Reweight(tok, prompts, steps, equalizer(tok, prompts, reweight), prev=edit, **kw)
    st = AttentionStore(len(prompts)) if (store or blend) else None
    lb = None
    if blend:
        if len(blend) != len(prompts):
            raise MinipError(f"--blend needs one word per prompt ({len(prompts)}), got {len(blend)}")
        lb = LocalBlend(tok, prompts, blend, st, steps, blend_threshold, blend_start, blend_subtract)
    return Compose(edit, st, lb), st
