"""EDICT: exact inversion with coupled transformations (Wallace, Gokul & Naik, CVPR 2023,
arXiv 2211.12446; salesforce/EDICT `edict_functions.py`, `coupled_stablediffusion`).

Two latent sequences x and y, both z_0 at the start of the inversion, are updated in turn, each
from the noise predicted at the other, then mixed (p = 0.93):

    a_t = √(ᾱ_{t'} / ᾱ_t),   b_t = √(1 − ᾱ_{t'}) − a_t·√(1 − ᾱ_t),   t' = t − 1000/N
    ε(z) = ε_θ(z, t, ∅) + g·(ε_θ(z, t, c) − ε_θ(z, t, ∅))

    denoising step i (t → t'):  i even:  x ← a·x + b·ε(y),  then  y ← a·y + b·ε(x)
                                i odd:   y ← a·y + b·ε(x),  then  x ← a·x + b·ε(y)   (leapfrog)
                                x ← p·x + (1 − p)·y,  then  y ← (1 − p)·x + p·y          (mixing)

Every line is an affine map of the member it changes whose coefficients depend only on the other
member, so each is undone exactly in the reverse order (the inversion, t' → t, ascending t):

    y ← (y − (1 − p)·x) / p,   x ← (x − (1 − p)·y) / p
    the member updated second in step i first:  m ← (m − b·ε(other)) / a,  then the other

The pair (x_T, y_T) of the picture's inversion under the source prompt reproduces z_0 when
denoised with the same prompt and guidance, up to float rounding (the latents are float64, as the
official code). An edit denoises the pair with [source, targets] in one batch -- the source row
reconstructs the picture and a controller (Prompt-to-Prompt, MasaCtrl) edits the other rows --
and keeps x. Each step calls the UNet twice, both with the step's index, so a controller sees
each step twice (an AttentionStore sums both). Differences from the official code: the inversion
runs over all N steps (the official edit inverts 80 %), at the run's guidance (official 3), and
t' = t − ⌊1000/N⌋ (the official interpolates ᾱ at t − 1000/N, the same when N divides 1000);
the diffusers community pipeline picks the leapfrog order by i mod 2 of its own loop, exact only
for even N.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..guidance import UNCOND, TEXT, GuidanceBatch

P = 0.93                                    # the mixing weight p (official default)


def coefficients(sched, t: int, steps: int) -> tuple[float, float]:
    """(a_t, b_t) of the step t → t' in float64."""
    a_t, a_p = sched.alpha(t).double(), sched.alpha(sched.prev(t, steps)).double()
    a = (a_p / a_t).sqrt()
    return a.item(), ((1 - a_p).sqrt() - a * (1 - a_t).sqrt()).item()


def _eps(model, z, t, context, batch, guidance, control, step):
    """Guided ε of every image of z (B, 4, h, w) in float64."""
    eps = model.unet(batch.expand(z).to(model.dtype), t, context, control=control, step=step,
                     batch=batch)
    return batch.guide(eps.double(), guidance)


@torch.no_grad()
def invert(model, z0: torch.Tensor, cond: torch.Tensor, empty: torch.Tensor, steps: int,
           guidance: float, p: float = P, progress: bool = True):
    """z_0 (1, 4, h, w) -> (x_T, y_T), each (1, 4, h, w) float64; cond, empty: (1, 77, d)."""
    sched, batch = model.scheduler, GuidanceBatch.cfg_layout(1)
    context = batch.context({UNCOND: empty, TEXT: cond}).to(model.dtype)
    eps = lambda z, t: _eps(model, z, t, context, batch, guidance, None, None)  # noqa: E731
    x = y = z0.double()
    ts = sched.timesteps(steps)
    for i, t in enumerate(tqdm(ts[::-1], disable=not progress, desc="EDICT inversion")):
        step = steps - 1 - i                                  # the denoising step undone
        a, b = coefficients(sched, t, steps)
        y = (y - (1 - p) * x) / p                             # undo the mixing
        x = (x - (1 - p) * y) / p
        if step % 2 == 0:                                     # x then y was done: undo y first
            y = (y - b * eps(x, t)) / a
            x = (x - b * eps(y, t)) / a
        else:
            x = (x - b * eps(y, t)) / a
            y = (y - b * eps(x, t)) / a
    return x, y


@torch.no_grad()
def generate(model, x: torch.Tensor, y: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
             steps: int, guidance: float, p: float = P, control=None, progress: bool = True):
    """Denoise the pair (x_T, y_T) (1 or B, 4, h, w) with prompts `cond` (B, 77, d) and ∅
    `uncond` (1, 77, d) -> x_0 (B, 4, h, w) fp32. The controller's before/after_step hooks
    see x and y in turn."""
    sched, B = model.scheduler, cond.shape[0]
    batch = GuidanceBatch.cfg_layout(B)
    context = batch.context({UNCOND: uncond, TEXT: cond}).to(model.dtype)
    x = x.double().expand(B, *x.shape[1:]).clone().to(model.device)
    y = y.double().expand(B, *y.shape[1:]).clone().to(model.device)
    hook = (lambda name, z, i: getattr(control, name)(z, i)) if control is not None else \
        (lambda name, z, i: z)
    for i, t in enumerate(tqdm(sched.timesteps(steps), disable=not progress, desc="EDICT")):
        x, y = hook("before_step", x, i), hook("before_step", y, i)
        eps = lambda z: _eps(model, z, t, context, batch, guidance, control, i)  # noqa: E731
        a, b = coefficients(sched, t, steps)
        if i % 2 == 0:
            x = a * x + b * eps(y)
            y = a * y + b * eps(x)
        else:
            y = a * y + b * eps(x)
            x = a * x + b * eps(y)
        x = p * x + (1 - p) * y                               # mixing
        y = (1 - p) * x + p * y
        x, y = hook("after_step", x, i), hook("after_step", y, i)
    return x.float()
