"""The three ways an attention-control edit of prompts runs (Prompt-to-Prompt, MasaCtrl), shared:

    from noise      z_T ~ N(0, I) shared by every prompt; the controller sees every step
    from a picture  SDEdit (`strength` s): z_t₀ = the picture noised to t₀, then n = ⌊N·s⌋ steps
                    that the controller counts 0 … n − 1 (methods/sdedit.py)
    from a picture  inverted (`inversion`: DDIM, null-text, negative-prompt, Direct Inversion,
                    EDICT or ReNoise; real/invert.py): z_T and ∅_t of the picture under the
                    source prompt (EDICT: its pair), then the edit from z_T

A method gives `make_control(model, prompts, steps, step_pixels, trajectory)` -> (controller,
AttentionStore or None); `trajectory` is the inversion's [z_0 … z_T] where there is one
(MasaCtrl pins its source row to it).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import INVERSIONS, ParameterError, Result, Settings, check_number, param, read_image

__all__ = ["RealImage", "edit_prompts", "picture", "inversion_of", "over_time"]


@dataclass
class RealImage:
    """The parameters of an edit that may start from a real picture (`image=`)."""
    inversion: str = param("null-text", "how the picture is inverted: ddim (∅ = \"\"), null-text "
                           "(∅_t optimised per step, slow), negative-prompt (∅ = the prompt, "
                           "fast), direct (the source kept on its DDIM trajectory, fast), edict "
                           "(exact coupled pair) or renoise (refined DDIM steps)", INVERSIONS)
    inner_steps: int = param(10, "null-text: at most this many Adam steps per denoising step")
    renoise_steps: int = param(1, "renoise: fixed-point iterations K per inversion step")
    strength: float | None = param(None, "SDEdit instead of inversion: start from the picture "
                                         "noised this much, in (0, 1]")
    regularise: bool = param(False, "Pix2Pix-Zero's regularised DDIM inversion (each ε pushed "
                                    "towards white noise)")
    reg_steps: int = param(5, "regularise: rounds of gradient steps per inversion step")
    lambda_ac: float = param(20.0, "regularise: auto-correlation step size λ_AC")
    lambda_kl: float = param(20.0, "regularise: KL step size λ_KL")

    def check_real(self, s: Settings, defaults) -> None:
        """Real-image parameters: in range, and only where a picture is inverted."""
        from ..real.invert import Inversion
        if self.inversion not in INVERSIONS:
            raise ParameterError("inversion", f"must be one of {', '.join(INVERSIONS)}, "
                                              f"got {self.inversion!r}")
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or \
                self.inner_steps < 1:
            raise ParameterError("inner_steps", f"must be an integer ≥ 1, got {self.inner_steps!r}")
        if isinstance(self.renoise_steps, bool) or not isinstance(self.renoise_steps, int) or \
                self.renoise_steps < 0:
            raise ParameterError("renoise_steps", f"must be an integer ≥ 0, got "
                                                  f"{self.renoise_steps!r}")
        if self.renoise_steps != defaults.renoise_steps and self.inversion != "renoise":
            raise ParameterError("renoise_steps", "sets ReNoise's iterations; add {inversion} "
                                                  "renoise")
        if self.regularise and self.inversion == "edict":
            raise ParameterError("regularise", "regularises a DDIM-type inversion; EDICT's is "
                                               "exact: leave it out")
        self.regulariser(0, checked=True)          # its ranges, where they are declared
        if self.strength is not None:
            check_number("strength", self.strength, 0.0, 1.0, low_open=True)
            if s.image is None:
                raise ParameterError("strength", "sets how far SDEdit noises the picture; add "
                                                 "{image}")
            if isinstance(s.image, Inversion):
                raise ParameterError("strength", "noises a picture, not an inversion file; "
                                                 "give the picture")
        for name in ("reg_steps", "lambda_ac", "lambda_kl"):
            if getattr(self, name) != getattr(defaults, name) and not self.regularise:
                raise ParameterError(name, "sets the regularised inversion; add {regularise}")
            if getattr(self, name) != getattr(defaults, name) and self.inversion == "renoise":
                raise ParameterError(name, "sets Pix2Pix-Zero's regulariser; ReNoise's has its "
                                           "own constants: leave it out")
        if self.regularise:
            why = ("an inversion file is already inverted" if isinstance(s.image, Inversion)
                   else "SDEdit (strength) noises the picture" if self.strength is not None
                   else "nothing is inverted without {image}" if s.image is None else None)
            if why:
                raise ParameterError("regularise", f"regularises the DDIM inversion of the "
                                                   f"picture, and {why}; leave it out")
        if s.image is not None:
            s.ddim_only("a real image (inversion, SDEdit)")
            if s.over_time:
                raise ParameterError("over_time", "follows prompts generated from noise; leave "
                                                  "out image")

    def regulariser(self, seed: int, checked: bool = False):
        """Pix2Pix-Zero's Regulariser (None without `regularise`; `checked`: built anyway, to
        check its settings)."""
        from .noise_reg import Regulariser
        return Regulariser(self.lambda_ac, self.lambda_kl, self.reg_steps, seed=seed) \
            if self.regularise or checked else None


def picture(s: Settings, height: int, width: int):
    """The settings' picture fitted to height × width (PIL), or None."""
    from ..real import images
    return None if s.image is None else images.fit(read_image(s.image), height, width)


def inversion_of(model, p: RealImage, s: Settings, prompt: str | None):
    """An Inversion of the settings' picture under `prompt` (or the given Inversion, checked)."""
    import warnings

    from ..pipeline import check_size
    from ..real import images, invert
    if isinstance(s.image, invert.Inversion):
        invert.check(s.image, model, s.steps, s.height, s.width, "the inversion")
        if s.guidance != s.image.guidance:
            warnings.warn(f"the inversion was made for guidance {s.image.guidance:g}; editing at "
                          f"{s.guidance:g} will not reproduce the image exactly")
        return s.image
    if not prompt:
        raise ParameterError("prompts", "a real image needs the prompt that describes it (the "
                                        "source prompt) first")
    height, width = check_size(model, s.height, s.width)
    x = images.to_tensor(images.fit(read_image(s.image), height, width))       # (1, 3, H, W)
    return invert.invert(model, x, prompt, p.inversion, s.steps, s.guidance, p.inner_steps,
                         progress=s.progress, reg=p.regulariser(s.seed),
                         renoise_steps=p.renoise_steps)


def over_time(model, seed: int, steps: int, height: int, width: int, map_res: int | None):
    """What attention through time needs: (the per-step maps' pixels -- map_res rows, or the
    coarsest down/up resolution --, z_T, an X0Recorder keeping each step's x̂₀)."""
    from .. import views
    from ..pipeline import X0Recorder, initial_noise
    pixels = views.coarse_pixels(model, height, width) if map_res is None else \
        map_res * round(map_res * width / height)
    z_T = initial_noise(model, seed, height, width)
    return pixels, z_T, X0Recorder(model, z_T, steps)


def edit_prompts(model, prompts: list[str], p: RealImage, s: Settings, make_control) -> Result:
    """Run an edit of `prompts` (source first) by the controller `make_control` gives, from
    noise, from SDEdit's noised picture, or from the picture's inversion."""
    from ..control import AttentionStore
    from ..pipeline import check_size, generate, to_pil
    from ..real import invert
    from . import sdedit
    height, width = check_size(model, s.height, s.width)
    common = dict(progress=s.progress, free_text_encoder=s.free_text_encoder)
    if s.image is None:                                              # from noise
        step_pixels, z_T, x0 = over_time(model, s.seed, s.steps, height, width, s.map_res) \
            if s.over_time else (None, None, None)
        control, store = make_control(model, prompts, s.steps, step_pixels, None)
        out = generate(model, prompts, s.seed, s.steps, s.guidance, height, width,
                       control=control, latents=z_T, callback=x0, sampler=s.sampler, **common)
        return Result(to_pil(out), list(prompts), store=store, x0=x0)
    if p.strength is not None:                                       # SDEdit
        fitted = picture(s, height, width)
        control, store = make_control(model, prompts, s.steps - sdedit.start_index(
            s.steps, p.strength), None, None)
        out = sdedit.generate(model, fitted, prompts, p.strength, s.seed, s.steps, s.guidance,
                              height, width, control, **common)
        return Result(to_pil(out), list(prompts), [fitted], store=store)
    if isinstance(s.image, invert.Inversion):                       # its prompt is the source
        prompts = [s.image.prompt] + list(prompts)
    inv = inversion_of(model, p, s, prompts[0] if prompts else None)
    if len(prompts) > 1:
        control, store = make_control(model, prompts, s.steps, None, inv.latents)
    else:                                                            # no target: reconstruction
        control = store = AttentionStore(1) if s.maps else None
    out = invert.run(model, inv, prompts, control, s.guidance, **common)
    shown = [] if inv.image is None else [_pil(inv.image)]
    return Result(to_pil(out), list(prompts), shown, store=store, extra={"inversion": inv})


def _pil(pixels):
    from PIL import Image
    return Image.fromarray(pixels.numpy())
