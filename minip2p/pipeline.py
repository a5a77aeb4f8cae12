"""Text -> image: encode prompts, denoise with classifier-free guidance, decode.

    c = ψ(P) for each prompt, ∅ = ψ("")
    z_T ~ N(0, I): one noise shared by every prompt of the batch (what P2P needs)
    for t = T … 1:   ε̃ = ε_θ(z_t, t, ∅) + g · (ε_θ(z_t, t, c) − ε_θ(z_t, t, ∅))    (one UNet call)
                     z_{t-1} = DDIM(z_t, ε̃)
    x = D(z_0 / 0.18215)

The rows of the UNet call are described by a `guidance.GuidanceBatch` (by default [∅ × B, c × B],
the unconditional half first, as in diffusers and the P2P code) and ε̃ is `guidance.cfg`. A
controller (minip2p.control) sees every site of the UNet it wants, and may rewrite the latents
before and after each step. `sample` is the loop as a generator (one z per step); `denoise` runs
it to the end. SDEdit starts it part-way (`start`, see methods/sdedit.py).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .fast import to_meta
from .fast.autotune import tuner
from .conditioning import eps as conditioned_eps
from .control import Controller
from .errors import MinipError
from .guidance import IMAGE, TEXT, UNCOND, GuidanceBatch
from .load import Model
from .memory import decode_tile, release
from .samplers import make_sampler


def check_size(model: Model, height: int | None, width: int | None) -> tuple[int, int]:
    """Default to the model's native size; refuse sizes the VAE cannot map to whole latents."""
    f = model.vae.cfg.downscale
    native = model.unet.cfg.sample_size * f
    height, width = height or native, width or native
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < f or v % f:
            raise MinipError(f"{name} must be a positive multiple of {f}, got {v!r}")
    return height, width


def initial_noise(model: Model, seed: int, height: int, width: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """z_T: (1, c, H/8, W/8), c = the VAE's latent channels (not the UNet's input channels, which
    differ for InstructPix2Pix), drawn on the CPU so that a seed gives the same image everywhere.
    `generator`: draw from it instead (Euler ancestral then draws its step noise after z_T from
    the same generator, as diffusers does)."""
    f, c = model.vae.cfg.downscale, model.vae.cfg.latent_channels
    gen = generator if generator is not None else torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, c, height // f, width // f), generator=gen)


def seeded_sampler(model: Model, name: str, seed: int, height: int, width: int):
    """(sampler, z_T) for a seed: DDIM, DPM-Solver++, or Euler ancestral drawing its step noise
    from the generator that drew z_T (one stream per seed, as diffusers with `generator=`)."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    z = initial_noise(model, seed, height, width, generator=gen)
    return make_sampler(name, model.scheduler.cfg, gen), z


@torch.no_grad()
def encode_text(model: Model, prompts: list[str]) -> torch.Tensor:
    """Prompts -> CLIP last hidden states (B, 77, width) in the model's dtype."""
    if model.text_encoder is None:
        raise MinipError("the text encoder was freed; load the model again to encode new prompts")
    ids = model.tokenizer(prompts).to(model.device)
    return model.text_encoder(ids)


def sample(model: Model, cond: torch.Tensor, uncond, z: torch.Tensor, steps: int = 50,
           guidance: float = 7.5, control: Controller | None = None, progress: bool = True,
           batch: GuidanceBatch | None = None,
           start: int = 0, sampler=None, image_latents: torch.Tensor | None = None,
           image_guidance: float = 1.5) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The guided loop as a generator: yields (step, t, z_{t−1}) after every step.

    cond: (B, 77, d), one per image; uncond: (1 or B, 77, d) or a list with one per step (null-text
    inversion). z: z_T (B or 1, 4, h, w). `batch`: the rows of the UNet call (default
    [∅ × B, c × B]).
    `start`: skip the first `start` of the `steps` timesteps (SDEdit); the controller's steps are
    counted from there, 0 … steps − start − 1.
    The UNet runs as loaded: with the fast path installed (minip2p/fast/, the default of
    `load_model`) fused attention wherever no controller reads or writes the probabilities,
    without it every M = softmax(QKᵀ/√d) formed (the reference path; tests prove both equal).
    `sampler`: DDIM (default, `model.scheduler`) or another of `samplers.SAMPLERS`; z_T is given
    with unit variance and scaled by the sampler's `init_sigma` (1 for DDIM and DPM-Solver++).
    `image_latents` (InstructPix2Pix, see instruct.py): (1 or B, c, h, w) concatenated to each
    row's z_t as `batch.image_cond` gives them; then `batch` has "image" rows and ε̃ is
    `cfg_image` with `guidance` (s_T) and `image_guidance` (s_I).
    """
    B = cond.shape[0]
    batch = batch or GuidanceBatch.cfg_layout(B)
    if batch.images != B:
        raise ValueError(f"the guidance batch describes {batch.images} images, cond has {B}")
    z = z.float().expand(B, *z.shape[1:]).clone().to(model.device)
    sched = sampler or model.scheduler
    timesteps = sched.timesteps(steps)[start:]
    if start and sched.name != "ddim":
        raise MinipError(f"starting part-way (SDEdit, real images) needs the ddim sampler, "
                         f"not {sched.name}")
    z = z * sched.init_sigma(steps) if start == 0 else z
    extra = 0 if image_latents is None else image_latents.shape[1]
    if model.unet.cfg.in_channels != z.shape[1] + extra:
        raise MinipError(f"{model.name}: the UNet takes {model.unet.cfg.in_channels} input "
                         f"channels, not {z.shape[1] + extra}"
                         + (" (an InstructPix2Pix model: use `minip2p instruct`)"
                            if extra == 0 else ""))
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="denoising")):
        u = uncond[start + i] if isinstance(uncond, (list, tuple)) else uncond
        if control is not None:
            z = control.before_step(z, i)
        context = batch.context({UNCOND: u, TEXT: cond, IMAGE: u})      # (rows, 77, d)
        z_in = batch.expand(sched.scale_input(z, t, steps))
        if image_latents is not None:                                   # z_t ⊕ E(I) (or ⊕ 0)
            z_in = torch.cat([z_in, batch.image_cond(image_latents.to(z_in))], dim=1)
        with torch.no_grad():                                          # ε_θ (+ ControlNets)
            eps = conditioned_eps(model, z_in.to(model.dtype), t, context, control, i, batch,
                                  at=(start + i, steps))
        eps = batch.guide(eps.float(), guidance, image_guidance if image_latents is not None
                          else None)                                   # CFG
        z = sched.step(eps, t, z, steps)
        if control is not None:
            z = control.after_step(z, i)
        yield i, t, z


def denoise(model: Model, cond: torch.Tensor, uncond, z: torch.Tensor, steps: int = 50,
            guidance: float = 7.5, control: Controller | None = None,
            callback: Callable | None = None, progress: bool = True,
            batch: GuidanceBatch | None = None, start: int = 0, sampler=None,
            **image) -> torch.Tensor:
    """Run `sample` to the end; `callback(step, t, z)` after every step. Returns z_0 (B, 4, h, w)
    in fp32. `image`: `image_latents`, `image_guidance` (InstructPix2Pix)."""
    for i, t, z_next in sample(model, cond, uncond, z, steps, guidance, control, progress,
                               batch, start, sampler, **image):
        z = z_next
        if callback is not None:
            callback(i, t, z)
    return z


class X0Recorder:
    """A `callback` for `denoise`/`generate` that keeps the predicted ẑ_0 (B, 4, h, w) of every
    step, recovered from z_t and z_{t−1} (DDIM.x0_between): x0[i] after step i. `z_T`: the noise the
    loop starts from (as passed to `generate(latents=…)`)."""

    def __init__(self, model: Model, z_T: torch.Tensor, steps: int):
        self.sched, self.steps, self.z, self.x0 = model.scheduler, steps, z_T.float(), []

    def __call__(self, step: int, t: int, z: torch.Tensor):
        self.x0.append(self.sched.x0_between(self.z.to(z), z, t, self.steps).cpu())
        self.z = z


@torch.no_grad()
def decode(model: Model, z: torch.Tensor) -> torch.Tensor:
    """z_0 (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1], fp32; one image at a time (the
    decoder's activations dominate peak memory), in tiles where `memory.decode_tile` says so.

    With the fast path installed (`model.fast`, minip2p/fast/) the decoder runs in the memory
    layout `autotune` measured faster here (the first two decodes at a size on a machine run one
    in each layout, timed): in PyTorch's default layout every oneDNN convolution reorders its
    input and output to and from a blocked layout, which channels-last skips
    (`python -m tools.bench_decode`); elsewhere (GPU, fp16) in channels-last. Without it, PyTorch's
    default layout. Same images within float rounding (tests/test_fast.py, test_autotune.py).
    `model.free_unet`: the UNet's weights are dropped first (moved to the meta device)."""
    if model.free_unet and not model.unet.conv_in.bias.is_meta:
        to_meta(model.unet)                       # the decoder's activations not on top of them
        release()
    f = model.vae.cfg.downscale
    z = (z / model.vae.cfg.scaling_factor).to(model.device, model.dtype)
    tile = decode_tile(model, f * z.shape[2], f * z.shape[3])
    tuned = (model.fast and model.device.type == "cpu"
             and model.dtype in (torch.float32, torch.bfloat16))
    key = (*z.shape[1:], *(("bf16",) if model.dtype == torch.bfloat16 else ()),
           *((f"tile{tile}",) if tile else ()))                   # measured apart
    untuned = "channels_last" if model.fast else "contiguous"
    images = []
    for zi in z:
        pick, trial = tuner().trial("decode", key) if tuned else (untuned, False)
        layout = torch.channels_last if pick == "channels_last" else torch.contiguous_format
        t0 = time.perf_counter()
        if tile:
            images.append(model.vae.decode_tiled(zi[None], tile, layout=layout))
        else:
            images.append(model.vae.decode(zi[None].contiguous(memory_format=layout)).float()
                          .contiguous())
        if trial:
            tuner().record("decode", key, pick, time.perf_counter() - t0)
    return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


def generate(model: Model, prompts: list[str], seed: int = 0, steps: int = 50,
             guidance: float = 7.5, height: int | None = None, width: int | None = None,
             control=None, latents: torch.Tensor | None = None, callback=None,
             progress: bool = True, return_latents: bool = False,
             free_text_encoder: bool = False, start: int = 0, sampler: str = "ddim"):
    """Prompts -> images (B, 3, H, W) in [0, 1] (or z_0 if `return_latents`).

    `sampler`: "ddim", "euler-a" (Euler ancestral: one noise per step, shared by the prompts) or
    "dpm++" (DPM-Solver++ 2M), see samplers.py.
    `free_text_encoder`: drop `model.text_encoder` once the prompts are encoded, so its weights
    (0.5 GB fp32 at SD 1.x) are not held during denoising; the model then encodes no new prompts.
    `latents` with `start`: begin part-way through the schedule from these z (SDEdit)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    height, width = check_size(model, height, width)
    model.scheduler.timesteps(steps)                                         # validates steps
    smp, z_T = seeded_sampler(model, sampler, seed, height, width)
    z = z_T if latents is None else latents
    cond = encode_text(model, prompts)
    uncond = encode_text(model, [""])
    if free_text_encoder:
        model.text_encoder = None
        release()                                  # its pages back to the system
    z = denoise(model, cond, uncond, z, steps, guidance, control, callback, progress,
                start=start, sampler=smp)
    return z if return_latents else decode(model, z)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images (rounded like diffusers: x·255, round)."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
