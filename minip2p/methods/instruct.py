"""InstructPix2Pix (Brooks et al., CVPR 2023): edit a picture by an instruction ("make it blue").

The model is SD 1.x whose conv_in takes 8 channels instead of 4: z_t and the picture's VAE latents
side by side. The picture's latents are the posterior mode E(I), NOT multiplied by the scaling
factor (as the official code and diffusers' pipeline). Each step runs three rows per image,

    (T, I): the instruction and the picture     ε_TI
    (∅, I): no text, the picture                 ε_I
    (∅, ∅): no text, zeros for the picture      ε_∅

    ε̃ = ε_∅ + s_I · (ε_I − ε_∅) + s_T · (ε_TI − ε_I)        s_T = 7.5, s_I = 1.5

expressed as a `guidance.GuidanceBatch` (`instruct_layout`) and `guidance.cfg_image`, so every
controller (an AttentionStore for the instruction's cross-attention maps) works unchanged. The
official sampler is Euler ancestral with 100 steps (euler_a.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..real import images
from ..errors import MinipError
from .base import ParameterError, Result, Settings, check_number, param
from ..guidance import GuidanceBatch
from ..load import Model
from ..pipeline import check_size, decode, denoise, encode_text, seeded_sampler


NAME, EDITS_PICTURES = "instruct", "required"
SUMMARY = "InstructPix2Pix: edit a picture by an instruction (an InstructPix2Pix model)"
DEFAULTS = {"steps": 100, "sampler": "euler-a"}              # the official edit_cli.py


@dataclass
class Params:
    image_guidance: float = param(1.5, "s_I: how closely to keep the picture")
    instruction_embedding: str | None = param(
        None, "a learned instruction (Visii) file used instead of encoding the instruction; the "
              "instruction's words, if any, are added to it (a hybrid instruction)", kind="path")

    def check(self, prompts: list[str], s: Settings) -> None:
        check_number("image_guidance", self.image_guidance)
        if len(prompts) != 1:
            raise ParameterError("prompts", f"InstructPix2Pix takes one instruction, got "
                                            f"{len(prompts)}")


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    """The picture fitted to height × width (default: its own aspect at the model's size)."""
    from ..control import AttentionStore
    from ..pipeline import to_pil
    from .base import read_image
    check_model(model)
    photo = read_image(s.image)
    if s.height is None and s.width is None:
        height, width = default_size(model, photo)
    else:
        height, width = check_size(model, s.height, s.width)
    fitted = images.fit(photo, height, width)
    store = AttentionStore(1) if s.maps else None
    cond = None
    if p.instruction_embedding:
        from ..load.embeddings import read_instruction
        learned, eos, _ = read_instruction(p.instruction_embedding)
        cond = hybrid(model, learned, eos, prompts[0])
    out = edit(model, fitted, prompts[0], s.seed, s.steps, s.guidance, p.image_guidance,
               s.sampler, height, width, control=store, progress=s.progress, cond=cond)
    return Result(to_pil(out), list(prompts), [fitted], store=store)


def hybrid(model: Model, learned: torch.Tensor, eos: int, extra: str = "") -> torch.Tensor:
    """A learned instruction c_T (77, d) whose rows end at `eos` -> (1, 77, d), with the rows
    0 … eos₂−1 of ψ(extra) (its BOS and words) written over rows eos+2 … (Visii's hybrid
    instruction, its test_concatenate); `extra` empty: c_T as learned."""
    from ..model.tokenizer import END
    d = model.text_encoder.cfg.hidden_size if model.text_encoder is not None else None
    if d is not None and learned.shape[-1] != d:
        raise MinipError(f"the learned instruction is {learned.shape[-1]} wide but this model's "
                         f"text encoder is {d} wide; it was learned on another model")
    c = learned[None].clone().to(model.device, model.dtype)
    if extra.strip():
        eos2 = int((model.tokenizer([extra])[0] == END).nonzero()[0])
        n = min(eos2, c.shape[1] - (eos + 2))
        if n < eos2:
            raise MinipError(f"the words {extra!r} do not fit after the learned instruction "
                             f"({eos + 2} + {eos2} > 77 rows); use fewer words")
        c[0, eos + 2:eos + 2 + n] = encode_text(model, [extra])[0, :n].to(c)
    return c


def check_model(model: Model) -> None:
    """The UNet must take z_t ⊕ E(I): 2 × the VAE's latent channels."""
    c = model.vae.cfg.latent_channels
    if model.unet.cfg.in_channels != 2 * c:
        raise MinipError(f"{model.name} is not an InstructPix2Pix model: its UNet takes "
                         f"{model.unet.cfg.in_channels} input channels, not {2 * c} "
                         "(latents ⊕ image latents); use e.g. timbrooks/instruct-pix2pix")


def default_size(model: Model, im: Image.Image) -> tuple[int, int]:
    """The picture's aspect ratio with its longer side the model's native size (as the official
    edit_cli.py scales to 512), both sides multiples of the VAE's downscale factor."""
    f = model.vae.cfg.downscale
    native = model.unet.cfg.sample_size * f
    W, H = im.size
    k = native / max(W, H)
    return max(f, round(H * k / f) * f), max(f, round(W * k / f) * f)


@torch.no_grad()
def image_latents(model: Model, x: torch.Tensor) -> torch.Tensor:
    """x (1, 3, H, W) in [−1, 1] -> E(x), the posterior mode, unscaled: (1, c, H/f, W/f), fp32."""
    return model.vae.encode(x.to(model.device, model.dtype)).float()


def edit(model: Model, image, instruction: str, seed: int = 0, steps: int = 100,
         guidance: float = 7.5, image_guidance: float = 1.5, sampler: str = "euler-a",
         height: int | None = None, width: int | None = None, control=None,
         progress: bool = True, return_latents: bool = False, cond: torch.Tensor | None = None):
    """A picture (PIL, or x (1, 3, H, W) in [−1, 1]) and an instruction -> the edited picture
    (1, 3, H, W) in [0, 1] (or z_0 if `return_latents`). A PIL picture is centre-cropped and
    resized to height × width (default: its own aspect, the model's native size). `cond`: the
    instruction's text states (1, 77, d) given (a learned instruction, `hybrid`), not encoded."""
    check_model(model)
    if isinstance(image, Image.Image):
        if height is None and width is None:
            height, width = default_size(model, image)
        height, width = check_size(model, height, width)
        image = images.to_tensor(images.fit(image, height, width))
    height, width = check_size(model, image.shape[2], image.shape[3])
    model.scheduler.timesteps(steps)                                         # validates steps
    smp, z = seeded_sampler(model, sampler, seed, height, width)
    cond = encode_text(model, [instruction]) if cond is None else cond  # or a learned c_T
    uncond = encode_text(model, [""])
    z = denoise(model, cond, uncond, z, steps, guidance, control, progress=progress,
                batch=GuidanceBatch.instruct_layout(1), sampler=smp,
                image_latents=image_latents(model, image), image_guidance=image_guidance)
    return z if return_latents else decode(model, z)
