"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023, arXiv 2301.13826): strengthen the words a
generation neglects ("catastrophic neglect") by steering z_t so that every chosen word's
cross-attention map has at least one strongly attended patch.

At step i, for the conditional row of each image (the reference: yuval-alaluf/Attend-and-Excite;
diffusers' `StableDiffusionAttendAndExcitePipeline`):

    A      = mean over heads and layers of the cross maps at 16² (512 px)       (p, 77)
    Â      = softmax_k(100 · A[:, 1 : 76])            over the tokens after START (SD 1.x: to the
             end of the 77; `normalize_eot`: only up to the prompt's END token, the SD 2.1 option)
    Ã_s    = Gauss₃ₓ₃,σ=0.5 * Â_s   (reflect padding; the reference's kernel exp(−((x−μ)/2σ)²))
    L      = max_s (1 − max_p Ã_s(p)),   clamped at 0, over the words s to excite
    z_t   ← z_t − α_i ∇_{z_t} L,     α_i = 20 · √(linspace(1, 0.5, N))_i,   for i < 25 of N = 50

Iterative refinement: at steps 0, 10, 20, while L > 1 − θ_i (θ = 0.05, 0.5, 0.8), repeat the
update (at most 20 times), then recompute L at the final z_t for the step's own update.

Other step counts: the reference keeps these step indices (25; 0/10/20) whatever N is. `build`
scales them by N/50 for the CLI (`--excite-steps` sets the 25 at 50 steps); the functions take
the exact values, which the differential test passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .base import ParameterError, Result, Settings, check_word, param
from ..control import map_shape
from .gradient import GradientGuidance, head_mean

__all__ = ["gaussian_kernel", "max_attention", "loss", "AttendExcite", "build"]

THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """(1, 1, size, size), summing to 1; exp(−((x−μ)/(2σ))²) per axis, as the reference."""
    x = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-(((x - (size - 1) / 2) / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    k = g[:, None] * g[None, :]
    return (k / k.sum())[None, None]


def max_attention(A: torch.Tensor, indices: list[int], end: int | None = None,
                  shape: tuple[int, int] | None = None) -> list:
    """A: (p, 77) averaged maps -> max_p Ã_s(p) for each token index s (positions in the 77);
    `shape`: the maps' (rows, cols) (None: square)."""
    shape = shape or (math.isqrt(A.shape[0]),) * 2
    text = (A[:, 1:end if end is not None else -1] * 100).softmax(dim=-1)      # (p, 75)
    kernel = gaussian_kernel().to(A)
    out = []
    for s in indices:
        image = text[:, s - 1].reshape(1, 1, *shape)                           # (1, 1, h, w)
        image = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="reflect"), kernel)
        out.append(image.max())
    return out


def loss(maxima: list[torch.Tensor]) -> torch.Tensor:
    """L = max_s max(0, 1 − max_p Ã_s)."""
    return torch.stack([(1.0 - m).clamp(min=0) for m in maxima]).max()


class AttendExcite(GradientGuidance):
    """The Attend-and-Excite update of z_t before each of the first `max_iter` steps.

    indices: the token positions to excite, one list per image (the same for all if one);
    pixels: the map resolution (16² at 512 px); thresholds: {step: θ}."""

    def __init__(self, model, cond: torch.Tensor, indices, steps: int, pixels: int = 16 ** 2,
                 max_iter: int = 25, thresholds: dict | None = None, scale_factor: float = 20.0,
                 max_refinement: int = 20, normalize_eot: list[int] | None = None):
        super().__init__(model, cond, steps,
                         pick=lambda s: s.kind == "cross" and s.pixels == pixels)
        self.indices = indices if isinstance(indices[0], (list, tuple)) else [indices]
        self.max_iter, self.max_refinement = max_iter, max_refinement
        self.thresholds = THRESHOLDS if thresholds is None else thresholds
        self.step_size = scale_factor * np.sqrt(np.linspace(1.0, 0.5, steps))     # α_i
        self.ends = normalize_eot                                     # END position per image

    def active(self, step):
        return step < self.max_iter or step in self.thresholds

    def _loss(self, z, b, step):
        """(leaf z, L) for image b."""
        leaf, rec = self.maps_of(z, step, images=[b])
        A = head_mean([M for _, M in rec.maps])
        idx = self.indices[b if len(self.indices) > 1 else 0]
        end = self.ends[b] if self.ends is not None else None
        return leaf, loss(max_attention(A, idx, end, map_shape(A.shape[0], tuple(z.shape[-2:]))))

    def _descend(self, leaf, L, step):
        (grad,) = torch.autograd.grad(L, [leaf])
        return leaf.detach() - self.step_size[step] * grad               # z ← z − α_i ∇_z L

    def update(self, z, step, t):
        rows = []
        for b in range(z.shape[0]):                                       # each image on its own
            leaf, L = self._loss(z[b:b + 1], b, step)
            theta = self.thresholds.get(step)
            if theta is not None and L > 1.0 - theta:                    # iterative refinement
                target, k = max(0.0, 1.0 - theta), 0
                while L > target:
                    k += 1
                    leaf, L = self._loss(leaf, b, step)
                    if L != 0:
                        leaf = self._descend(leaf, L, step)
                    if k >= self.max_refinement:
                        break
                leaf, L = self._loss(leaf, b, step)
            if step < self.max_iter and L != 0:
                leaf = self._descend(leaf, L, step)
            self.energies[step] = float(L.detach())
            rows.append(leaf.detach())
        return torch.cat(rows)


def scaled(steps: int, excite_steps: int | None = None) -> tuple[int, dict]:
    """The reference's schedule for 50 steps, scaled to `steps`: (max_iter, thresholds)."""
    f = steps / 50
    max_iter = round(25 * f) if excite_steps is None else round(excite_steps * f)
    return max_iter, {round(k * f): v for k, v in THRESHOLDS.items() if round(k * f) < steps}


def map_pixels(model, height: int, width: int) -> int:
    """The maps' resolution: a quarter of the latent side (16² at 512 px) if a cross-attention
    level has it, else the coarsest level with cross-attention (the toy model at 64 px: 8²)."""
    cfg, f = model.unet.cfg, model.vae.cfg.downscale
    h, w = height // f, width // f
    levels = [i for i, k in enumerate(cfg.down_block_types) if k.startswith("CrossAttn")]
    sizes = [(-(-h // 2 ** i)) * (-(-w // 2 ** i)) for i in levels]       # ceil at each level
    want = (h // 4) * (w // 4)
    return want if want in sizes else min(sizes)


NAME, EDITS_PICTURES = "attend-excite", "no"
SUMMARY = "Attend-and-Excite: make sure each named word of the prompt appears"


@dataclass
class Params:
    """Attend-and-Excite's parameters (the official schedule, scaled to the steps)."""
    words: list | None = param(None, "words of the prompt that must each appear", kind="words")
    excite_steps: int | None = param(None, "update z_t in the first N of 50 steps, scaled to the "
                                           "steps (25)", kind=int)

    def check(self, prompts: list[str], s: Settings) -> None:
        s.ddim_only("Attend-and-Excite")
        if len(prompts) != 1:
            raise ParameterError("prompts", f"Attend-and-Excite steers one prompt, got "
                                            f"{len(prompts)}")
        if not self.words:
            raise ParameterError("words", "are needed: the words of the prompt that must appear")
        for w in self.words:
            check_word("words", w, prompts[0])
        n = self.excite_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 50):
            raise ParameterError("excite_steps", f"counts steps of 50 (scaled to the steps), in "
                                                 f"[0, 50], got {n!r}")


def build(model, prompt: str, cond: torch.Tensor, words: list[str], steps: int, height: int,
          width: int, excite_steps: int | None = None) -> AttendExcite:
    """From its parameters: words of `prompt` (refused if absent), maps at a quarter of the
    latent side (16² at 512 px; the coarsest cross maps there are)."""
    Params(words, excite_steps).check([prompt], Settings(steps=steps))
    indices = []
    for w in words:
        indices += model.tokenizer.word_positions(prompt, w)
    pixels = map_pixels(model, height, width)
    max_iter, thresholds = scaled(steps, excite_steps)
    return AttendExcite(model, cond, indices, steps, pixels, max_iter, thresholds)


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    from ..pipeline import check_size, encode_text, generate, to_pil
    height, width = check_size(model, s.height, s.width)
    ctrl = build(model, prompts[0], encode_text(model, prompts), p.words, s.steps, height, width,
                 p.excite_steps)
    out = generate(model, prompts, s.seed, s.steps, s.guidance, height, width, control=ctrl,
                   progress=s.progress, sampler=s.sampler)
    return Result(to_pil(out), list(prompts))
