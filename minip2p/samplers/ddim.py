"""DDIM (Song et al. 2021) with η = 0: deterministic steps in both directions.

Forward process: z_t = √ᾱ_t · z_0 + √(1−ᾱ_t) · ε,  ᾱ_t = Π_{s≤t} (1 − β_s).
Given ε_θ(z_t, t), the predicted clean latent is  ẑ_0 = (z_t − √(1−ᾱ_t) ε_θ) / √ᾱ_t, and

    denoise  t → t' (t' < t):  z_t' = √ᾱ_t' · ẑ_0 + √(1−ᾱ_t') · ε_θ
    invert   t' → t (t > t'):  the same formula read the other way (used for real images).

SD 1.x: β "scaled linear" from 0.00085 to 0.012 over 1000 steps, `steps_offset=1` and
`set_alpha_to_one=False`, so with 50 steps the timesteps are 981, 961, …, 21, 1 and the last
step lands on ᾱ_0 (not 1).
"""
from __future__ import annotations

import torch

from ..model.config import SchedulerConfig
from ..errors import MinipError


class DDIM:
    name = "ddim"

    def __init__(self, cfg: SchedulerConfig = SchedulerConfig()):
        self.cfg = cfg
        n = cfg.num_train_timesteps
        if cfg.beta_schedule == "scaled_linear":
            betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n,
                                   dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)          # ᾱ_t, t = 0..999
        # ᾱ "before" t = 0: 1 if set_alpha_to_one, else ᾱ_0 (SD 1.x)
        self.final_alpha = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    @staticmethod
    def max_steps_for(cfg: SchedulerConfig) -> int:
        """The most steps whose timesteps all exist: the first, (steps − 1)·⌊N/steps⌋ + offset,
        must be < N (SD 1.x/2.x: N = 1000, offset 1 -> 999; 1000 steps would ask for t = 1000)."""
        n, offset = cfg.num_train_timesteps, cfg.steps_offset
        return max((s for s in range(1, n + 1) if (s - 1) * (n // s) + offset < n), default=0)

    @property
    def max_steps(self) -> int:
        return self.max_steps_for(self.cfg)

    @staticmethod
    def check_steps(cfg: SchedulerConfig, steps) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise MinipError(f"steps must be an integer ≥ 1, got {steps!r}")
        most = DDIM.max_steps_for(cfg)
        if steps > most:
            raise MinipError(f"steps must be ≤ {most} for this scheduler "
                             f"({cfg.num_train_timesteps} training steps, steps_offset "
                             f"{cfg.steps_offset}), got {steps}")

    def timesteps(self, steps: int) -> list[int]:
        """The `steps` timesteps of sampling, high to low ("leading" spacing + steps_offset)."""
        self.check_steps(self.cfg, steps)
        ratio = self.cfg.num_train_timesteps // steps
        return [i * ratio + self.cfg.steps_offset for i in reversed(range(steps))]

    def prev(self, t: int, steps: int) -> int:
        """t' = t − 1000/steps, the timestep after t in sampling (before it in inversion)."""
        return t - self.cfg.num_train_timesteps // steps

    def init_sigma(self, steps: int) -> float:
        """z_T = 1 · n: DDIM works on the ᾱ-scaled latents themselves (cf. euler_a.py)."""
        return 1.0

    def scale_input(self, z: torch.Tensor, t: int, steps: int) -> torch.Tensor:
        return z

    def alpha(self, t: int) -> torch.Tensor:
        """ᾱ_t, with ᾱ_{t<0} = final_alpha."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha

    def _split(self, model_out, z, a):
        """(ẑ_0, ε) from the network output: ε-prediction (SD 1.x) or v-prediction."""
        if self.cfg.prediction_type == "epsilon":
            eps = model_out
            return (z - (1 - a) ** 0.5 * eps) / a ** 0.5, eps
        v = model_out
        return a ** 0.5 * z - (1 - a) ** 0.5 * v, a ** 0.5 * v + (1 - a) ** 0.5 * z

    def x0_between(self, z_t: torch.Tensor, z_prev: torch.Tensor, t: int, steps: int):
        """The ẑ_0 a step used, recovered from its two ends (what `sample` yields): both are
        √ᾱ·ẑ_0 + √(1−ᾱ)·ε with the same ẑ_0 and ε, at ᾱ_t and ᾱ_t', so

            ẑ_0 = (√(1−ᾱ_t')·z_t − √(1−ᾱ_t)·z_t') / (√ᾱ_t·√(1−ᾱ_t') − √ᾱ_t'·√(1−ᾱ_t))

        (ε- and v-prediction alike). After a controller's `after_step` (LocalBlend) it is the
        ẑ_0 of the blended latents."""
        a = self.alpha(t).double()
        b = self.alpha(self.prev(t, steps)).double()
        den = a.sqrt() * (1 - b).sqrt() - b.sqrt() * (1 - a).sqrt()
        x0 = ((1 - b).sqrt() * z_t.double() - (1 - a).sqrt() * z_prev.double()) / den
        return x0.to(z_prev.dtype)

    def _alpha_rows(self, t, z0: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for an int t, or one per row for a (b,) tensor of timesteps (training)."""
        if torch.is_tensor(t) and t.dim() > 0:
            a = self.alphas_cumprod[t.cpu()].view(-1, *[1] * (z0.dim() - 1))
            return a.to(z0.device, z0.dtype)
        return self.alpha(int(t)).to(z0.device, z0.dtype)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The forward process in one jump: z_t = √ᾱ_t · z_0 + √(1−ᾱ_t) · ε (t an int, or a (b,)
        tensor: one timestep per row)."""
        a = self._alpha_rows(t, z0)
        return a ** 0.5 * z0 + (1 - a) ** 0.5 * noise

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the network learns to output at z_t = add_noise(z0, ε, t): ε (ε-prediction), or
        v = √ᾱ_t · ε − √(1−ᾱ_t) · z_0 (v-prediction, SD 2.x 768-v)."""
        if self.cfg.prediction_type == "epsilon":
            return noise
        a = self._alpha_rows(t, z0)
        return a ** 0.5 * noise - (1 - a) ** 0.5 * z0

    def step(self, model_out: torch.Tensor, t: int, z: torch.Tensor, steps: int,
             eta: float = 0.0, noise: torch.Tensor | None = None,
             direction: torch.Tensor | None = None) -> torch.Tensor:
        """One denoising step z_t -> z_t', t' = t − 1000/steps.

        η > 0 (Song et al. eq. 12): σ = η·√((1−ᾱ_t/ᾱ_t')(1−ᾱ_t')/(1−ᾱ_t)) and
            z_t' = √ᾱ_t'·ẑ_0 + √(1−ᾱ_t'−σ²)·ε + σ·n,   n = `noise` ~ N(0, I)
        `direction`: another model output whose ε points to z_t' (Asyrp's asymmetric step:
        ẑ_0 = P_t(ε̃) from `model_out` = ε̃, the direction from the original ε)."""
        a_t = self.alpha(t).to(z.dtype)
        a_prev = self.alpha(self.prev(t, steps)).to(z.dtype)
        x0, eps = self._split(model_out, z, a_t)
        if direction is not None:
            eps = self._split(direction, z, a_t)[1]
        if eta == 0:
            return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        sigma = eta * ((1 - a_t / a_prev) * (1 - a_prev) / (1 - a_t)) ** 0.5
        return a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps + sigma * noise

    def epsilon(self, model_out: torch.Tensor, z: torch.Tensor, t: int) -> torch.Tensor:
        """The ε that `model_out` means at z_t (itself for ε-prediction)."""
        return self._split(model_out, z, self.alpha(t).to(z.dtype))[1]

    def invert_step(self, model_out: torch.Tensor, t: int, z: torch.Tensor, steps: int):
        """One inversion step z_{t'} -> z_t, t' = t - 1000/steps. `model_out` is ε_θ(z_{t'}, t):
        the noise at the latent we have, with the timestep we go to (null-text inversion code),
        the usual approximation ε_θ(z_{t'}, t) ≈ ε_θ(z_t, t)."""
        a_prev, a_t = self.alpha(self.prev(t, steps)).to(z.dtype), self.alpha(t).to(z.dtype)
        x0, eps = self._split(model_out, z, a_prev)
        return a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps
