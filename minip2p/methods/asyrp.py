"""Asyrp: edit in the UNet's h-space (Kwon et al., ICLR 2023, arXiv 2210.10960) with a stored
direction (methods/hspace_directions.py: PCA, a prompt pair, a Jacobian pullback; or a trained
f_t, methods/asyrp_train.py).

The picture is generated twice from one z_T, in one batch: unedited (Δh = 0) and edited with
Δh_t = strength · direction_t, by the asymmetric reverse process of methods/hspace.py:

    t ≥ t_edit:            z_{t−1} = √ᾱ_{t−1}·P_t(ε̃) + √(1−ᾱ_{t−1})·ε     (ε̃: decoded from h + Δh)
    t_boost ≤ t < t_edit:  plain DDIM
    t < t_boost:           η = 1 ("quality boosting"), one noise shared by both images

Defaults are the official scripts' user-set t_edit = 500, t_boost = 200 (of 1000). A pullback
direction v_k (Park et al.) is local to the z_t it was found at (prompt, seed, steps of the
file): there z ← z + strength·(ε(z + v_k) − ε(z)) is repeated `repeats` times (their
`x_space_guidance`: conditional ε, no CFG), then both latents go on by DDIM to 0.

Differences from the official code, on purpose: SD's classifier-free guidance is applied to ε
and to ε̃ alike, with Δh in the unconditional and the conditional rows (semantic-diffusion adds
it to both rows too, but takes its asymmetric ε without CFG); the last step lands on ᾱ_0 as SD's
scheduler does (Asyrp's DDPM code lands on ᾱ = 1); the pullback's trajectory to z_t and from it
use our guidance (theirs uses none, on SD 2.1-base).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ParameterError, Result, Settings, check_number, param

NAME, EDITS_PICTURES = "asyrp", "optional"
SUMMARY = "Asyrp: shift the UNet's bottleneck h along a direction (h-space), asymmetric steps"


@dataclass
class Params:
    direction: str = param("", "a directions file of `minip2p hspace` and the index of one, "
                               "e.g. dirs.safetensors:3 (index 0 if left out)")
    strength: float = param(1.0, "how far along the direction: Δh × strength (negative: the "
                                 "other way)")
    t_edit: int = param(500, "edit h at timesteps t ≥ t_edit (of 1000; 0: every step)")
    t_boost: int = param(200, "stochastic steps (η = 1) below this timestep: quality boosting "
                              "(0: none)")
    asymmetric: bool = param(True, "ε from the unedited h in the direction term (Asyrp); off: "
                                   "the edited ε̃ in both terms (Haas et al.)")
    repeats: int = param(16, "pullback directions: x-space guidance steps at z_t")

    def check(self, prompts: list[str], s: Settings) -> None:
        if len(prompts) != 1:
            raise ParameterError("prompts", "Asyrp edits the image of one prompt; give one")
        s.ddim_only("Asyrp's asymmetric reverse process")
        if s.image is not None and not isinstance(s.image, (str,)) and \
                not hasattr(s.image, "convert"):
            raise ParameterError("image", "Asyrp inverts a picture (a path or a PIL image), "
                                          "not an inversion file")
        check_number("strength", self.strength)
        for name in ("t_edit", "t_boost", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1000:
                raise ParameterError(name, f"must be an integer in [0, 1000], got {v!r}")
        d, k = read_direction(self.direction)
        if d.kind == "pullback":
            made = {n: d.meta.get(n) for n in ("prompt", "seed", "steps")}
            asked = dict(prompt=prompts[0], seed=str(s.seed), steps=str(s.steps))
            if made != asked:
                raise ParameterError("direction", f"a pullback direction belongs to the z_t it "
                                                  f"was found at ({made}); run with the same "
                                                  f"prompt, seed and steps, not {asked}")


def read_direction(ref) -> tuple:
    """'FILE.safetensors:K' (or FILE alone: K = 0) -> (Directions, K), checked."""
    from ..errors import MinipError
    from . import hspace_directions as hd
    if not isinstance(ref, str) or not ref:
        raise ParameterError("direction", "is needed: a directions file of `minip2p hspace`, "
                                          "e.g. dirs.safetensors:0")
    path, sep, index = ref.rpartition(":") if ref.rpartition(":")[2].isdigit() else (ref, "", "0")
    try:
        if hd.kind_of(path) == "ft":                                   # a trained f_t
            from . import asyrp_train
            f, meta = asyrp_train.load(path)
            return hd.Directions("ft", torch.zeros(1), [], None, dict(meta, net=f)), 0
        d = hd.load(path)
    except MinipError as e:
        raise ParameterError("direction", str(e)) from None
    k = int(index)
    if k >= d.vectors.shape[0]:
        raise ParameterError("direction", f"{path} holds {d.vectors.shape[0]} directions "
                                          f"(0 … {d.vectors.shape[0] - 1}), not {k}")
    return d, k


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    from ..pipeline import check_size, decode, initial_noise, to_pil
    d, k = read_direction(p.direction)
    height, width = check_size(model, s.height, s.width)
    z_T, shown = initial_noise(model, s.seed, height, width), []
    if s.image is not None:                     # a picture: its DDIM inversion under the prompt
        z_T, shown = inverted(model, prompts[0], s, height, width)
    if d.kind == "pullback":
        z = pullback_edit(model, prompts[0], z_T, d, k, p, s)
    elif d.kind == "ft":                                # Δh = f_t(h) × n_train / n_test
        from .asyrp_train import delta_of
        f = d.meta["net"].to(model.device, model.dtype)
        z = edit(model, prompts[0], z_T, delta_of(model.unet, f, int(d.meta["steps"]) / s.steps),
                 p, s)
    else:
        z = edit(model, prompts[0], z_T, lambda h, step, t: d.delta(k, t, s.steps), p, s)
    sign = "+" if p.strength >= 0 else "−"
    return Result(to_pil(decode(model, z)),
                  [prompts[0], f"{prompts[0]} {sign} {abs(p.strength):g}·{d.kind} {k}"], shown)


def inverted(model, prompt: str, s: Settings, height: int, width: int):
    """(z_T of the settings' picture by DDIM inversion under `prompt`, [the fitted picture]):
    as Asyrp edits real images (there with its unconditional model; here the unedited row is
    the picture's reconstruction at the run's guidance)."""
    from ..pipeline import encode_text
    from ..real import images
    from ..real.invert import ddim_invert
    from .base import read_image
    fitted = images.fit(read_image(s.image), height, width)
    z0 = images.encode(model, images.to_tensor(fitted))
    return ddim_invert(model, z0, encode_text(model, [prompt]), s.steps, s.progress)[-1], [fitted]


def edit(model, prompt: str, z_T: torch.Tensor, delta, p: Params, s: Settings,
         weights=None) -> torch.Tensor:
    """z_0 of [unedited, edited × strength] (or one per weight): `delta(h, step, t)` -> Δh_t."""
    from ..pipeline import encode_text
    from .hspace import HShift, sample
    weights = [0.0, p.strength] if weights is None else weights
    timesteps = model.scheduler.timesteps(s.steps)
    shift = HShift(lambda h, step: delta(h, step, timesteps[step]), weights, p.asymmetric)
    cond = encode_text(model, [prompt]).expand(len(weights), -1, -1)
    return sample(model, cond, encode_text(model, [""]), z_T, s.steps, s.guidance, shift,
                  p.t_edit, p.t_boost, s.seed, progress=s.progress)


@torch.no_grad()
def pullback_edit(model, prompt: str, z_T: torch.Tensor, d, k: int, p: Params, s: Settings):
    """z_0 of [unedited, edited]: DDIM to the file's z_t, x-space guidance along v_k there,
    then both by DDIM to 0."""
    from ..pipeline import encode_text, sample as pipeline_sample
    from .hspace import sample
    cond, uncond = encode_text(model, [prompt]), encode_text(model, [""])
    i_edit = int(d.meta["step"])
    z = z_T.float()
    for i, t, z_next in pipeline_sample(model, cond, uncond, z_T, s.steps, s.guidance,
                                        progress=False):
        if i == i_edit:
            break
        z = z_next
    z_edit = guided(model, z, t, cond, d.vectors[k][None] * p.strength, p.repeats)
    return sample(model, cond.expand(2, -1, -1), uncond, torch.cat([z, z_edit]), s.steps,
                  s.guidance, seed=s.seed, start=i_edit, t_boost=0)


def guided(model, z: torch.Tensor, t: int, cond: torch.Tensor, v: torch.Tensor, repeats: int):
    """Park et al.'s x-space guidance: z ← z + (ε(z + v) − ε(z)), `repeats` times."""
    for _ in range(repeats):
        eps = model.unet(torch.cat([z, z + v.to(z)]).to(model.dtype), t,
                         cond.expand(2, -1, -1)).float()
        z = z + (eps[1:] - eps[:1])
    return z
