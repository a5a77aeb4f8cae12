"""The samplers by name, what `--sampler` and `generate(sampler=…)` choose from. Each one has
`name`, `timesteps(steps)`, `init_sigma(steps)` (z_T = init_sigma · n), `scale_input(z, t,
steps)` (the UNet's input) and `step(model_out, t, z, steps)` (z_t -> the next z); `pipeline.sample`
drives any of them the same way, and a controller's windows count the sampler's steps.

    ddim      ddim.py        deterministic, first order (the default; inversion and SDEdit need it)
    euler-a   euler_a.py     Euler ancestral: fresh noise at each step, shared by an edit's images
    dpm++     dpm_solver.py  DPM-Solver++ (2M): deterministic, second order, for 20–25 steps
"""
from __future__ import annotations

import torch

from ..model.config import SchedulerConfig
from .ddim import DDIM
from .dpm_solver import DPMSolverPP
from ..errors import MinipError
from .euler_a import EulerAncestral

SAMPLERS = ("ddim", "euler-a", "dpm++")


def make_sampler(name: str, cfg: SchedulerConfig, generator: torch.Generator | None = None):
    """A name of SAMPLERS -> a new sampler object; `generator` feeds Euler ancestral's noise."""
    if name == "ddim":
        return DDIM(cfg)
    if name == "euler-a":
        return EulerAncestral(cfg, generator)
    if name == "dpm++":
        return DPMSolverPP(cfg)
    raise MinipError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
