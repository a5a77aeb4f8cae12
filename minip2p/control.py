"""The control surface: where a controller may look into (and change) the forward pass.

A controller is an explicit argument of the sampling loop, handed down to every layer of the UNet;
nothing is patched into the model. Each call site is described by a `Site`, and a hook runs only
where the controller's `wants(site)` is true -- on the explicit and the fast path alike:

    probs(M, site) -> M'           attention sites ("self"/"cross"): between the softmax
                                   M = softmax(QKᵀ/√d) and the product with V (Prompt-to-Prompt)
    attend(q, k, v, site) -> out   attention sites: return the attention output itself, or None
                                   to let the layer compute it (MasaCtrl: softmax(Q K_srcᵀ/√d)·V_src)
    features(h, site) -> h'        "res" sites: a ResBlock's residual branch after conv2, before
                                   the skip is added (plug-and-play's feature injection);
                                   the "h" site: the mid block's output h, Asyrp's h-space;
                                   [h; h + Δh] (k copies' rows) runs the decoder once per copy
                                   with the same skips, so ε comes with ε̃ (methods/asyrp.py)
    before_step(z, step) -> z'     the latents (B, 4, h, w) before / after each denoising step
    after_step(z, step) -> z'      (LocalBlend; pinning the source to an inversion trajectory)

A `Site` says where and when a hook is called, nothing else. How the UNet call runs travels in
one `Run`, built once per call and handed to every hook as `site.run`: the rows of the batch
(`run.batch`, a `guidance.GuidanceBatch`: a controller asks `site.batch_of(n)` which row is the
source, which are the edits, which the unconditional half), the precision of the maps
(`run.upcast`) and the fused attention kernel the model has installed (`run.fused`, see
minip2p/fast/; None: explicit), which a hook that computes attention itself may use too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .guidance import TEXT, GuidanceBatch


@dataclass(frozen=True)
class Run:
    """How one UNet call runs, the same at every site of it.

    batch:  what each row of the UNet batch holds (None: a call outside a sampling loop)
    upcast: the model forms QKᵀ and the softmax in fp32 (SD 2.x's upcast_attention)
    fused:  the fused attention kernel fused(q, k, v, mask=None) -> softmax(QKᵀ/√d + mask)·V
            that the fast path installed on the model (minip2p/fast/), or None: explicit.
            `attention.softmax_attention(q, k, v, site.run.fused, site.run.upcast)` uses it.
    """
    batch: GuidanceBatch | None = None
    upcast: bool = False
    fused: Callable | None = None


@dataclass(frozen=True)
class Site:
    """Where a hook is called.

    place:  "down", "mid" or "up"
    block:  index of the UNet block within its place (down_blocks[block] ...)
    layer:  index within that block: transformer attentions[layer] or ResBlock resnets[layer]
    depth:  index of the transformer block inside the spatial transformer (0 for SD 1.x)
    kind:   "self" (attn1: pixels attend to pixels), "cross" (attn2: pixels attend to tokens)
            "res" (a ResBlock's residual branch) or "h" (the mid block's output, place "mid")
    pixels: number of positions, h·w (4096 = 64² ... 64 = 8² at 512 px)
    step:   index of the denoising step, 0 .. steps-1 (None outside a sampling loop)
    index:  attention sites: the transformer block's place in the UNet's forward order, 0 … n−1
            (SD 1.x: 16, down 0–5, mid 6, up 7–15); None at "res" sites
    run:    how this UNet call runs (`Run`: batch, upcast, fused); not part of the place
    """
    place: str
    block: int
    layer: int
    depth: int
    kind: str
    pixels: int
    step: int | None = None
    index: int | None = field(default=None, compare=False)
    run: Run = field(default_factory=Run, compare=False, repr=False)

    @property
    def name(self) -> str:
        """A readable, unique label, e.g. 'down1.0.cross@32x32'."""
        side = int(round(self.pixels ** 0.5))
        return f"{self.place}{self.block}.{self.layer}.{self.kind}@{side}x{side}"

    def batch_of(self, n_rows: int) -> GuidanceBatch:
        """The batch description; for a bare call of n rows, the usual [∅ × n/2, c × n/2]."""
        return self.run.batch or GuidanceBatch.cfg_layout(n_rows // 2)


def map_shape(pixels: int, latent: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a site with `pixels` positions in a UNet run on latents (h, w): each
    level halves both sides, rounding up (the stride-2 convolutions), so any size works."""
    h, w = latent
    while h * w > pixels:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != pixels:
        raise ValueError(f"no UNet level of latents {latent[0]}×{latent[1]} has {pixels} pixels")
    return h, w


class Controller:
    """Base class: every hook is a no-op, and `wants` nothing. Subclasses override what they use.

    `shortcut`: True when `attend` only computes what `probs` would give without forming M (P2P's
    fused edits); `Compose` then skips it at sites another controller wants, whose `probs` needs M.
    """

    shortcut = False

    def wants(self, site: Site) -> bool:
        """Should the hooks of this site be called?"""
        return False

    def probs(self, M: torch.Tensor, site: Site) -> torch.Tensor:
        """M: (rows, heads, pixels, keys). Return the M to multiply with V."""
        return M

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site):
        """q: (rows, heads, n, d); k, v: (rows, heads, m, d) -> output (rows, heads, n, d) or None."""
        return None

    def features(self, h: torch.Tensor, site: Site) -> torch.Tensor:
        """h: a ResBlock's residual branch (rows, c, h, w): return the branch to add to the skip;
        or, at the "h" site, the bottleneck: return it (or k·rows rows: k copies to decode)."""
        return h

    def before_step(self, z: torch.Tensor, step: int) -> torch.Tensor:
        """z_t (B, 4, h, w) before denoising step `step`."""
        return z

    def after_step(self, z: torch.Tensor, step: int) -> torch.Tensor:
        """z_{t−1} (B, 4, h, w) after denoising step `step`."""
        return z


class Compose(Controller):
    """Several controllers in order (e.g. edit, then store, then blend): each hook runs every
    controller that wants the site, in order; `attend` takes the first output given, skipping a
    controller whose `attend` is only a `shortcut` (P2P's fused edits) when others want the site."""

    def __init__(self, *controllers: Controller | None):
        self.controllers = [c for c in controllers if c is not None]

    def wants(self, site):
        return any(c.wants(site) for c in self.controllers)

    def probs(self, M, site):
        for c in self.controllers:
            if c.wants(site):
                M = c.probs(M, site)
        return M

    def attend(self, q, k, v, site):
        wanting = [c for c in self.controllers if c.wants(site)]
        for c in wanting:
            if c.shortcut and len(wanting) > 1:
                continue                # a shortcut would hide the maps from the others' probs
            out = c.attend(q, k, v, site)
            if out is not None:
                return out
        return None

    def features(self, h, site):
        for c in self.controllers:
            if c.wants(site):
                h = c.features(h, site)
        return h

    def before_step(self, z, step):
        for c in self.controllers:
            z = c.before_step(z, step)
        return z

    def after_step(self, z, step):
        for c in self.controllers:
            z = c.after_step(z, step)
        return z


class AttentionStore(Controller):
    """Sums, over steps, the prompts' attention maps at sites with ≤ max_pixels query pixels
    (32² by default, as the P2P reference), averaged over heads: sums[key] is (B, pixels, keys)
    for the B images' conditional rows.

    `step_pixels`: also keep each step's cross-attention maps at sites with ≤ step_pixels pixels
    (the coarse ones: 16² at 512 px, 0.8 MB a step for two prompts), per_step[step][key]
    (B, pixels, keys), for attention through time (`at_step`). None (default): only the sums."""

    def __init__(self, n_prompts: int, max_pixels: int = 32 ** 2, step_pixels: int | None = None):
        self.B, self.max_pixels, self.step_pixels = n_prompts, max_pixels, step_pixels
        self.sums: dict[tuple, torch.Tensor] = {}
        self.per_step: dict[int, dict[tuple, torch.Tensor]] = {}
        self.steps_seen: set[int] = set()

    @staticmethod
    def key(site: Site) -> tuple:
        return site.place, site.block, site.layer, site.depth, site.kind, site.pixels

    def wants(self, site: Site) -> bool:
        return site.kind in ("self", "cross") and site.pixels <= self.max_pixels

    def probs(self, M, site: Site):
        rows = site.batch_of(M.shape[0]).rows_of(cond=TEXT)
        maps = M[rows].float().mean(dim=1)                              # (B, pixels, keys)
        k = self.key(site)
        self.sums[k] = self.sums[k] + maps if k in self.sums else maps
        self.steps_seen.add(site.step)
        if self.step_pixels and site.kind == "cross" and site.pixels <= self.step_pixels:
            self.per_step.setdefault(site.step, {})[k] = maps
        return M

    __call__ = probs            # store(M, site): the store is also used on its own

    def resolutions(self, kind: str = "cross", places=("up", "down")) -> list[int]:
        """Pixel counts of the stored resolutions of this kind, coarsest first."""
        return sorted({p for (place, *_, k, p) in self.sums if k == kind and place in places})

    def coarsest(self, kind: str = "cross", places=("up", "down")) -> int | None:
        """Pixel count of the coarsest stored resolution (16² at 512 px: the maps the P2P
        reference views and blends with), or None if nothing is stored."""
        return next(iter(self.resolutions(kind, places)), None)

    def average(self, kind: str = "cross", pixels: int | None = None, places=("up", "down")):
        """Mean over steps and over the matching layers: (B, pixels, keys). Layers of one
        resolution only: `pixels`, by default the coarsest stored."""
        pixels = pixels or self.coarsest(kind, places)
        picked = [v for (place, *_, k, p), v in self.sums.items()
                  if k == kind and place in places and (pixels is None or p == pixels)]
        if not picked:
            raise ValueError(f"no stored {kind}-attention maps at {pixels} pixels in {places}")
        return torch.stack(picked).mean(0) / max(len(self.steps_seen), 1)

    def at_step(self, step: int, pixels: int | None = None, places=("up", "down")):
        """One step's cross-attention maps, mean over the layers of one resolution (by default
        the coarsest kept): (B, pixels, keys). Needs `step_pixels`."""
        kept = self.per_step.get(step)
        if not kept:
            raise ValueError(f"no per-step maps kept for step {step}: "
                             "AttentionStore(step_pixels=…)")
        pixels = pixels or min(p for (place, *_, p) in kept if place in places)
        picked = [v for (place, *_, p), v in kept.items() if place in places and p == pixels]
        if not picked:
            raise ValueError(f"no per-step cross-attention maps at {pixels} pixels in {places}")
        return torch.stack(picked).mean(0)


class PinSource(Controller):
    """Real images: before each step the source image (row 0 of the latents) is set to the DDIM
    inversion latent of that step, so the source follows the picture's own trajectory while the
    edits are generated beside it (MasaCtrl's `ref_intermediate_latents`; plug-and-play).

    trajectory: [z_0, z_1, …, z_T] from `invert.ddim_invert` (N + 1 latents); step i of N runs at
    timestep τ_{N−i}, so it starts from trajectory[N − i]. `start`: steps skipped (SDEdit)."""

    def __init__(self, trajectory: list[torch.Tensor], start: int = 0):
        self.trajectory, self.start = trajectory, start

    def before_step(self, z, step):
        n = len(self.trajectory) - 1
        pinned = self.trajectory[n - self.start - step].to(z)
        return torch.cat([pinned.expand(1, *z.shape[1:]), z[1:]])
