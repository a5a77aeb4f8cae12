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
controller runs on top: Prompt-to-Prompt with `strength` and a picture starts from the
noised picture. Controllers count the steps that run, 0 … n − 1, so a
P2P window of 0.8 covers 80 % of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..real import images
from .base import ParameterError, Result, Settings, param
from ..pipeline import check_size, decode, encode_text, initial_noise, denoise

DEFAULT_STRENGTH = 0.6


NAME, EDITS_PICTURES = "sdedit", "required"
SUMMARY = "SDEdit: noise the picture part-way, then denoise it with the prompts"


@dataclass
class Params:
    strength: float = param(DEFAULT_STRENGTH, "how much noise, in (0, 1]: 0.6 keeps the layout, "
                                              "1 is almost pure noise")

    def check(self, prompts: list[str], s: Settings) -> None:
        check_strength(self.strength)
        s.ddim_only("SDEdit")
        if not prompts:
            raise ParameterError("prompts", "SDEdit needs at least one prompt")
        start_index(s.steps, self.strength)


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    from ..pipeline import check_size, to_pil
    from .base import read_image
    height, width = check_size(model, s.height, s.width)
    fitted = images.fit(read_image(s.image), height, width)
    out = generate(model, fitted, prompts, p.strength, s.seed, s.steps, s.guidance, height,
                   width, progress=s.progress, free_text_encoder=s.free_text_encoder)
    return Result(to_pil(out), list(prompts), [fitted])


def check_strength(strength: float | None) -> float:
    """None -> the default; anything outside (0, 1] is refused."""
    s = DEFAULT_STRENGTH if strength is None else strength
    if isinstance(s, bool) or not (isinstance(s, (int, float)) and 0.0 < s <= 1.0):
        raise ParameterError("strength", f"must be in (0, 1] (0.6: keep the layout, 1: almost "
                                         f"pure noise), got {strength!r}")
    return float(s)


def start_index(steps: int, strength: float) -> int:
    """N − ⌊N·s⌋: how many of the N timesteps are skipped."""
    n = min(int(steps * check_strength(strength)), steps)
    if n < 1:
        raise ParameterError("strength", f"{strength:g} with {steps} steps runs no step "
                                         f"(⌊{steps}·{strength:g}⌋ = 0); raise strength or steps")
    return steps - n


def noised(model, z0: torch.Tensor, steps: int, strength: float,
           noise: torch.Tensor) -> tuple[torch.Tensor, int]:
    """z_0 (1, 4, h, w), ε of the same shape -> (z_t₀, start index)."""
    start = start_index(steps, strength)
    t0 = model.scheduler.timesteps(steps)[start]
    return model.scheduler.add_noise(z0.float(), noise.float().to(z0.device), t0), start


def inverted(model, z0: torch.Tensor, cond: torch.Tensor, steps: int, strength: float,
             progress: bool = True) -> tuple[torch.Tensor, int]:
    """z_0 -> (z_t₀ by DDIM inversion under `cond` (guidance 1), start index): the same t₀ as
    `noised`, reached deterministically, so that the layout of z_0 survives in z_t₀."""
    from ..real.invert import ddim_invert
    start = start_index(steps, strength)
    return ddim_invert(model, z0, cond, steps, progress, until=steps - start)[-1], start


def generate(model, photo, prompts: list[str], strength: float = DEFAULT_STRENGTH, seed: int = 0,
             steps: int = 50, guidance: float = 7.5, height: int | None = None,
             width: int | None = None, control=None, progress: bool = True,
             free_text_encoder: bool = False, return_latents: bool = False,
             invert_prompt: str | None = None):
    """A picture (PIL image, or z_0 (1, 4, h, w)) and prompts -> images (B, 3, H, W) in [0, 1].
    `invert_prompt`: start from the picture DDIM-inverted under it (`inverted`), not noised."""
    strength = check_strength(strength)
    if isinstance(photo, torch.Tensor):
        z0 = photo.float()
        height, width = (s * model.vae.cfg.downscale for s in z0.shape[-2:])
    else:
        height, width = check_size(model, height, width)
        z0 = images.encode(model, images.to_tensor(images.fit(photo, height, width)))
    if invert_prompt is None:
        z, start = noised(model, z0, steps, strength, initial_noise(model, seed, height, width))
    else:
        z, start = inverted(model, z0, encode_text(model, [invert_prompt]), steps, strength,
                            progress)
    cond = encode_text(model, prompts)
    uncond = encode_text(model, [""])
    if free_text_encoder:
        model.text_encoder = None
    z = denoise(model, cond, uncond, z, steps, guidance, control, progress=progress,
                start=start)
    return z if return_latents else decode(model, z)
