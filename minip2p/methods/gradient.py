"""Gradients through attention: the denoising mode that guidance methods (Attend-and-Excite,
Self-Guidance, Pix2Pix-Zero) share.

An energy E is defined on cross-attention maps M = softmax(QKᵀ/√d) (and, for appearance, on
ResBlock features). Before the guided DDIM step of a step in the method's window,

    z_t ← z_t − η · ∇_{z_t} E( maps of ε_θ(z_t, t, c) )                      (`GradientGuidance`)

then the step goes on as usual, without gradients (pipeline.sample; the update is the
controller's `before_step` hook, so nothing in the sampling loop changes).

`forward_with_grad` evaluates ε_θ with autograd on, on the rows it is given only (usually the
conditional rows: no unconditional row is ever differentiated). A `MapRecorder` is the
controller of that call: it wants only the sites the energy reads (e.g. cross-attention at ≤ 16²
pixels), so those maps are formed explicitly and stay in the graph, while every other site keeps
the model's fused kernel when the fast path is installed (`F.scaled_dot_product_attention`,
which has a backward; the oneDNN linear layers of fast/kernels.py step aside by themselves when
grad is on). The UNet's weights never require
grad (checkpoint.py), so the graph keeps only what ∇_z needs. When nothing after the last wanted
attention site is needed (no features asked), the forward stops there (`StopForward`): the
decoder's finer levels are neither run nor kept (their ε is not used by the energy).

Peak memory of each method is measured by `python -m tools.eval_guidance --cost` (figures in
tools/README.md).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..conditioning import eps as unet_eps
from ..control import Controller, Site
from ..guidance import TEXT, GuidanceBatch

__all__ = ["StopForward", "MapRecorder", "forward_with_grad", "GradientGuidance", "cond_rows",
           "head_mean"]


class StopForward(Exception):
    """Raised by a `MapRecorder` once the last map the energy reads has been formed."""


class MapRecorder(Controller):
    """Keeps the maps M (rows, heads, pixels, keys) of the sites `pick(site)` accepts, in the
    autograd graph (`maps`: list of (site, M)); `feature_pick`: also ResBlock features h at "res"
    sites (`feats`: list of (site, h)). `stop_after`: the Site.index after whose cross map the
    forward may stop (None: run the whole UNet)."""

    def __init__(self, pick: Callable[[Site], bool],
                 feature_pick: Callable[[Site], bool] | None = None, stop_after: int | None = None):
        self.pick, self.feature_pick, self.stop_after = pick, feature_pick, stop_after
        self.maps: list[tuple[Site, torch.Tensor]] = []
        self.feats: list[tuple[Site, torch.Tensor]] = []

    def wants(self, site: Site) -> bool:
        if site.kind == "res":
            return self.feature_pick is not None and self.feature_pick(site)
        return self.pick(site)

    def probs(self, M, site):
        self.maps.append((site, M))
        if site.kind == "cross" and site.index == self.stop_after:
            raise StopForward
        return M

    def features(self, h, site):
        self.feats.append((site, h))
        return h


def forward_with_grad(model, z: torch.Tensor, t, context: torch.Tensor, recorder: MapRecorder,
                      batch: GuidanceBatch, step: int | None = None, steps: int | None = None):
    """ε_θ(z, t, context) with autograd on (with the model's ControlNets, at `step` of `steps`).
    z: the rows to differentiate (rows, 4, h, w), a new leaf is made of it. Returns (leaf z, ε or
    None if the forward stopped early); the recorder holds the maps, in the graph of the leaf."""
    z = z.detach().clone().requires_grad_(True)
    eps = None
    with torch.enable_grad():
        try:
            eps = unet_eps(model, z.to(model.dtype), t, context.to(model.dtype), recorder, step,
                           batch, at=None if step is None or steps is None else (step, steps))
        except StopForward:
            pass
    return z, eps


def cond_rows(images: int) -> GuidanceBatch:
    """One conditional row per image, no unconditional row: what an energy differentiates."""
    return GuidanceBatch(tuple((b, TEXT) for b in range(images)))


def head_mean(maps: list[torch.Tensor], row: int = 0) -> torch.Tensor:
    """The maps of one row over several layers (each (rows, heads, p, keys)) -> (p, keys): the
    mean over every head of every layer (the Attend-and-Excite reference's aggregation)."""
    return torch.cat([M[row] for M in maps]).mean(0)


class GradientGuidance(Controller):
    """Base: `before_step` updates z_t by `update(z, step, t)` at the steps where `active(step)`.
    Subclasses read maps with `self.maps_of(z, step)` and return the new z_t."""

    def __init__(self, model, cond: torch.Tensor, steps: int,
                 pick: Callable[[Site], bool] | None = None):
        self.model, self.cond, self.steps = model, cond, steps
        self.timesteps = model.scheduler.timesteps(steps)
        self.pick = pick or (lambda s: s.kind == "cross" and s.pixels <= 16 ** 2)
        self.stop_after = None                  # learnt on the first full pass
        self.energies: dict[int, float] = {}    # step -> last energy, for reports and tests

    def active(self, step: int) -> bool:
        return True

    def before_step(self, z, step):
        if not self.active(step):
            return z
        return self.update(z, step, self.timesteps[step]).detach()

    def update(self, z: torch.Tensor, step: int, t) -> torch.Tensor:
        raise NotImplementedError

    def maps_of(self, z: torch.Tensor, step: int, images: list[int] | None = None,
                feature_pick=None):
        """z (n, 4, h, w) of the images `images` (default: all), each under its own prompt ->
        (leaf z, recorder) after ε_θ with gradients on the conditional rows."""
        images = list(range(z.shape[0])) if images is None else images
        rec = MapRecorder(self.pick, feature_pick,
                          None if feature_pick is not None else self.stop_after)
        context = self.cond[[b if self.cond.shape[0] > 1 else 0 for b in images]]
        leaf, _ = forward_with_grad(self.model, z, self.timesteps[step], context, rec,
                                    cond_rows(len(images)), step, self.steps)
        if self.stop_after is None and feature_pick is None:
            self.stop_after = max(s.index for s, _ in rec.maps if s.kind == "cross")
        return leaf, rec
