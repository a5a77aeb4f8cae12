"""DPM-Solver++ (2M): the second-order multistep solver of the diffusion ODE in its
data-prediction form (Lu et al. 2022, arXiv 2211.01095, Algorithm 2), the sampler most SD users
pick for 20–25 steps. Deterministic, like DDIM, but second order in the step size.

The schedule is DDIM's (ddim.py), read in the paper's symbols:

    z_t = α_t z_0 + σ_t ε,   α_t = √ᾱ_t,   σ_t = √(1 − ᾱ_t),   λ_t = log(α_t / σ_t)

and the model is read as a data predictor (the "++"):

    x̂₀(t) = (z_t − σ_t ε_θ(z_t, t)) / α_t        (v-prediction: x̂₀(t) = α_t z_t − σ_t v_θ)

Timesteps: the points t_0 > t_1 > … > t_{N−1} are round(linspace(0, 999, N + 1)) high to low with
the 0 dropped ("linspace" spacing: 20 steps give 999, 949, 899, …, 50), and t_N is the end,
σ = 0, α = 1 ("final_sigmas_type zero"). This is diffusers' `DPMSolverMultistepScheduler` with
its defaults, and what its `from_config` makes of a scheduler config that names no timestep
spacing, as SD 1.5's (written before diffusers had the option; `steps_offset` moves only
"leading" spacing). A model's own scheduler config does not change it here. No Karras σs.

Step i (i = 1 … N) goes from t_{i−1} to t_i with the fresh x̂₀(t_{i−1}) and, from the step
before, x̂₀(t_{i−2}):

    h_i = λ_{t_i} − λ_{t_{i−1}},   r_i = h_{i−1} / h_i
    D_i = (1 + 1/(2 r_i)) x̂₀(t_{i−1}) − 1/(2 r_i) x̂₀(t_{i−2})
    z_{t_i} = (σ_{t_i} / σ_{t_{i−1}}) z_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i

The first step has no history and takes D_1 = x̂₀(t_0): the first-order step, which is exactly a
DDIM step (α_{t_i} x̂₀ + σ_{t_i} ε̂). The last step is first order too: σ_{t_N} = 0 makes
h_N = ∞, so e^{−h_N} = 0 and z_{t_N} = x̂₀(t_{N−1}), while r_N = 0 would blow up D_N. diffusers
does the same at any N with σ_N = 0; its `lower_order_final` (< 15 steps) only also lowers the
second-to-last step of the third-order solver, which 2M does not have. So for N steps: step 1
and step N first order, steps 2 … N−1 second order (N = 1 is one DDIM-like step to x̂₀).

The history under controllers that edit the latents. The pipeline runs `before_step`, the UNet
and this step on the same z, so every x̂₀ kept here is the model's prediction at the latents it
was really given, edited ones included. A controller's `after_step` (LocalBlend:
z*_b ← z_src + m_b·(z*_b − z_src)) then moves z_{t_i} off the path that x̂₀(t_{i−1}) was
predicted on, and the next D extrapolates across that jump. We keep the history as the model
gave it, for three reasons: (1) restarting at first order after every edit would make a
LocalBlend edit (it blends after every step) a first-order run throughout; (2) blending the
history with the same mask would need each controller's map, and where the next mask m_b is 0
the step's result is replaced by the source's latents anyway, so the history there never reaches
the output; it matters only on pixels that enter the mask, where either choice extrapolates
across a jump (the source's past under the edited prompt, or the edited row's own discarded
past); (3) it is what diffusers' scheduler does when a pipeline's `callback_on_step_end` edits
the latents (its `model_outputs` are not touched): tests/test_dpm_solver.py runs LocalBlend
through both and finds the same latents (tools/README.md: how far the other two choices
move them). The source row is never edited, so it stays the source prompt generated alone.

The solver keeps x̂₀(t_{i−2}) between calls, so one object runs one generation at a time, from
its first step (`step` at the first timestep starts a new run).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..model.config import SchedulerConfig
from .ddim import DDIM


class DPMSolverPP:
    name = "dpm++"

    def __init__(self, cfg: SchedulerConfig = SchedulerConfig()):
        self.cfg = cfg
        self.alphas_cumprod = DDIM(cfg).alphas_cumprod.double()          # ᾱ_t, t = 0..999
        self._steps, self._t = None, []
        self._prev = None                 # (the loop step that made it, that step's x̂₀)

    def timesteps(self, steps: int) -> list[int]:
        """t_0 … t_{N−1}: round(linspace(0, 999, N + 1)), high to low, the 0 dropped."""
        if steps != self._steps:
            DDIM.check_steps(self.cfg, steps)         # ≤ 999: linspace keeps them distinct
            n = self.cfg.num_train_timesteps
            t = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
            self._steps, self._t = steps, [int(x) for x in t]
        return list(self._t)

    def init_sigma(self, steps: int) -> float:
        """z_T = 1 · n: like DDIM, the solver works on the ᾱ-scaled latents themselves."""
        return 1.0

    def scale_input(self, z: torch.Tensor, t: int, steps: int) -> torch.Tensor:
        return z

    def alpha_sigma(self, t: int) -> tuple[float, float]:
        """(α_t, σ_t) in float64."""
        ab = self.alphas_cumprod[t].item()
        return ab ** 0.5, (1 - ab) ** 0.5

    def lam(self, t: int) -> float:
        """λ_t = log(α_t / σ_t)."""
        a, s = self.alpha_sigma(t)
        return math.log(a / s)

    def predict_x0(self, model_out: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
        """x̂₀(t) from the network output: ε-prediction (SD 1.x) or v-prediction (SD 2.x)."""
        a, s = self.alpha_sigma(t)
        if self.cfg.prediction_type == "epsilon":
            return (z - s * model_out) / a
        return a * z - s * model_out

    def step(self, model_out: torch.Tensor, t: int, z: torch.Tensor, steps: int) -> torch.Tensor:
        """One step z_{t_{i−1}} -> z_{t_i} (the loop's step i − 1 = the index of t)."""
        ts = self.timesteps(steps)
        k = ts.index(int(t))                          # the loop's step: t = t_k, going to t_{k+1}
        z = z.float()
        x0 = self.predict_x0(model_out.float(), ts[k], z)
        if k == steps - 1:                            # σ = 0 at the end: the first-order step
            out = x0                                  # lands on x̂₀
        else:
            t_next = ts[k + 1]
            s_s, (a_t, s_t) = self.alpha_sigma(ts[k])[1], self.alpha_sigma(t_next)
            h = self.lam(t_next) - self.lam(ts[k])
            d = x0                                    # first order (no history yet): DDIM
            if self._prev is not None and self._prev[0] == k - 1:   # step k − 1 of this run
                r = (self.lam(ts[k]) - self.lam(ts[k - 1])) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * self._prev[1]
            out = (s_t / s_s) * z - a_t * math.expm1(-h) * d
        self._prev = (k, x0)
        return out
