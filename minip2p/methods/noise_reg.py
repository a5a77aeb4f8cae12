"""Pix2Pix-Zero's regularised DDIM inversion (Parmar et al., SIGGRAPH 2023, arXiv 2302.03027,
§3.1 "inverting real images"; pix2pixzero/pix2pix-zero `src/utils/ddim_inv.py`).

Plain DDIM inversion (invert.py) ends at a z_T that is not Gaussian noise: its pixels are
correlated with their neighbours and its statistics drift from N(0, I), which an edit then
amplifies. Pix2Pix-Zero pushes each predicted noise ε towards white Gaussian noise before it is
used for the inversion step. On one channel c of ε (h × w), with a pyramid

    ε⁰_c = ε_c,   ε^{ℓ+1}_c = avgpool₂(ε^ℓ_c)   while the side of ε^ℓ_c is > 8 px,

and at each level a random lag δ_ℓ (circular shifts, the same lag down and across):

    L_AC(ε) = Σ_c Σ_ℓ [ (mean_p ε^ℓ_c(p) · ε^ℓ_c(p + δ_ℓ·ŷ))² + (mean_p ε^ℓ_c(p) · ε^ℓ_c(p + δ_ℓ·x̂))² ]
    δ_ℓ ~ U{1, …, ⌊h_ℓ/2⌋ − 1}      (the official `randrange(1, h // 2)`; 1 when h_ℓ < 4)

the pairwise auto-correlation (0 for white noise at every lag and scale), and

    L_KL(ε) = σ² + μ² − 1 − log(σ² + 10⁻⁷),   μ, σ² = mean and (unbiased) variance of all of ε

the KL divergence of N(μ, σ²) from N(0, 1) (×2, up to the constant). For each inversion step,
K = 5 times (`steps`):

    R = 5 times (`rolls`), new lags each time:   ε ← ε − λ_AC · ∇_ε L_AC(ε) / R
    once:                                        ε ← ε − λ_KL · ∇_ε L_KL(ε)

with λ_AC = λ_KL = 20, plain gradient steps (no optimiser), as the official code and diffusers'
`StableDiffusionPix2PixZeroPipeline.invert` do. The gradient is taken with respect to the
network output; for a v-prediction model ε is read from it (`to_eps`) as diffusers does, but
with the ᾱ of the latent it is evaluated at (ᾱ_t', as the inversion step reads it; diffusers
uses ᾱ_t). The official code regularises ε directly (it has no v-prediction).

The lags come from a seeded torch generator, one draw per channel and level in that order (the
official code uses Python's unseeded `random`). `min_roll` = 0 draws δ from {0, …, ⌊h/2⌋ − 1}
with `torch.randint(h // 2)`, exactly diffusers' draws: its lag 0 term (mean ε²)² pulls the
variance down, against L_KL; the tests use it to compare with diffusers draw for draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MinipError, ParameterError


@dataclass(frozen=True)
class Regulariser:
    lambda_ac: float = 20.0      # λ_AC
    lambda_kl: float = 20.0      # λ_KL
    steps: int = 5               # K: regularisation rounds per inversion step
    rolls: int = 5               # R: auto-correlation gradient steps (new lags) per round
    seed: int = 0                # the lags' generator
    min_roll: int = 1            # 1: the official code's lags; 0: diffusers'

    def __post_init__(self):
        for name in ("lambda_ac", "lambda_kl"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
                raise ParameterError(name, f"must be a finite number ≥ 0, "
                                 f"got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ParameterError("reg_steps", f"must be an integer ≥ 1, got {self.steps!r}")
        if not isinstance(self.rolls, int) or self.rolls < 1:
            raise MinipError(f"the auto-correlation rolls must be an integer ≥ 1, got {self.rolls!r}")

    def describe(self) -> str:
        """For the inversion file's metadata and messages."""
        return (f"lambda_ac={self.lambda_ac:g} lambda_kl={self.lambda_kl:g} steps={self.steps} "
                f"rolls={self.rolls} seed={self.seed} min_roll={self.min_roll}")

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def auto_corr_loss(eps: torch.Tensor, generator: torch.Generator, min_roll: int = 1):
    """L_AC of eps (B, C, h, w): every image and channel, every pyramid level."""
    loss = eps.new_zeros(())
    for i in range(eps.shape[0]):
        for c in range(eps.shape[1]):
            e = eps[i:i + 1, c:c + 1]                                    # (1, 1, h_ℓ, w_ℓ)
            while True:
                hi = max(min_roll + 1, e.shape[2] // 2)
                d = int(torch.randint(min_roll, hi, (1,), generator=generator))   # δ_ℓ
                loss = loss + (e * torch.roll(e, d, 2)).mean() ** 2
                loss = loss + (e * torch.roll(e, d, 3)).mean() ** 2
                if e.shape[2] <= 8:
                    break
                e = F.avg_pool2d(e, kernel_size=2)                       # next level
    return loss


def kl_loss(eps: torch.Tensor) -> torch.Tensor:
    """L_KL = σ² + μ² − 1 − log(σ² + 1e-7) over all entries of eps."""
    mu, var = eps.mean(), eps.var()
    return var + mu ** 2 - 1 - torch.log(var + 1e-7)


def regularise(out: torch.Tensor, reg: Regulariser, generator: torch.Generator,
               to_eps=lambda o: o) -> torch.Tensor:
    """The network output `out` (fp32) after K rounds of the gradient steps above."""
    def grad(loss_of, x):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(to_eps(x)), [x])
        return g
    with torch.enable_grad():
        out = out.detach()
        for _ in range(reg.steps):
            if reg.lambda_ac > 0:
                for _ in range(reg.rolls):
                    g = grad(lambda e: auto_corr_loss(e, generator, reg.min_roll), out)
                    out = out - reg.lambda_ac * (g / reg.rolls)          # ε ← ε − λ_AC ∇L_AC / R
            if reg.lambda_kl > 0:
                out = out - reg.lambda_kl * grad(kl_loss, out)           # ε ← ε − λ_KL ∇L_KL
    return out.detach()
