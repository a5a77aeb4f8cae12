"""ReNoise inversion (Garibi et al., ECCV 2024, arXiv 2403.14602; garibida/ReNoise-Inversion
`src/renoise_inversion.py` `inversion_step`, `noise_regularization`).

DDIM inversion evaluates ε_θ at the latent it has, z_{t'}, where the step needs ε_θ(z_t, t).
ReNoise refines each inversion step by fixed-point iterations of the step itself (the source
prompt c, guidance 1: the official SD default has no classifier-free guidance):

    z⁽⁰⁾ = z_{t'}
    ε_k = ε_θ(z⁽ᵏ⁾, t, c),   z⁽ᵏ⁺¹⁾ = inv(ε_k),   k = 0 … K       inv(ε) = DDIM invert step from z_{t'}
    z_t = inv(ε̄),  ε̄ = mean of ε_k for k in [a, b)        (z_t = z⁽ᴷ⁺¹⁾ when [a, b) is empty)

with the official constants: for t < 250 K ← min(K, 5) and [a, b) = [0, 5), else [a, b) = [8, 10);
K = `renoise_steps` (the official SD 1.5 DDIM example uses K = 1, its SDXL-Turbo default 9). The
mean is the running mean ε̄ ← j·ε̄/(j + 1) + ε_k/(j + 1) of the official code.

Optional noise regularisation (`regularise`, the official default constants), applied to ε_k for
every k ≥ a before its step and to ε̄ (never to the ε_k that enter the mean):

    4 rounds of:   ε ← ε − λ_KL·clip(∇_ε L_KL(ε, ε_opt), ±100)       λ_KL = 0.065
                   5 times: ε ← ε − λ_AC·∇_ε L_AC(ε) / 5               λ_AC = 20

L_AC is Pix2Pix-Zero's auto-correlation loss (noise_reg.auto_corr_loss, lags drawn from [0, h/2));
L_KL sums, over 4×4 patches of each channel, |KL| between the Gaussians fitted to ε and to
ε_opt = ε_θ(√ᾱ_t·z_0 + √(1 − ᾱ_t)·n, t, c), n one noise drawn per inversion from `seed`.
Without `regularise` (the default here) the extra UNet call for ε_opt is not made.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..methods.noise_reg import auto_corr_loss

FIRST_STEP_MAX_T = 250
FIRST_K, FIRST_RANGE, RANGE = 5, (0, 5), (8, 10)
LAMBDA_KL, LAMBDA_AC, REG_STEPS, AC_ROLLS = 0.065, 20.0, 4, 5


def patch_kl(e: torch.Tensor, ref: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Σ over 4×4 patches and channels of |KL(N(μ_e, σ²_e) ‖ N(μ_ref, σ²_ref))| (the official
    `patchify_latents_kl_divergence`); e, ref (1, C, h, w)."""
    def stats(x):
        c = x.shape[1]
        p = x.unfold(1, c, c).unfold(2, patch, patch).unfold(3, patch, patch)
        p = p.contiguous().view(-1, c, patch * patch)                  # (patches, C, 16)
        return p.mean(-1), p.var(-1)
    (m0, v0), (m1, v1) = stats(e), stats(ref)
    kl = torch.log((v1 + 1e-6) / (v0 + 1e-6)) + (v0 + (m0 - m1) ** 2) / (v1 + 1e-6) - 1
    return kl.abs().sum()


def regularise(e: torch.Tensor, e_opt: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ReNoise's noise regularisation of ε (module docstring), official constants."""
    def grad(loss_of, x):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(x), [x])
        return g
    with torch.enable_grad():
        e = e.detach()
        for _ in range(REG_STEPS):
            e = e - LAMBDA_KL * grad(lambda x: patch_kl(x, e_opt), e).clamp(-100, 100)
            for _ in range(AC_ROLLS):
                e = e - LAMBDA_AC * grad(lambda x: auto_corr_loss(x, generator, 0), e) / AC_ROLLS
    return e.detach()


@torch.no_grad()
def invert(model, z0: torch.Tensor, cond: torch.Tensor, steps: int, renoise_steps: int = 1,
           regularised: bool = False, seed: int = 0, progress: bool = True,
           trace: list | None = None) -> list[torch.Tensor]:
    """z_0 (1, 4, h, w) -> [z_0, z_1, …, z_T] (fp32); cond (1, 77, d). `trace`: gets, per step,
    the list of iterates z⁽¹⁾ … z⁽ᴷ⁺¹⁾ and the final z_t (for tests)."""
    sched, z0 = model.scheduler, z0.float()
    unet = lambda z, t: model.unet(z.to(model.dtype), t, cond).float()    # noqa: E731
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(z0.shape, generator=gen).to(z0) if regularised else None
    z, latents = z0, [z0]
    for t in tqdm(sched.timesteps(steps)[::-1], disable=not progress, desc="ReNoise inversion"):
        first = t < FIRST_STEP_MAX_T
        K = min(FIRST_K, renoise_steps) if first else renoise_steps
        lo, hi = FIRST_RANGE if first else RANGE
        e_opt = unet(sched.add_noise(z0, noise, t), t) if regularised else None
        inv = lambda e: sched.invert_step(e, t, z, steps)                 # noqa: E731
        zk, mean, iterates = z, None, []
        for k in range(K + 1):
            e = unet(zk, t)                                               # ε_θ(z⁽ᵏ⁾, t, c)
            if lo <= k < hi:
                j = k - lo
                mean = e.clone() if mean is None else j * mean / (j + 1) + e / (j + 1)
            if regularised and k >= lo:
                e = regularise(e, e_opt, gen)
            zk = inv(e)
            iterates.append(zk)
        if mean is not None:
            zk = inv(regularise(mean, e_opt, gen) if regularised else mean)
        if trace is not None:
            trace.append((iterates, zk))
        z = zk
        latents.append(z)
    return latents
