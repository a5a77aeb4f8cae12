"""Direct Inversion ("PnP Inversion", Ju et al., ICLR 2024, arXiv 2310.01506;
cure-lab/PnPInversion `DirectInversion.offset_calculate`, `direct_inversion_p2p_guidance_forward`).

DDIM inversion with the source prompt c at guidance 1 gives z*_0 … z*_T (invert.ddim_invert).
Denoised with guidance g the source drifts from that trajectory; Direct Inversion measures, once,
how far each guided step lands from it, and adds the difference back during the edit:

    o_t = z*_{t'} − DDIM(z*_t, ε_∅ + g·(ε_c − ε_∅), t),   t' = t − 1000/N,  ∅ = ψ("")

computed from z*_t itself at every step (no controller, no optimisation: N UNet calls). The edit
starts from z*_T with ∅ = ψ("") for every prompt, and after each DDIM step (before LocalBlend)

    z_{t'}[source] ← z_{t'}[source] + o_t                (the source row only)

so the source branch runs exactly on z*_t (up to rounding) while the edited rows are generated
beside it, reading its attention. As in the official code the step's z*_{t'} for the next offset
is the rounded `DDIM(…) + o_t`, not z*_{t'} itself.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..control import Controller
from ..guidance import cfg


@torch.no_grad()
def offsets(model, latents: list[torch.Tensor], cond: torch.Tensor, empty: torch.Tensor,
            guidance: float, progress: bool = True) -> torch.Tensor:
    """latents: the DDIM inversion [z*_0 … z*_T]; cond, empty: (1, 77, d) = c, ψ("").
    Returns o (N, 1, 4, h, w) fp32: o[i] for denoising step i (timestep τ_{N−i})."""
    sched, steps = model.scheduler, len(latents) - 1
    context = torch.cat([empty, cond]).to(model.dtype)                  # rows [∅, c]
    z, found = latents[-1].float(), []
    for i, t in enumerate(tqdm(sched.timesteps(steps), disable=not progress,
                               desc="direct inversion")):
        eps_u, eps_c = model.unet(torch.cat([z, z]).to(model.dtype), t, context).float().chunk(2)
        stepped = sched.step(cfg(eps_u, eps_c, guidance), t, z, steps)
        o = latents[steps - 1 - i].float() - stepped                   # z*_{t'} − DDIM(z*_t)
        found.append(o)
        z = stepped + o
    return torch.stack(found)


class AddOffsets(Controller):
    """After each step, the source image (row 0 of the latents) gets the step's offset o_t.
    `offsets` (N, 1, 4, h, w) from `offsets`; `start`: steps skipped."""

    def __init__(self, offsets: torch.Tensor, start: int = 0):
        self.offsets, self.start = offsets, start

    def after_step(self, z, step):
        o = self.offsets[self.start + step].to(z)
        return torch.cat([z[:1] + o, z[1:]])
