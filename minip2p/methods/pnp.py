"""Plug-and-play diffusion features (Tumanyan et al., CVPR 2023, arXiv 2211.12572): translate a
real image x^G to a prompt P by injecting, into the target's denoising, the spatial features and
self-attention that the UNet forms on the image's own (inverted) trajectory.

    z_0^G … z_T^G       DDIM inversion of z_0^G = E(x^G) (guidance 1, source prompt c, "" by
                        default): z_t = √ᾱ_t·ẑ_0 + √(1−ᾱ_t)·ε,  ε = ε_θ(z_t', t, c),
                        ẑ_0 = (z_t' − √(1−ᾱ_t')·ε)/√ᾱ_t'  (t' the previous timestep; invert.py)
    source pass         ε_θ(z_t^G, t, ψ("")) yields, in the decoder,
                          f_t^4             the residual branch of layer 4 (up_blocks[1].resnets[1],
                                            after conv2, before the skip is added)
                          q_t^l, k_t^l      self-attention queries and keys of layers l = 4 … 11
                                            (up_blocks[1].attentions[1, 2], up_blocks[2] and [3]
                                            all three), A_t^l = softmax(q_t^l k_t^lᵀ / √d)
    target              z_T^* = z_T^G, and for the N steps i = 0 … N−1 (t = τ_{N−i}):
                          ε̂ = ε_θ(z_t^*, t, P; f_t^4 if i < ⌊N·τ_f⌋, A_t^l if i < ⌊N·τ_A⌋)
                          ε̃ = ε̂(ψ(P⁻)) + g · (ε̂(ψ(P)) − ε̂(ψ(P⁻)))   P⁻: the negative prompt
                          z_{t−1}^* = DDIM(z_t^*, ε̃)
    τ_f = 0.8, τ_A = 0.5, g = 7.5, N = 50 (the official config); decoder layer l = 3·block + j.
    P⁻ = "" by default; the official config's is "ugly, blurry, black, low res, unrealistic".

Injecting A_t^l is injecting (q, k): the target's values v stay its own. As in the official
code, both target rows (P⁻ and P) receive the source's f and (q, k), and the UNet batch is
    [(source, ψ("")), (target, ψ(P⁻)), (target, ψ(P))]                              (`batch`)
with the source row at the inversion latent of the step (control.PinSource) and conditioned on
"" whatever the inversion prompt (as the official code does); the source's ε is used only for
its reconstruction, which `edit` returns beside the target.

Deliberate differences from the official code. The negative prompt: the official one
(`OFFICIAL_NEGATIVE_PROMPT`, chosen for photographs with SD 1.5) is the unconditional row of the
guidance, and g = 7.5 extrapolates the edit away from it: its word "black" fights every target
that names black (a black background or object turns to a purple-grey wash), and for a model that
has not learnt its other words it is an arbitrary point rather than "no prompt", so the target
drifts off the picture's colours altogether (on the toy model every named background washes out).
The default is therefore "", the plain unconditional row every other method here uses; give the
official one as `negative_prompt` to follow the paper's runs. The inversion: its preprocess.py
inverts with 999 DDIM steps (timesteps 1 … 999) and the edit reads the latents saved at its 50
timesteps; here the inversion runs on the edit's own N timesteps (N UNet calls instead of 999),
with the same inversion step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..real import images
from ..attention import softmax_attention
from ..control import Compose, Controller, PinSource, Site
from ..errors import MinipError
from .base import ParameterError, Result, Settings, param
from ..guidance import TEXT, UNCOND, GuidanceBatch
from ..real.invert import ddim_invert
from ..pipeline import check_size, decode, denoise, encode_text

OFFICIAL_NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"   # config_pnp.yaml
NEGATIVE_PROMPT = ""                                     # ours (the module docstring says why)
FEATURE_SITE = ("up", 1, 1)                                           # up_blocks[1].resnets[1]
ATTENTION_SITES = {(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)}  # (block, j)


NAME, EDITS_PICTURES = "pnp", "required"
SUMMARY = "plug-and-play: the source picture's features and self-attention injected into the edit"


@dataclass
class Params:
    """Plug-and-play's parameters (the official config_pnp.yaml, but for the negative prompt:
    "" rather than the official one, see the module docstring)."""
    features: float = param(0.8, "inject ResBlock features for this fraction τ_f of the steps")
    attention: float = param(0.5, "inject self-attention queries and keys for this fraction τ_A")
    negative_prompt: str = param(NEGATIVE_PROMPT, "the target's unconditional prompt (\"\"; "
                                                  "the official config's: " +
                                                  repr(OFFICIAL_NEGATIVE_PROMPT) + ")")

    def check(self, prompts: list[str], s: Settings) -> None:
        from ..real.invert import Inversion
        check_window(self.features, "features")
        check_window(self.attention, "attention")
        s.ddim_only("plug-and-play")
        if isinstance(s.image, Inversion):
            raise ParameterError("image", "plug-and-play needs the picture itself (an inversion "
                                          "file keeps no trajectory)")
        if len(prompts) < 2:
            raise ParameterError("prompts", "plug-and-play needs the source prompt (\"\" allowed) "
                                            "and at least one target prompt")
        if s.maps:
            raise ParameterError("maps", "are not available with plug-and-play")


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    """Each target prompt from the picture's DDIM trajectory (inverted once, with the source)."""
    from ..pipeline import check_size, to_pil
    from .base import read_image
    height, width = check_size(model, s.height, s.width)
    fitted = images.fit(read_image(s.image), height, width)
    x = images.to_tensor(fitted)
    src = encode_text(model, [prompts[0]])
    trajectory = ddim_invert(model, images.encode(model, x), src, s.steps, s.progress)
    out = [edit(model, None, target, prompts[0], p.negative_prompt, s.steps, s.guidance,
                p.features, p.attention, progress=s.progress, trajectory=trajectory,
                return_latents=True) for target in prompts[1:]]
    z = torch.cat([out[0][:1]] + [o[1:] for o in out])                   # source, targets
    return Result(to_pil(decode(model, z)), list(prompts), [fitted])     # one decode, at the end


def check_window(value, name: str) -> float:
    """A fraction of the steps in [0, 1], else one line naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ParameterError(name, f"must be a fraction of the steps in [0, 1] (0: no "
                                   f"injection), got {value!r}")
    return float(value)


class PlugAndPlay(Controller):
    """Feature and self-attention injection from the source image (image 0) into every row of
    the other images, during the first ⌊N·τ_f⌋ and ⌊N·τ_A⌋ steps (the official rounding)."""

    def __init__(self, steps: int, features: float = 0.8, attention: float = 0.5):
        features = check_window(features, "features")
        attention = check_window(attention, "attention")
        self.feature_steps = int(steps * features)                    # ⌊N·τ_f⌋
        self.attention_steps = int(steps * attention)                 # ⌊N·τ_A⌋

    def wants(self, site: Site) -> bool:
        if site.step is None:
            return False
        if site.kind == "res":
            return (site.place, site.block, site.layer) == FEATURE_SITE and \
                site.step < self.feature_steps
        return site.kind == "self" and site.place == "up" and site.depth == 0 and \
            (site.block, site.layer) in ATTENTION_SITES and site.step < self.attention_steps

    @staticmethod
    def _from_source(site: Site, n_rows: int) -> list[int]:
        """For each row: the source's conditional row where the row is another image's, else
        itself (the gather index that copies the source into the targets)."""
        batch = site.batch_of(n_rows)
        src = batch.row(0, TEXT)
        return [src if b != 0 else r for r, b in enumerate(batch.image_of_rows())]

    def features(self, h, site):
        return h[self._from_source(site, h.shape[0])]                 # f_t^4 of the source

    def attend(self, q, k, v, site):
        rows = self._from_source(site, q.shape[0])
        # (q, k) of the source, v its own
        return softmax_attention(q[rows], k[rows], v, site.run.fused, site.run.upcast)


def batch() -> GuidanceBatch:
    """The official UNet batch: [(source, ψ("")), (target, ψ(P⁻)), (target, ψ(P))]."""
    return GuidanceBatch(((0, TEXT), (1, UNCOND), (1, TEXT)))


def edit(model, x, prompt: str, source_prompt: str = "", negative_prompt: str = NEGATIVE_PROMPT,
         steps: int = 50, guidance: float = 7.5, features: float = 0.8, attention: float = 0.5,
         progress: bool = True, trajectory=None, return_latents: bool = False):
    """An image x (1, 3, H, W) in [−1, 1] and a target prompt -> images (2, 3, H, W) in [0, 1]:
    the source's reconstruction and the edit (or their latents (2, 4, h, w) if `return_latents`).

    `source_prompt`: the prompt of the DDIM inversion. `trajectory`: [z_0 … z_T] (N + 1 latents)
    of an inversion already made (`invert.ddim_invert`); x is then not used."""
    control = PlugAndPlay(steps, features, attention)                 # validates the windows
    model.scheduler.timesteps(steps)                                  # validates steps
    src, empty, cond, neg = encode_text(model, [source_prompt, "", prompt, negative_prompt])
    if trajectory is None:
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[:2] == (1, 3)):
            raise MinipError(f"the image must be one RGB picture (1, 3, H, W), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        check_size(model, x.shape[2], x.shape[3])
        trajectory = ddim_invert(model, images.encode(model, x), src[None], steps, progress)
    elif len(trajectory) != steps + 1:
        raise MinipError(f"the inversion trajectory has {len(trajectory)} latents; {steps} steps "
                         f"need {steps + 1} (z_0 … z_T): invert again with {steps} steps")
    z = denoise(model, torch.stack([empty, cond]), torch.stack([neg, neg]), trajectory[-1], steps,
                guidance, Compose(PinSource(trajectory), control), progress=progress,
                batch=batch())
    return z if return_latents else decode(model, z)
