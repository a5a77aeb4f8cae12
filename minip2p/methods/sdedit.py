"""SDEdit (Meng et al., ICLR 2022, arXiv 2108.01073): edit a picture by noising it part-way and
denoising it with a prompt. The noise level is the trade-off: more noise, more freedom, less of
the picture kept.

With N DDIM steps τ_N > … > τ_1 and strength s ∈ (0, 1] (diffusers' img2img with DDIM):

    n     = ⌊N·s⌋                      steps that run; they start at index N − n of the schedule
    t₀    = τ at index N − n           (s = 1: the first timestep, 981 for SD 1.x at 50 steps)
    z_t₀  = √ᾱ_t₀ · z_0 + √(1−ᾱ_t₀) · ε,   z_0 = E(x)·scaling_factor,  ε ~ N(0, I)
    then the usual guided DDIM loop from t₀ (pipeline.sample with `start` = N − n)

z_0 is the VAE posterior mean (as for real-image inversion; diffusers samples the posterior). ε is
drawn like the initial noise of `generate` (one per seed, shared by every prompt), so any
controller runs on top: `minip2p edit SOURCE TARGET --image PHOTO --strength S` is Prompt-to-
Prompt started from the noised picture. Controllers count the steps that run, 0 … n − 1, so a
P2P window of 0.8 covers 80 % of them.
"""
from __future__ import annotations

import torch

from ..real import images
from ..errors import MinipError
from ..pipeline import check_size, decode, encode_text, initial_noise, denoise

DEFAULT_STRENGTH = 0.6


def check_strength(strength: float | None) -> float:
    """None -> the default; anything outside (0, 1] is refused."""
    s = DEFAULT_STRENGTH if strength is None else strength
    if not (isinstance(s, (int, float)) and 0.0 < s <= 1.0):
        raise MinipError(f"--strength must be in (0, 1] (0.6: keep the layout, 1: almost pure "
                         f"noise), got {strength!r}")
    return float(s)


def start_index(steps: int, strength: float) -> int:
    """N − ⌊N·s⌋: how many of the N timesteps are skipped."""
    n = min(int(steps * check_strength(strength)), steps)
    if n < 1:
        raise MinipError(f"--strength {strength:g} with {steps} steps runs no step "
                         f"(⌊{steps}·{strength:g}⌋ = 0); raise --strength or --steps")
    return steps - n


def noised(model, z0: torch.Tensor, steps: int, strength: float,
           noise: torch.Tensor) -> tuple[torch.Tensor, int]:
    """z_0 (1, 4, h, w), ε of the same shape -> (z_t₀, start index)."""
    start = start_index(steps, strength)
    t0 = model.scheduler.timesteps(steps)[start]
    return model.scheduler.add_noise(z0.float(), noise.float().to(z0.device), t0), start


def generate(model, photo, prompts: list[str], strength: float = DEFAULT_STRENGTH, seed: int = 0,
             steps: int = 50, guidance: float = 7.5, height: int | None = None,
             width: int | None = None, control=None, progress: bool = True,
             free_text_encoder: bool = False, return_latents: bool = False):
    """A picture (PIL image, or z_0 (1, 4, h, w)) and prompts -> images (B, 3, H, W) in [0, 1]."""
    strength = check_strength(strength)
    if isinstance(photo, torch.Tensor):
        z0 = photo.float()
        height, width = (s * model.vae.cfg.downscale for s in z0.shape[-2:])
    else:
        height, width = check_size(model, height, width)
        z0 = images.encode(model, images.to_tensor(images.fit(photo, height, width)))
    z, start = noised(model, z0, steps, strength, initial_noise(model, seed, height, width))
    cond = encode_text(model, prompts)
    uncond = encode_text(model, [""])
    if free_text_encoder:
        model.text_encoder = None
    z = denoise(model, cond, uncond, z, steps, guidance, control, progress=progress,
                start=start)
    return z if return_latents else decode(model, z)
