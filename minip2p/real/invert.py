"""Real images -> what an edit needs: z_T and an unconditional embedding ∅_t for every step.

DDIM inversion (guidance 1, source prompt c): run DDIM backwards from z_0 = E(x)·scaling_factor,
    z_t = invert_step(ε_θ(z_{t'}, t, c), z_{t'}),  t' = t − 1000/N      gives z_0, z_1, …, z_T
optionally with each ε_θ regularised towards white noise first (Pix2Pix-Zero: noise_reg.py),
then denoise from z_T with one of three ∅_t (the edit loop uses ∅_t for every prompt):
    ddim             ∅_t = ψ("")                 (reconstruction drifts at guidance 7.5)
    null-text        ∅_t optimised (Mokady et al. 2022, arXiv 2211.09794): for i = 0 … N−1,
                     from z̄_T = z_T and ∅ = ψ(""), warm-started from the previous step,
                     Adam(lr = 1e-2·(1 − i/100)) on  ‖ DDIM(z̄_t, ε_∅ + g·(ε_c − ε_∅)) − z_{t−1} ‖²
                     for ≤ 10 inner steps, stopping when the loss (mean square, taken before
                     Adam's update as in the official code) < 1e-5 + 2e-5·i; then
                     z̄_{t−1} = DDIM(z̄_t, guided ε with the optimised ∅_t)
    negative-prompt  ∅_t = c at every step (Miyake et al. 2023, arXiv 2305.16807): the guided ε
                     of the source is then ε_c whatever g, no optimisation
    direct           ∅_t = ψ(""), and the source row is put back on z_0 … z_T after each step
                     by the offsets of Direct Inversion (direct.py: `offsets`, N UNet calls)
    renoise          ∅_t = ψ(""), z_0 … z_T from ReNoise's refined inversion (renoise.py)
    edict            EDICT's coupled pair (x_T, y_T), exact (edict.py; no trajectory)
The null-text constants are the official ones for N = 50 steps; minip2p reads i on that 50-step
scale (i·50/N), so they are exactly the official ones at 50 and the rate stays > 0 beyond 100.
The optimised ∅, Adam's state and the loss are fp32 even when the UNet runs in fp16/bf16 (the
UNet itself runs in the model's dtype; ∅ is cast on the way in, the gradient on the way back).

The inversion file is one safetensors file: tensors z_T (1, 4, h, w), uncond (N or 1, 1, 77, d)
(1 when ∅_t is the same at every step), probe (k, 2) (the model's weight norms and sizes), image
(H, W, 3) uint8 (the input as cropped and resized); metadata format, version, prompt, method,
steps, guidance, height, width, model, model_config (a hash of the configs), and regularised
(the noise regulariser's settings, "" when none); Direct Inversion adds offsets (N, 1, 4, h, w),
EDICT y_T (1, 4, h, w). It is written to a temporary file and renamed into place.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import direct, edict, images, renoise
from ..atomic import atomic_write
from ..errors import MinipError, ParameterError
from ..conditioning import eps as unet_eps
from ..guidance import UNCOND, GuidanceBatch, cfg
from ..methods.noise_reg import Regulariser, regularise
from ..control import Compose
from ..pipeline import decode, denoise, encode_text

FORMAT, VERSION = "minip2p-inversion", 1
METHODS = ("ddim", "null-text", "negative-prompt", "direct", "edict", "renoise")


@dataclass
class Inversion:
    z_T: torch.Tensor                   # (1, 4, h, w) fp32 (edict: x_T, float64)
    uncond: torch.Tensor                # (N or 1, 1, 77, d) fp32: ∅_t per step
    prompt: str
    method: str
    steps: int
    guidance: float
    height: int
    width: int
    model: str                          # the model's name, for messages
    model_config: str                   # hash of the configs (fingerprint, part 1)
    probe: torch.Tensor                 # (k, 2) weight norms, sizes (fingerprint, part 2)
    image: torch.Tensor | None = None   # (H, W, 3) uint8: the input the inversion saw
    latents: list | None = None         # DDIM inversion z_0 … z_T (in memory only)
    losses: list | None = None          # null-text: the inner losses of each step (in memory)
    regularised: str = ""               # Regulariser.describe() of a regularised inversion
    offsets: torch.Tensor | None = None  # direct: (N, 1, 4, h, w) o_t per step
    y_T: torch.Tensor | None = None     # edict: the second latent of the pair (1, 4, h, w)

    def per_step(self) -> list[torch.Tensor]:
        """∅_t for each of the N steps: a list of (1, 77, d)."""
        return [self.uncond[min(i, len(self.uncond) - 1)] for i in range(self.steps)]


UNCOND_ROW = GuidanceBatch(((0, UNCOND),))       # ε_θ(·, ∅): ControlNets in guess mode add nothing

# ---- the inversions --------------------------------------------------------------------------

@torch.no_grad()
def ddim_invert(model, z0: torch.Tensor, cond: torch.Tensor, steps: int, progress: bool = True,
                reg: Regulariser | None = None, until: int | None = None) -> list[torch.Tensor]:
    """z_0 (1, 4, h, w) -> [z_0, z_1, …, z_T] (N + 1 latents, fp32), guidance 1 with c; `reg`:
    each ε_θ regularised (noise_reg.regularise) before its step; `until`: stop after that many."""
    sched, z = model.scheduler, z0.float()
    latents, gen = [z], reg.generator() if reg else None
    for j, t in enumerate(tqdm(sched.timesteps(steps)[::-1][:until], disable=not progress,
                               desc="DDIM inversion")):                   # ε_θ(z_{t'}, t, c)
        eps = unet_eps(model, z.to(model.dtype), t, cond, at=(steps - 1 - j, steps)).float()
        if reg is not None:
            eps = regularise(eps, reg, gen, lambda o: sched.epsilon(o, z, sched.prev(t, steps)))
        z = sched.invert_step(eps, t, z, steps)                           # z_{t'} -> z_t
        latents.append(z)
    return latents


def null_text(model, latents: list[torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor,
              guidance: float, inner_steps: int = 10, epsilon: float = 1e-5,
              progress: bool = True):
    """Optimise ∅_t step by step so that guided DDIM from z̄_t lands on the inversion's z_{t−1}.

    latents: [z_0 … z_T] from `ddim_invert`; cond, uncond: (1, 77, d) = c, ψ("").
    Returns (∅_t for each step: list of (1, 77, d) fp32, inner losses per step, z̄_0).
    """
    sched, dtype, steps = model.scheduler, model.dtype, len(latents) - 1
    u = uncond.detach().float().clone()                   # ∅, fp32 master copy, warm-started
    z = latents[-1].float()                               # z̄_T = z_T
    found, losses = [], []
    bar = tqdm(total=steps * inner_steps, disable=not progress, desc="null-text")
    for i, t in enumerate(sched.timesteps(steps)):
        s = i * 50 / steps                                # i on the official 50-step scale
        target = latents[steps - 1 - i]                   # z_{t−1} of the DDIM inversion
        with torch.no_grad():
            eps_c = unet_eps(model, z.to(dtype), t, cond, at=(i, steps)).float()  # ε_θ(z̄_t,t,c)
        u = u.detach().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=1e-2 * (1 - s / 100))
        step_losses = []
        for _ in range(inner_steps):
            eps_u = unet_eps(model, z.to(dtype), t, u.to(dtype), batch=UNCOND_ROW,
                             at=(i, steps)).float()                           # ε_θ(z̄_t, t, ∅)
            loss = F.mse_loss(sched.step(cfg(eps_u, eps_c, guidance), t, z, steps), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_losses.append(loss.item())
            bar.update()
            if step_losses[-1] < epsilon + 2e-5 * s:      # early stop
                break
        bar.update(inner_steps - len(step_losses))
        u = u.detach()
        found.append(u.clone())
        losses.append(step_losses)
        with torch.no_grad():                             # z̄_{t−1} with the optimised ∅_t
            eps_u = unet_eps(model, z.to(dtype), t, u.to(dtype), batch=UNCOND_ROW,
                             at=(i, steps)).float()
            z = sched.step(cfg(eps_u, eps_c, guidance), t, z, steps)
    bar.close()
    return found, losses, z


def invert(model, x: torch.Tensor, prompt: str, method: str = "null-text", steps: int = 50,
           guidance: float = 7.5, inner_steps: int = 10, progress: bool = True,
           reg: Regulariser | None = None, renoise_steps: int = 1) -> Inversion:
    """An image x (1, 3, H, W) in [−1, 1] described by `prompt` -> Inversion (`reg`: the
    DDIM inversion's ε regularised as Pix2Pix-Zero's; with renoise: ReNoise's own
    regularisation, seeded by reg.seed; `renoise_steps`: ReNoise's K)."""
    if method not in METHODS:
        raise MinipError(f"unknown inversion method {method!r}; use {', '.join(METHODS)}")
    if not isinstance(inner_steps, int) or inner_steps < 1:
        raise ParameterError("inner_steps", f"must be an integer ≥ 1, got {inner_steps!r}")
    model.scheduler.timesteps(steps)                                       # validates steps
    z0 = images.encode(model, x)                                          # (1, 4, h, w)
    cond, empty = encode_text(model, [prompt]), encode_text(model, [""])   # (1, 77, d) each
    losses = offsets = y_T = None
    if method == "edict":
        x_T, y_T = edict.invert(model, z0, cond, empty, steps, guidance, progress=progress)
        latents = [x_T]                                  # float64, kept so; no trajectory
    elif method == "renoise":
        latents = renoise.invert(model, z0, cond, steps, renoise_steps, reg is not None,
                                 reg.seed if reg else 0, progress)
    else:
        latents = ddim_invert(model, z0, cond, steps, progress, reg)
    if method == "direct":
        offsets = direct.offsets(model, latents, cond, empty, guidance, progress).cpu()
    if method == "null-text":
        found, losses, _ = null_text(model, latents, cond, empty, guidance, inner_steps,
                                     progress=progress)
        uncond = torch.stack(found)                                       # (N, 1, 77, d)
    else:
        uncond = (cond if method == "negative-prompt" else empty).float()[None]  # (1, 1, 77, d)
    digest, probe = fingerprint(model)
    pixels = ((x[0].float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Inversion(latents[-1].cpu(), uncond.cpu(), prompt, method, steps, float(guidance),
                     x.shape[2], x.shape[3], model.name, digest, probe,
                     pixels.permute(1, 2, 0).contiguous(), None if y_T is not None else latents,
                     losses, reg.describe() if reg else "", offsets,
                     None if y_T is None else y_T.cpu())


def run(model, inv: Inversion, prompts: list[str], control=None, guidance: float | None = None,
        progress: bool = True, return_latents: bool = False,
        free_text_encoder: bool = False) -> torch.Tensor:
    """Denoise from the inversion's z_T with its ∅_t shared by every prompt (the source first).
    One prompt (the source) gives the reconstruction. Returns images (B, 3, H, W) in [0, 1]."""
    cond = encode_text(model, prompts)                                    # (B, 77, d)
    if free_text_encoder:                                                 # see pipeline.generate
        model.text_encoder = None
    uncond = [u.to(model.device, model.dtype) for u in inv.per_step()]    # N × (1, 77, d)
    g = inv.guidance if guidance is None else guidance
    if inv.y_T is not None:                                               # EDICT's pair
        z = edict.generate(model, inv.z_T, inv.y_T, cond, uncond[0], inv.steps, g,
                           control=control, progress=progress)
        return z if return_latents else decode(model, z)
    if inv.offsets is not None:                                           # Direct Inversion
        control = Compose(direct.AddOffsets(inv.offsets), control)
    z = denoise(model, cond, uncond, inv.z_T, inv.steps, g, control, progress=progress)
    return z if return_latents else decode(model, z)

# ---- which model made it ---------------------------------------------------------------------

def fingerprint(model) -> tuple[str, torch.Tensor]:
    """(hash of the UNet, VAE and scheduler configs, probe (k, 2): the L2 norm and the size of
    every UNet and VAE weight tensor, in key order)."""
    cfgs = repr((model.unet.cfg, model.vae.cfg, model.scheduler.cfg))
    probe = [torch.stack([torch.linalg.vector_norm(v, dtype=torch.float32).cpu(),
                          torch.tensor(float(v.numel()))])
             for module in (model.unet, model.vae)
             for _, v in sorted(module.state_dict().items()) if v.is_floating_point()]
    return hashlib.sha256(cfgs.encode()).hexdigest()[:16], torch.stack(probe)


def same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do two probes describe the same weights? Norms agree within max(0.1 %, 1 %/√size): fp16
    and bf16 copies of the same weights match (their rounding averages out), changed ones do not."""
    if a.shape != b.shape or not torch.equal(a[:, 1], b[:, 1]):
        return False
    rtol = (1e-2 / a[:, 1].sqrt()).clamp(min=1e-3)
    return bool(((a[:, 0] - b[:, 0]).abs() <= rtol * b[:, 0].abs() + 1e-6).all())


def check(inv: Inversion, model, steps: int | None = None, height: int | None = None,
          width: int | None = None, source: str = "the inversion file"):
    """Refuse an inversion made with another model, step count or image size."""
    digest, probe = fingerprint(model)
    if digest != inv.model_config or not same_weights(probe, inv.probe.float()):
        raise MinipError(f"{source} was made with another model ('{inv.model}', not "
                         f"'{model.name}'); invert the image again with this model")
    if steps is not None and steps != inv.steps:
        raise MinipError(f"{source} was made with {inv.steps} steps, not {steps}; pass "
                         f"{inv.steps} steps or invert the image again")
    for name, want, got in (("height", height, inv.height), ("width", width, inv.width)):
        if want is not None and want != got:
            raise ParameterError(name, f"{want}: {source} is for {inv.width}×{inv.height} "
                                       "images; leave height and width out or invert again")


# ---- the file --------------------------------------------------------------------------------

def save(inv: Inversion, path) -> Path:
    """Write the inversion file atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {"z_T": inv.z_T, "uncond": inv.uncond, "probe": inv.probe}
    for name in ("image", "offsets", "y_T"):
        if getattr(inv, name) is not None:
            tensors[name] = getattr(inv, name)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(format=FORMAT, version=str(VERSION), prompt=inv.prompt, method=inv.method,
                steps=str(inv.steps), guidance=repr(inv.guidance), height=str(inv.height),
                width=str(inv.width), model=inv.model, model_config=inv.model_config,
                regularised=inv.regularised)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load(path) -> Inversion:
    """Read an inversion file; anything else (weights, garbage, damage) is one MinipError."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise MinipError(f"inversion file '{path}' not found" +
                         (" (it is a folder)" if path.is_dir() else ""))
    make = "make one with `minip2p invert IMAGE PROMPT`"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if meta.get("format") == FORMAT else {}
    except Exception:                         # safetensors raises several types on bad files
        raise MinipError(f"'{path}' is not an inversion file (not a safetensors file); "
                         f"{make}") from None
    if meta.get("format") != FORMAT:
        raise MinipError(f"'{path}' is not an inversion file (a safetensors file without "
                         f"minip2p inversion metadata: model weights?); {make}")
    if meta.get("version") != str(VERSION):
        raise MinipError(f"'{path}' is an inversion file of format version "
                         f"{meta.get('version')!r}; this minip2p reads version {VERSION}: "
                         "invert the image again")
    try:
        z_T = tensors["z_T"].double() if meta.get("method") == "edict" else tensors["z_T"].float()
        inv = Inversion(z_T, tensors["uncond"].float(), meta["prompt"],
                        meta["method"], int(meta["steps"]), float(meta["guidance"]),
                        int(meta["height"]), int(meta["width"]), meta["model"],
                        meta["model_config"], tensors["probe"].float(), tensors.get("image"),
                        regularised=meta.get("regularised", ""),
                        offsets=tensors.get("offsets"), y_T=tensors.get("y_T"))
        assert inv.method in METHODS and inv.steps >= 1
        assert inv.z_T.dim() == 4 and inv.z_T.shape[0] == 1
        assert inv.uncond.dim() == 4 and inv.uncond.shape[0] in (1, inv.steps)
        assert inv.uncond.shape[1:3] == (1, 77)
        assert (inv.offsets is not None) == (inv.method == "direct")
        assert inv.offsets is None or inv.offsets.shape[:2] == (inv.steps, 1)
        assert (inv.y_T is not None) == (inv.method == "edict")
    except (KeyError, ValueError, AssertionError):
        raise MinipError(f"'{path}' is a damaged inversion file (missing or inconsistent "
                         f"entries); invert the image again") from None
    return inv
