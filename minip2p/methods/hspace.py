"""h-space: the UNet's bottleneck h (the mid block's output) as a semantic latent space, and
Asyrp's asymmetric reverse process (Kwon et al., ICLR 2023, arXiv 2210.10960).

An edit adds Δh_t to h at the "h" site of the control surface (control.py); the decoder runs on
h + Δh with the *unchanged* skip connections, giving ε̃ = ε_θ(z_t | Δh_t) beside ε = ε_θ(z_t). With
P_t(ε) = (z_t − √(1−ᾱ_t)·ε)/√ᾱ_t, for t ≥ t_edit (η = 0):

    z_{t−1} = √ᾱ_{t−1}·P_t(ε̃) + √(1−ᾱ_{t−1})·ε                        (asymmetric)
    z_{t−1} = √ᾱ_{t−1}·P_t(ε̃) + √(1−ᾱ_{t−1}−σ²)·ε + σ·n                (η > 0, σ as DDIM's)

below t_edit ε̃ = ε (plain DDIM); below t_boost η = 1 ("quality boosting": stochastic noise
hides the small artefacts). The equation itself lives in samplers/ddim.py (`DDIM.step` with
`direction`). Haas et al. (2023) add Δh in both terms (`asymmetric=False`: ε = ε̃).

Design: one UNet call per step gives both. `HShift.features` returns [h; h + w_b·Δh_t] (the
rows of each image b get their own weight w_b, 0 for the unedited source), so the UNet decodes
both copies with the same skips in one batch (model/unet.py) and ε, ε̃ are its two halves. Δh is
added to the unconditional and the conditional rows alike (as semantic-diffusion's SD code);
each half is then classifier-free guided.

A stored direction is a list of Δh_t, one per timestep of the schedule it was made on; at
another step count the nearest stored timestep is used and Δh scaled by n_made / n_used, as the
official code scales by n_train_step / n_test_step.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..control import Compose, Controller, Site
from ..guidance import TEXT, UNCOND, GuidanceBatch

__all__ = ["HShift", "HRecorder", "sample"]


class HShift(Controller):
    """Adds w_b·Δh_t to the bottleneck h of image b's rows.

    delta(h, step) -> Δh_t (broadcastable to h's rows: (C, H, W) for a stored direction, or
    (rows, C, H, W) from a network f_t(h)); weights: w_b per image (B,);
    asymmetric: return [h; h + Δh] (ε and ε̃ from one call), else only h + Δh (ε̃ in both terms).
    """

    def __init__(self, delta: Callable[[torch.Tensor, int], torch.Tensor], weights,
                 asymmetric: bool = True):
        self.delta, self.asymmetric = delta, asymmetric
        self.weights = torch.as_tensor(weights, dtype=torch.float32)

    def wants(self, site: Site) -> bool:
        return site.kind == "h" and site.step is not None

    def features(self, h, site):
        rows = site.batch_of(h.shape[0]).image_of_rows()
        w = self.weights.to(h)[rows][:, None, None, None]                   # (rows, 1, 1, 1)
        edited = h + w * self.delta(h, site.step).to(h)
        return torch.cat([h, edited]) if self.asymmetric else edited


class HRecorder(Controller):
    """Keeps h of every step: h[step] (rows, C, H, W) on the CPU, and the batch of the call."""

    def __init__(self):
        self.h: dict[int, torch.Tensor] = {}
        self.batch: GuidanceBatch | None = None

    def wants(self, site: Site) -> bool:
        return site.kind == "h" and site.step is not None

    def features(self, h, site):
        self.h[site.step], self.batch = h.detach().float().cpu(), site.batch_of(h.shape[0])
        return h

    def stacked(self, cond: str = TEXT) -> torch.Tensor:
        """h of each image under `cond` over the steps: (B, steps, C, H, W)."""
        rows = [self.batch.row(b, cond) for b in range(self.batch.images)]
        return torch.stack([self.h[i][rows] for i in sorted(self.h)], dim=1)


@torch.no_grad()
def sample(model, cond: torch.Tensor, uncond: torch.Tensor, z: torch.Tensor, steps: int,
           guidance: float, shift: HShift | None = None, t_edit: int = 0, t_boost: int = 0,
           seed: int = 0, record: HRecorder | None = None, progress: bool = False,
           start: int = 0) -> torch.Tensor:
    """The Asyrp loop: z_T (1 or B, 4, h, w) -> z_0 (B, 4, h, w), B = cond's prompts.

    `shift` edits h at timesteps t ≥ t_edit; below t_boost each step is stochastic (η = 1) with
    noise drawn from a generator seeded `seed`, one noise shared by the B images, so an unedited
    image (weight 0) and its edits differ by the edit alone. `record` keeps h of every step
    (before any shift). `start`: steps of the schedule skipped (from an inversion's z_t)."""
    sched = model.scheduler
    B = cond.shape[0]
    batch = GuidanceBatch.cfg_layout(B)
    z = z.float().expand(B, *z.shape[1:]).clone().to(model.device)
    gen = torch.Generator("cpu").manual_seed(int(seed) + 1)
    context = batch.context({UNCOND: uncond, TEXT: cond})
    timesteps = sched.timesteps(steps)
    for i, t in enumerate(tqdm(timesteps[start:], disable=not progress, desc="asyrp")):
        step = start + i
        control = Compose(record, shift if shift is not None and t >= t_edit else None)
        eps = model.unet(batch.expand(z).to(model.dtype), t, context, control=control,
                         step=step, batch=batch).float()
        eps_edit = batch.guide(eps[-batch.size:], guidance)                  # ε̃ (or ε)
        eps = batch.guide(eps[:batch.size], guidance)                        # ε
        eta = 1.0 if t < t_boost else 0.0
        noise = torch.randn(z[:1].shape, generator=gen).to(z).expand_as(z) if eta else None
        z = sched.step(eps_edit, t, z, steps, eta, noise, direction=eps)
    return z
