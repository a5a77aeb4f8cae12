"""DiffuseIT (Kwon & Ye, ICLR 2023): translate a picture while keeping its structure, by guiding
each denoising step with losses on the predicted clean picture — a DINO ViT's key
self-similarity keeps the structure, CLIP (or a target picture's DINO [CLS]) sets the meaning.

Start (`start`): "noised", as SDEdit and the official code (its q_sample of the picture):
z_t₀ = √ᾱ_t₀·E(x_src) + √(1−ᾱ_t₀)·ε at t₀ = strength·T (the official code skips 40 of 100 steps:
0.6); or "inverted": z_t₀ by DDIM inversion of E(x_src) under the source prompt (guidance 1),
which the latent adaptation allows ("a noised or inverted start"). Noised is the default, chosen
by measurement on the toy model (tools/README.md): there the inverted start kept the object's
outline no more often and broke more pictures (sampling at guidance 7.5 under the target prompt
leaves the inversion's path from the first step). At each step, on the conditional row, with
gradients through the UNet and the VAE decoder D (methods/diffuseit_losses.py for each L):

    ẑ₀     = (z_t − √(1−ᾱ_t)·ε_θ(z_t, t, c)) / √ᾱ_t
    z_mix  = √(1−ᾱ_t)·ẑ₀ + (1 − √(1−ᾱ_t))·z_t          the official "noise augmentation"
    x_mix  = D(z_mix),  x̂₀ = D(ẑ₀),  x_in = x_mix (noise_aug) or x̂₀
    L      = λ_clip·L_clip(x_mix) + λ_ssim·L_ssim(x_in, x_src) + f·λ_contra·L_contra(x_in, x_src)
             + [t > t_sem] λ_sem·L_sem(x_in, x_prev) + λ_range·L_range(x̂₀)
             (+ λ_trg·L_trg(x_in, y) + λ_px·‖x_in − y‖² with a target picture y, in [−1, 1])
    ε̃'     = ε̃ + s·√(1−ᾱ_t)·∇_{z_t} L                   the score correction (ε̃: after CFG)

f = 2 once the CLIP loss is below −0.5 (`regularize_content`), else 1; x_prev = the last step's
x_in (x_src at the start). t_sem = 500: the code's `diff_iter` 50 counts the 100 respaced steps
(its cond_fn unscales t to them), i.e. half of the schedule. DDIM is linear in ε, so the
corrected step is the plain step plus c_t·δ with δ = s·√(1−ᾱ_t)·∇L and c_t = √(1−ᾱ_{t−1}) − √ᾱ_{t−1}·√(1−ᾱ_t)/√ᾱ_t: the controller
computes δ in `before_step` and adds c_t·δ in `after_step` — the sampling loop is untouched.

What the official code does that we do not, and why: it guides a pixel-space ADM (256²) with
DDPM steps (the mean shifted by Σ·∇), sums CLIP over five CLIP models and restarts a run whose
range loss exceeds 0.01. Here the model is a latent diffusion model sampled by DDIM, so the
losses see D(ẑ₀) (the "latent adaptation"), the correction is the DDIM score form, one CLIP
model is used, and there is no restart. Its RePaint resampling of the first step is `resample`
R (10, as the official code): R − 1 times the guided step t₀ → t₁ and back to t₀ with fresh
noise, then the loop. `scale` s (1) is ours: a gradient with respect to a latent is not one with
respect to pixels.

Defaults: the official weights (λ_contra 200, λ_range 200, λ_trg 2000, λ_px 3000) except three,
chosen by measurement on the toy model (tools/README.md) — λ_clip 200 (official 2000), λ_sem 0
(official 100), λ_ssim 20000 (official 1000). At the official weights the first guided step's
correction on the toy's 4 × 8 × 8 latent is ≈ 10³: x̂₀ leaves [−1, 1] and the structure does not
come back. The toy model takes the colour from the target prompt alone, so the CLIP push can be
small and the semantic divergence (a push away from the last step's [CLS]) is not needed; its
prior at strength 0.6 draws objects bigger and nearer the middle, which only a structure term
20× the official one holds back (the official weights are set for pixel-space gradients).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..control import Controller
from .base import ParameterError, Result, Settings, check_number, param
from . import diffuseit_losses as L
from .gradient import cond_rows

NAME, EDITS_PICTURES = "diffuseit", "required"
STARTS = ("noised", "inverted")
SUMMARY = "DiffuseIT: keep the picture's DINO structure while CLIP (or a target picture) " \
          "changes its meaning"


@dataclass
class Params:
    strength: float = param(0.6, "noise level of the start, in (0, 1] (as SDEdit's)")
    start: str = param("noised", "'noised' (SDEdit's start, as the official code) or "
                                 "'inverted' (DDIM inversion under the SOURCE prompt to t₀)")
    target_image: str | None = param(None, "a picture whose appearance to take (image-guided "
                                           "mode; the CLIP loss is then off)")
    clip_weight: float = param(200.0, "λ_clip: CLIP directional loss (official 2000)")
    structure_weight: float = param(20000.0, "λ_ssim: DINO key self-similarity to the source "
                                             "(official 1000)")
    contrastive_weight: float = param(200.0, "λ_contra: PatchNCE on DINO keys")
    semantic_weight: float = param(0.0, "λ_sem: [CLS] divergence from the previous step "
                                        "(official 100)")
    semantic_until: int = param(500, "t_sem: the semantic loss acts while t > t_sem (of 1000)")
    range_weight: float = param(200.0, "λ_range: keep x̂₀ in [−1, 1]")
    target_weight: float = param(2000.0, "λ_trg: [CLS] to the target picture's (image mode)")
    pixel_weight: float = param(3000.0, "λ_px: pixel MSE to the target picture (image mode)")
    cuts: int = param(8, "random views of x̂₀ the CLIP loss averages")
    noise_aug: bool = param(True, "losses see the noise-augmented z_mix, as the official runs")
    regularize_content: bool = param(True, "double the contrastive loss once CLIP loss < −0.5")
    resample: int = param(10, "R: the first step taken R times, back to t₀ in between "
                              "(RePaint, as the official code)")
    scale: float = param(1.0, "s: multiplies the correction (ours)")
    dino: str = param("facebook/dino-vitb8", "DINO ViT: a folder or a cached Hub id")
    clip: str = param("openai/clip-vit-base-patch16", "CLIP: a folder or a cached Hub id")

    def check(self, prompts: list[str], s: Settings) -> None:
        from .sdedit import check_strength, start_index
        check_strength(self.strength)
        start_index(s.steps, self.strength)
        s.ddim_only("DiffuseIT")
        if self.start not in STARTS:
            raise ParameterError("start", f"must be one of {', '.join(STARTS)}, got {self.start!r}")
        if len(prompts) != 2:
            raise ParameterError("prompts", "DiffuseIT takes a SOURCE prompt (what the picture "
                                            "shows) and a TARGET prompt")
        for name in ("clip_weight", "structure_weight", "contrastive_weight", "semantic_weight",
                     "range_weight", "target_weight", "pixel_weight", "scale"):
            check_number(name, getattr(self, name), 0)
        if isinstance(self.cuts, bool) or not isinstance(self.cuts, int) or not 0 <= self.cuts <= 64:
            raise ParameterError("cuts", f"must be an integer in [0, 64], got {self.cuts!r}")
        for name in ("dino", "clip"):
            check_model(name, getattr(self, name))
        if self.target_image is not None and not Path(str(self.target_image)).is_file() \
                and not hasattr(self.target_image, "size"):
            raise ParameterError("target_image", f"'{self.target_image}' is not an image file")
        if isinstance(self.resample, bool) or not isinstance(self.resample, int) \
                or not 1 <= self.resample <= 100:
            raise ParameterError("resample", f"must be an integer in [1, 100], got "
                                             f"{self.resample!r}")
        if isinstance(self.semantic_until, bool) or not isinstance(self.semantic_until, int) \
                or not 0 <= self.semantic_until <= 1000:
            raise ParameterError("semantic_until", f"must be an integer in [0, 1000], got "
                                                   f"{self.semantic_until!r}")


def check_model(name: str, spec) -> None:
    """A folder, or an owner/name Hub id (looked up in the cache when the run starts)."""
    text = str(spec)
    if Path(text).is_dir():
        return
    if not isinstance(spec, str) or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ParameterError(name, f"'{text}' is neither a folder nor a Hub id (owner/name)")


class DiffuseITGuidance(Controller):
    """The score correction of each step (see the module docstring). `losses` holds the last
    step's terms, for reports and tests."""

    def __init__(self, model, cond, p: Params, x_src, steps: int, start: int, dino, clip=None,
                 direction=None, target=None, seed: int = 0):
        self.model, self.cond, self.p, self.steps, self.start = model, cond, p, steps, start
        self.x_src, self.prev, self.target = x_src, x_src, target
        self.dino, self.clip, self.direction = dino, clip, direction
        self.timesteps = model.scheduler.timesteps(steps)
        self.generator = torch.Generator().manual_seed(seed)
        self.clip_prev = 0.0
        self.delta = None
        self.losses: dict[str, float] = {}

    def wants(self, site):
        return False

    def decode(self, z):
        m = self.model
        return m.vae.decode((z / m.vae.cfg.scaling_factor).to(m.dtype)).float() / 2 + 0.5

    def loss(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """L of the module docstring at z_t (a leaf with gradients)."""
        p, m = self.p, self.model
        a = m.scheduler.alpha(t).float()
        out = m.unet(z.to(m.dtype), t, self.cond.to(m.dtype), batch=cond_rows(1)).float()
        eps = m.scheduler.epsilon(out, z, t)                  # ε (also from a v-prediction)
        z0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        fac = (1 - a).sqrt()
        x_mix = self.decode(fac * z0 + (1 - fac) * z) if (p.noise_aug or self.clip) else None
        x0 = self.decode(z0) if (not p.noise_aug or p.range_weight) else None
        x_in = x_mix if p.noise_aug else x0
        terms = {}
        if self.clip is not None and p.clip_weight:
            terms["clip"] = L.clip_loss(self.clip, x_mix, self.direction, p.cuts, self.generator)
        frac = 2.0 if p.regularize_content and self.clip_prev < -0.5 else 1.0
        terms["structure"] = L.structure_loss(self.dino, x_in, self.x_src) * p.structure_weight
        terms["contrastive"] = L.contrastive_loss(self.dino, x_in, self.x_src) \
            * p.contrastive_weight * frac
        if t > p.semantic_until and p.semantic_weight:
            terms["semantic"] = L.semantic_loss(self.dino, x_in, self.prev) * p.semantic_weight
        if p.range_weight:
            terms["range"] = L.range_loss(x0) * p.range_weight
        if self.target is not None:
            terms["target"] = L.target_loss(self.dino, x_in, self.target) * p.target_weight
            terms["pixel"] = ((2 * x_in - 1) - (2 * self.target - 1)).pow(2).mean() * p.pixel_weight
        if "clip" in terms:
            self.clip_prev = float(terms["clip"].detach())
            terms["clip"] = terms["clip"] * p.clip_weight
        self.prev = x_in.detach()
        self.losses = {k: float(v.detach()) for k, v in terms.items()}
        return sum(terms.values())

    def before_step(self, z, step):
        t = self.timesteps[self.start + step]
        a = self.model.scheduler.alpha(t).float()
        cond_z = z[:1].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            grad, = torch.autograd.grad(self.loss(cond_z, t), cond_z)
        self.delta = self.p.scale * (1 - a).sqrt() * grad
        return z

    def after_step(self, z, step):
        t = self.timesteps[self.start + step]
        sched = self.model.scheduler
        a, a_prev = sched.alpha(t).float(), sched.alpha(sched.prev(t, self.steps)).float()
        c = (1 - a_prev).sqrt() - a_prev.sqrt() * (1 - a).sqrt() / a.sqrt()
        return z + c * self.delta


def load_judges(p: Params, text_mode: bool):
    from ..data.clip_image import load_clip
    from ..model.dino import load_dino
    return load_dino(p.dino), (load_clip(p.clip) if text_mode and p.clip_weight else None)


def run(model, prompts: list[str], p: Params, s: Settings, judges=None) -> Result:
    """`judges`: (dino, clip) already loaded (tests, several runs); default: load p.dino, p.clip."""
    from ..pipeline import check_size, decode, denoise, encode_text, initial_noise, to_pil
    from ..real import images
    from .base import read_image
    from .sdedit import inverted, noised
    height, width = check_size(model, s.height, s.width)
    fitted = images.fit(read_image(s.image), height, width)
    x_src = images.to_tensor(fitted).float() / 2 + 0.5                      # (1, 3, H, W) in [0, 1]
    target = None
    if p.target_image is not None:
        picture = images.fit(read_image(p.target_image), height, width)
        target = images.to_tensor(picture).float() / 2 + 0.5
    dino, clip = judges if judges is not None else load_judges(p, target is None)
    direction = None
    if clip is not None and target is None:
        direction = L.clip_direction(clip, prompts[1], prompts[0], x_src)
    cond, uncond = encode_text(model, [prompts[1]]), encode_text(model, [""])
    z0 = images.encode(model, images.to_tensor(fitted))
    if p.start == "inverted":
        z, start = inverted(model, z0, encode_text(model, [prompts[0]]), s.steps, p.strength,
                            s.progress)
    else:
        z, start = noised(model, z0, s.steps, p.strength, initial_noise(model, s.seed, height,
                                                                          width))
    guide = DiffuseITGuidance(model, cond, p, x_src, s.steps, start, dino, clip, direction,
                              target, s.seed)
    z = resample_first(model, z, start, cond, uncond, s, guide, p.resample)
    z = denoise(model, cond, uncond, z, s.steps, s.guidance, guide, progress=s.progress,
                start=start)
    return Result([fitted] + to_pil(decode(model, z)), list(prompts), [fitted],
                  extra={"losses": guide.losses})


def resample_first(model, z, start: int, cond, uncond, s: Settings, guide, R: int):
    """The official first step, RePaint's resampling: R − 1 times the guided step t₀ → t₁, then
    back to t₀ with fresh noise n, z_t₀ = √(ᾱ_t₀/ᾱ_t₁)·z_t₁ + √(1 − ᾱ_t₀/ᾱ_t₁)·n (the R-th
    step is the loop's own)."""
    from ..pipeline import sample
    sched = model.scheduler
    t0 = sched.timesteps(s.steps)[start]
    a = sched.alpha(t0).float() / sched.alpha(sched.prev(t0, s.steps)).float()
    noise = torch.Generator().manual_seed(s.seed + 1)
    for _ in range(R - 1):
        _, _, z1 = next(sample(model, cond, uncond, z, s.steps, s.guidance, guide, False,
                               start=start))
        z = a.sqrt() * z1 + (1 - a).sqrt() * torch.randn(z1.shape, generator=noise).to(z1)
    return z
