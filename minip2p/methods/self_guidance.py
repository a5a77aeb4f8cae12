"""Diffusion Self-Guidance (Epstein et al., NeurIPS 2023, arXiv 2306.00986, §3): move and resize
an object by steering the properties of its word's cross-attention map. There is no official
code; this follows the paper's definitions.

For a word k, A_k(p) is its cross-attention map in the conditional row, read in the decoder (the
"up" cross-attention layers with ≤ 16² pixels): per layer the mean over heads, summed over the
word's tokens, resized to the finest of these layers (bilinear), smoothed by a Gaussian (3×3,
σ 0.5) and min-max normalised to [0, 1]; then the mean over the layers. With pixel centres
p = (x_p, y_p) ∈ [0, 1]² (x to the right, y down):

    shape(k)(p)   = σ(10 · (A_k(p) − ½))                      (a soft threshold at half)
    size(k)       = (1/|P|) Σ_p shape(k)(p)
    centroid(k)   = Σ_p p · shape(k)(p) / Σ_p shape(k)(p)
    appearance(k) = Σ_p shape(k)(p) · ψ(p) / Σ_p shape(k)(p)   ψ: the decoder's last ResBlock
                                                                features (c channels), resized

Energies (primes: the same quantities in the unguided generation, same seed, same step; T_k: the
affine map that moves centroid'(k) to the target and scales by √s about it, so areas scale by s):

    move k to (x, y):   E = ‖centroid(k) − (x, y)‖₁ + mean_p |shape(k) − T_k(shape'(k))|
                        T_k: translation by (x, y) − centroid'(k)
    resize k by s:      E = |size(k) − s · size'(k)| + mean_p |shape(k) − T_k(shape'(k))|
                        T_k: scaling by √s about centroid'(k)
    keep appearance:    E = Σ_k ‖appearance(k) − appearance'(k)‖₁ / c   (over the edited words)

Several energies add. Moves are guided in the first `guide_steps` of the schedule, resizes in
the first `resize_steps` (fractions of the steps; DDIM's timesteps are evenly spaced, so it is the
same fraction of t at 20 or 50 steps); at those steps, before the DDIM step, n_t times (ε_θ and E
evaluated again each time), a Polyak step capped in RMS, restricted to the region R:

    g = R ⊙ ∇_{z_t} E,   d = (E / ‖g‖²) · g,   d ← d · min(1, v_t / rms(d)),   z_t ← z_t − d

n_t = 2 for moves; for resizes, 120 gradient steps spread evenly over the schedule (6 a step at
20 steps, 2 or 3 at 50; at most 10). v_t = v for moves, v · σ_t for resizes (σ_t = √(1 − ᾱ_t)).
After every DDIM step, outside R the latents are the unguided generation's (primes):

    z_{t−1} ← R ⊙ z_{t−1} + (1 − R) ⊙ z'_{t−1}

R = 1 where an edited object is or is asked to be: {shape'(k) ≥ ½} ∪ {T_k(shape'(k)) ≥ ½},
dilated by one latent pixel, at the latents' size (`keep_background`, on by default).
Healing (resizes; `heal` h, 0.2 by default, 0: off; none when ⌊N·h⌋ = 0): the guided z_0 is
noised again to the timestep a fraction h from the end, z_{t_h} = √ᾱ_{t_h} z_0 + √(1 − ᾱ_{t_h}) ε
(SDEdit's noising, sdedit.py; ε from seed + 1), and those last steps run again with the same
gradient steps and blend.

What the paper does, what its description implies and what we chose. The paper edits one
property and holds all others: its moves and resizes are shown with the other words' shapes and
the edited objects' appearance held to the unguided generation's by further energies, and it
adds the summed energies' gradient to the noise estimate, ε̃_t = ε_t + v · σ_t · ∇_{z_t} E, over
one window of steps with one weight per term (there is no official code). We hold the edited
object's appearance (`keep_appearance`, on by default) and the rest of the picture by R:
∇_{z_t} E of an attention map is spread over the whole latent (attention mixes every pixel), and
steps outside the object leave blotches and stray blobs on a flat background that no energy on a
word's map sees (a flat background has no word whose map marks it). The blend is the local blend
of Prompt-to-Prompt (p2p.py) with the unguided latents as the source. The appearance distance is
a mean over the c channels: summed, it outweighs the other terms and the object stays as it was.
A window per property is our choice. Moves are guided in the first 30 % only: the layout is set
early, and later gradient steps punch holes into the moved object. A resize is guided to the last
step: a word's map follows its object's area only once the layout has formed (tools/README.md,
"Guidance methods"), and steps left unguided after it grow or shrink the object back.
A Polyak step (the distance to E = 0 along the gradient) replaces v · σ_t · ∇E, whose size
varies a lot from step to step; for resizes the paper's σ_t stays as the cap's decay, so the late
steps, where z_t is nearly the picture, take small steps (large ones there punch holes and leave
blobs where a shrunk object was). The step count is compensated for resizes: 50 steps take the
same 120 gradient steps as 20 (with a fixed number a step, 50 steps shrank further than 20: E = 0
is not exactly the asked area, since the map's soft rim adds a floor to size(k), and more gradient
steps came nearer to it). Moves keep 2 a step: their edit holds at 20 and 50 steps. Healing is
ours (the paper has no such pass): the late gradient steps leave specks of colour and ragged
edges around a resized object that the last, nearly noise-free steps keep; noised again, the
model repaints them as it draws its shapes, and the repeated guidance holds the new size
(unguided, the model redraws a small object at its prompt's size). The paper reads its maps from
the model's attention layers and gives no finer scale for size; ours are the 16² maps (the toy
model's finest are its latents' size) as defined above: read on them upsampled (bilinear), size
counts nearly the same cells (the interpolated map crosses ½ about where the soft threshold does).
The runs behind these choices: tools/README.md, "Self-Guidance".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..control import Controller
from .base import ParameterError, Result, Settings, check_number, check_word, param
from .gradient import GradientGuidance
from .map_properties import (Observe, appearance, centroid, last_res, map_sites, shape, size,
                             transform, word_maps)

__all__ = ["word_maps", "centroid", "size", "shape", "appearance", "transform", "Observe",
           "SelfGuidance", "Params", "run"]


RESIZE_GRADIENT_STEPS = 120     # over the whole schedule, whatever the number of steps


class SelfGuidance(GradientGuidance):
    """moves: {word: (x, y)}; resizes: {word: s}; `observed`: the `Observe` of the unguided run;
    weight: v, the largest RMS of a step of z_t (v·σ_t in a resize's window)."""

    def __init__(self, model, cond, tokens, steps: int, observed: Observe, moves=None,
                 resizes=None, keep_appearance: bool = True, weight: float = 0.25,
                 guide_steps: float = 0.3, iterations: int | None = None,
                 keep_background: bool = True, resize_steps: float = 1.0):
        super().__init__(model, cond, steps, pick=map_sites)
        self.tokens, self.observed = tokens, observed
        self.moves, self.resizes = moves or {}, resizes or {}
        self.keep_appearance, self.weight = keep_appearance, weight
        self.iterations = iterations
        self.last = round(guide_steps * steps) if self.moves else 0
        self.last_resize = round(resize_steps * steps) if self.resizes else 0
        self.feature_pick = last_res(model.unet) if keep_appearance else None
        self.local = keep_background
        ac = model.scheduler.alphas_cumprod
        self.sigma = [float((1 - ac[t]).sqrt()) for t in self.timesteps]     # σ_t per step

    def after_step(self, z, step):
        if not self.local or step not in self.observed.z:
            return z
        m = self.region(self.observed.reference(step), z)
        return m * z + (1 - m) * self.observed.z[step].to(z)

    def iterations_at(self, step: int) -> int:
        """n_t: `iterations` if given; else 2 for a move; in a resize's window,
        RESIZE_GRADIENT_STEPS spread evenly over the schedule (6 a step at 20 steps, 2 or 3 at
        50, at most 10), so that 20 and 50 steps take the same number of gradient steps."""
        if self.iterations:
            return self.iterations
        if step >= self.last_resize:
            return 2
        r = min(RESIZE_GRADIENT_STEPS / self.steps, 10)
        return max(1, math.floor((step + 1) * r) - math.floor(step * r))

    def active(self, step):
        return step < max(self.last, self.last_resize)

    def energy(self, A: dict, psi, ref: dict, step: int = 0) -> torch.Tensor:
        E = 0.0
        moves = self.moves if step < self.last else {}
        resizes = self.resizes if step < self.last_resize else {}
        for w, (x, y) in moves.items():
            to = torch.tensor([x, y])
            E = E + (centroid(A[w]) - to).abs().sum()
            target = transform(ref[w]["shape"], ref[w]["centroid"], to, 1.0)
            E = E + (shape(A[w]) - target).abs().mean()
        for w, s in resizes.items():
            E = E + (size(A[w]) - s * ref[w]["size"]).abs()
            c = ref[w]["centroid"]
            E = E + (shape(A[w]) - transform(ref[w]["shape"], c, c, math.sqrt(s))).abs().mean()
        if self.keep_appearance:
            for w in {**moves, **resizes}:
                E = E + (appearance(A[w], psi) - ref[w]["appearance"]).abs().mean()
        return E

    def region(self, ref: dict, like: torch.Tensor) -> torch.Tensor:
        """1 where an edited object is or is asked to be (the unguided shape' and its target
        T(shape'), at least ½, dilated by a latent pixel), at the latents' size; 0 elsewhere."""
        R = 0.0
        for w, (x, y) in self.moves.items():
            S = ref[w]["shape"]
            R = torch.maximum(torch.as_tensor(R), torch.maximum(
                S, transform(S, ref[w]["centroid"], torch.tensor([x, y]), 1.0)))
        for w, s in self.resizes.items():
            S, c = ref[w]["shape"], ref[w]["centroid"]
            R = torch.maximum(torch.as_tensor(R),
                              torch.maximum(S, transform(S, c, c, math.sqrt(s))))
        R = F.interpolate(R[None, None].float(), size=like.shape[-2:], mode="bilinear",
                          align_corners=False)
        return F.max_pool2d((R > 0.5).float(), 3, 1, 1).to(like)

    def update(self, z, step, t):
        ref = self.observed.reference(step)
        mask = self.region(ref, z) if self.local else 1.0
        for _ in range(self.iterations_at(step)):
            leaf, rec = self.maps_of(z, step, feature_pick=self.feature_pick)
            A = word_maps(rec.maps, self.tokens, latent=tuple(z.shape[-2:]))
            psi = rec.feats[-1][1][0].float() if rec.feats else None
            E = self.energy(A, psi, ref, step)
            (grad,) = torch.autograd.grad(E, [leaf])
            self.energies[step] = e = float(E.detach())
            grad = grad * mask
            d = e / grad.pow(2).sum().clamp(min=1e-24) * grad                     # E/‖g‖² · g
            rms = float(d.pow(2).mean().sqrt())
            v = self.weight * (self.sigma[step] if step < self.last_resize else 1.0)
            z = leaf.detach() - d * min(1.0, v / max(rms, 1e-12))
        return z


NAME, EDITS_PICTURES = "self-guidance", "no"
SUMMARY = "Self-Guidance: move or resize an object by steering its word's attention map"


@dataclass
class Params:
    """Self-Guidance's energies and step (no official code: the paper's definitions)."""
    move: dict | None = param(None, "move each word's object to (x, y), fractions of the image "
                                    "in [0, 1] (0,0 top left)", kind="moves")
    resize: dict | None = param(None, "scale each word's object by s > 0", kind="resizes")
    keep_appearance: bool = param(True, "keep the objects' appearance from the unguided image")
    keep_background: bool = param(True, "keep everything outside the edited objects' old and "
                                        "new places from the unguided image")
    guidance_weight: float = param(0.25, "largest RMS v of a guidance step of z: z ← z − d, "
                                         "d = E·∇E/‖∇E‖² capped at rms(d) ≤ v (v·σ_t for "
                                         "resizes)")
    guide_steps: float = param(0.3, "guide the moves in this first fraction of the steps "
                                    "(1.0: all)")
    resize_steps: float = param(1.0, "guide the resizes in this first fraction of the steps")
    heal: float = param(0.2, "resizes: re-noise the result to this fraction of the schedule "
                             "and denoise that part again, guided as before (0: off)")
    guide_iterations: int | None = param(None, "gradient steps per guided step (default: 2 "
                                               "for moves; resizes: 120 over the schedule)",
                                         kind=int)

    def check(self, prompts: list[str], s: Settings) -> None:
        """Refuse words not in the prompt, x or y outside [0, 1], s ≤ 0, no energy, v < 0."""
        s.ddim_only("Self-Guidance")
        if len(prompts) != 1:
            raise ParameterError("prompts", f"Self-Guidance steers one prompt, got {len(prompts)}")
        moves, resizes = self.move or {}, self.resize or {}
        if not moves and not resizes:
            raise ParameterError("move", "or {resize} is needed: Self-Guidance needs an energy"
                                 + (" ({keep_appearance} only keeps what they change)"
                                    if self.keep_appearance else ""))
        for name, d in (("move", moves), ("resize", resizes)):
            for w in d:
                check_word(name, w, prompts[0])
        for w, xy in moves.items():
            if len(xy) != 2 or not all(0.0 <= v <= 1.0 for v in xy):
                raise ParameterError("move", f"{w}={','.join(f'{v:g}' for v in xy)}: X and Y are "
                                             "fractions of the image in [0, 1] (0,0 top left)")
        for w, k in resizes.items():
            if not k > 0:
                raise ParameterError("resize", f"{w}={k:g}: the scale must be > 0 (0.5 halves, "
                                               "2 doubles)")
        check_number("guidance_weight", self.guidance_weight)
        if self.guidance_weight < 0:
            raise ParameterError("guidance_weight", f"is the largest step of z_t (RMS), ≥ 0; got "
                                                    f"{self.guidance_weight:g}")
        check_number("guide_steps", self.guide_steps, 0.0, 1.0, low_open=True)
        check_number("resize_steps", self.resize_steps, 0.0, 1.0, low_open=True)
        check_number("heal", self.heal, 0.0, 1.0, high_open=True)
        it = self.guide_iterations
        if it is not None and (isinstance(it, bool) or not isinstance(it, int) or
                               not 1 <= it <= 50):
            raise ParameterError("guide_iterations", f"must be an integer ≥ 1 and ≤ 50, got {it!r}")


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    """The unguided image and the guided one, from the same seed."""
    from ..pipeline import check_size, encode_text, generate, to_pil
    height, width = check_size(model, s.height, s.width)
    model.scheduler.timesteps(s.steps)
    moves, resizes = p.move or {}, {w: float(k) for w, k in (p.resize or {}).items()}
    tokens = tokens_of(model.tokenizer, prompts[0], {**moves, **resizes})
    kw = dict(seed=s.seed, steps=s.steps, guidance=s.guidance, height=height, width=width,
              progress=s.progress)
    observed = Observe(model.unet, tokens, p.keep_appearance)
    plain = generate(model, prompts, control=observed, **kw)
    ctrl = SelfGuidance(model, encode_text(model, prompts), tokens, s.steps, observed,
                        {w: tuple(xy) for w, xy in moves.items()}, resizes, p.keep_appearance,
                        p.guidance_weight, p.guide_steps, p.guide_iterations, p.keep_background,
                        p.resize_steps)
    heal = p.heal if resizes and int(s.steps * p.heal) >= 1 else 0.0     # none: too few steps
    guided = generate(model, prompts, control=ctrl, **kw, return_latents=heal > 0)
    if heal > 0:
        from ..pipeline import decode, initial_noise
        from .sdedit import noised
        z, start = noised(model, guided, s.steps, heal, initial_noise(model, s.seed + 1,
                                                                          height, width))
        guided = decode(model, generate(model, prompts, control=Heal(ctrl, start), latents=z,
                                        start=start, return_latents=True, **kw))
    return Result(to_pil(plain) + to_pil(guided), ["unguided", "guided"])


class Heal(Controller):
    """The second pass from step `start` (its steps count from 0): the guided run's gradient
    steps and blend at the schedule's step start + i."""

    def __init__(self, guided: SelfGuidance, start: int):
        self.guided, self.start = guided, start

    def before_step(self, z, step):
        return self.guided.before_step(z, self.start + step)

    def after_step(self, z, step):
        return self.guided.after_step(z, self.start + step)


def tokens_of(tok, prompt: str, words) -> dict[str, list[int]]:
    return {w: tok.word_positions(prompt, w) for w in words}
