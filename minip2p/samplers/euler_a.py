"""Euler ancestral (k-diffusion's `sample_euler_ancestral`; Karras et al. 2022's σ view of the
same trained model): the sampler of InstructPix2Pix and of its Prompt-to-Prompt data recipe.

The model is read as a denoiser in σ-space:  x = z_0 + σ · ε,  σ_t = √((1 − ᾱ_t) / ᾱ_t).
For N steps the timesteps are N evenly spaced reals from 999 down to 0 ("linspace"), σ at a
fractional t linearly interpolated between the trained ones, then σ_N = 0. z_T = σ_0 · n.

    input to the UNet:    x / √(σ_i² + 1)                       (the ᾱ-scaled latent it was trained on)
    ẑ_0 = x − σ_i · ε     (v-prediction: ẑ_0 = x/(σ_i²+1) − v · σ_i/√(σ_i²+1))
    σ_up   = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²),   σ_down = √(σ_{i+1}² − σ_up²)
    x ← x + (x − ẑ_0)/σ_i · (σ_down − σ_i)                      (an Euler step of the ODE to σ_down)
    x ← x + σ_up · n_i                                           (fresh noise back up to σ_{i+1})

n_i ~ N(0, I) is ONE tensor (1, c, h, w) per step, shared by every image of the batch: the images
of an edit keep the same noise at every step (the recipe's "make noise the same across all
samples in batch"). It is drawn on the CPU from `generator`, so a seed gives the same result on
any device; with one image and the generator that drew z_T, it is diffusers'
`EulerAncestralDiscreteScheduler` step for step (tests/test_euler_a.py).
"""
from __future__ import annotations

import numpy as np
import torch

from ..model.config import SchedulerConfig
from .ddim import DDIM


class EulerAncestral:
    name = "euler-a"

    def __init__(self, cfg: SchedulerConfig = SchedulerConfig(),
                 generator: torch.Generator | None = None):
        self.cfg = cfg
        self.generator = generator if generator is not None else torch.Generator("cpu")
        ab = DDIM(cfg).alphas_cumprod.numpy()                              # ᾱ_t, t = 0..999
        self.train_sigmas = ((1 - ab) / ab) ** 0.5                        # σ_t
        self._steps, self._t, self._sigmas = None, [], None

    def _schedule(self, steps: int):
        if steps != self._steps:
            DDIM.check_steps(self.cfg, steps)
            t = np.linspace(0, self.cfg.num_train_timesteps - 1, steps, dtype=np.float32)[::-1]
            s = np.interp(t, np.arange(len(self.train_sigmas)), self.train_sigmas)
            self._steps, self._t = steps, [float(x) for x in t]
            self._sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
        return self._t, self._sigmas

    def timesteps(self, steps: int) -> list[float]:
        """The `steps` (fractional) timesteps, 999 … 0."""
        return list(self._schedule(steps)[0])

    def sigmas(self, steps: int) -> torch.Tensor:
        """σ_0 > … > σ_{N−1} > σ_N = 0, (N + 1,)."""
        return self._schedule(steps)[1]

    def init_sigma(self, steps: int) -> float:
        """z_T = σ_0 · n (n ~ N(0, I))."""
        return float(self.sigmas(steps)[0])

    def _index(self, t, steps):
        return self._schedule(steps)[0].index(float(t))

    def scale_input(self, z: torch.Tensor, t, steps: int) -> torch.Tensor:
        s = self.sigmas(steps)[self._index(t, steps)]
        return z / (s ** 2 + 1) ** 0.5

    def step(self, model_out: torch.Tensor, t, z: torch.Tensor, steps: int) -> torch.Tensor:
        """x_{σ_i} -> x_{σ_{i+1}}: an Euler step down to σ_down, then σ_up of shared fresh noise."""
        i = self._index(t, steps)
        sig = self.sigmas(steps)
        s, s_next = sig[i].item(), sig[i + 1].item()
        z = z.float()
        if self.cfg.prediction_type == "epsilon":
            x0 = z - s * model_out
        else:
            x0 = model_out * (-s / (s ** 2 + 1) ** 0.5) + z / (s ** 2 + 1)
        s_up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5
        s_down = (s_next ** 2 - s_up ** 2) ** 0.5
        d = (z - x0) / s                                                  # dx/dσ
        z = z + d * (s_down - s)
        noise = torch.randn((1, *z.shape[1:]), generator=self.generator)   # one for all rows
        return z + noise.to(z.device) * s_up

