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

Several energies add. In the first `guide_steps` of the steps (a fraction, all of them by
default), before the DDIM step, `iterations` times (ε_θ and E evaluated again each time; 2 for
moves, 4 when a word is resized), a Polyak step capped at v in RMS:

    g = ∇_{z_t} E,   d = (E / ‖g‖²) · g,   d ← d · min(1, v / rms(d)),   z_t ← z_t − d

rms(d) = √(mean d²), v: guidance_weight. E / ‖g‖² is the step that brings the linearised
energy to 0 (its minimum), so steps shrink as the object reaches its target and vanish at it;
the cap keeps a step from leaving the range of latents the model knows. (A step of fixed size,
z_t ← z_t − v · g / rms(g), moves z_t by v even at E's minimum, so it keeps disturbing the
latents where the energy is already met, and resizes overshoot.) The appearance distance is a
mean over the c channels: summed over them, it outweighs the size and shape terms and the step
mostly keeps the object as it was. The paper instead adds the gradient to the noise estimate,
ε̃_t = ε_t + v · σ_t · ∇_{z_t} E (σ_t = √(1 − ᾱ_t)); we do not, because the raw gradient's size
varies a lot from step to step and σ_t puts the largest steps at the first steps, where a word's
map does not yet show the object. Moves reach their target with 2 gradient steps per step and
more deform the object; a shrink needs 4 to get near its area: hence the defaults (the runs
behind these choices: tools/README.md, "Guidance methods").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..control import Controller, Site
from ..guidance import TEXT
from .attend_excite import gaussian_kernel
from .base import ParameterError, Result, Settings, check_number, check_word, param
from .gradient import GradientGuidance

__all__ = ["word_maps", "centroid", "size", "shape", "appearance", "transform", "Observe",
           "SelfGuidance", "Params", "run"]


def _normalise(A: torch.Tensor) -> torch.Tensor:
    """(n, h, w) -> Gaussian-smoothed, min-max normalised to [0, 1] per map."""
    A = F.conv2d(F.pad(A[:, None], (1, 1, 1, 1), mode="replicate"), gaussian_kernel().to(A))[:, 0]
    lo = A.amin((1, 2), keepdim=True)
    hi = A.amax((1, 2), keepdim=True)
    return (A - lo) / (hi - lo).clamp(min=1e-12)


def word_maps(maps, tokens: dict[str, list[int]], row: int = 0) -> dict[str, torch.Tensor]:
    """[(site, M (rows, heads, p, 77)), …] -> {word: A_k (side, side)} at the finest side."""
    side = max(math.isqrt(s.pixels) for s, _ in maps)
    words = list(tokens)
    layers = []
    for s, M in maps:
        r = math.isqrt(s.pixels)
        m = M[row].float().mean(0).T.reshape(-1, r, r)                      # (77, r, r)
        m = torch.stack([m[tokens[w]].sum(0) for w in words])[None]           # (1, k, r, r)
        if r != side:
            m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)
        layers.append(_normalise(m[0]))
    A = torch.stack(layers).mean(0)                                            # (k, side, side)
    return dict(zip(words, A))


def _grid(h: int, w: int, dtype=torch.float32):
    ys = (torch.arange(h, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, dtype=dtype) + 0.5) / w
    return xs, ys


def shape(A: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(10 * (A - 0.5))


def size(A: torch.Tensor) -> torch.Tensor:
    return shape(A).mean()


def centroid(A: torch.Tensor) -> torch.Tensor:
    """(h, w) -> (x, y) in [0, 1]², the mean of the pixel centres weighted by shape(A)."""
    S = shape(A)
    xs, ys = _grid(*A.shape, A.dtype)
    total = S.sum()
    return torch.stack([(S.sum(0) * xs).sum() / total, (S.sum(1) * ys).sum() / total])


def appearance(A: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """A: (h, w); ψ: (c, H, W) -> (c,)."""
    m = F.interpolate(shape(A)[None, None], size=psi.shape[-2:], mode="bilinear",
                      align_corners=False)[0, 0]
    return (psi * m).sum((1, 2)) / m.sum()


def transform(S: torch.Tensor, c: torch.Tensor, to: torch.Tensor, scale: float) -> torch.Tensor:
    """T(S): the map S (h, w) moved so that the point c goes to `to` and scaled by `scale`
    about it (both in [0, 1]²); outside the image reads 0. T(S)(p) = S(c + (p − to)/scale)."""
    c, to = c * 2 - 1, to * 2 - 1                                   # grid_sample's [−1, 1]
    theta = torch.tensor([[1 / scale, 0.0, 0.0], [0.0, 1 / scale, 0.0]], dtype=S.dtype)
    theta[:, 2] = c - to / scale
    grid = F.affine_grid(theta[None], [1, 1, *S.shape], align_corners=False)
    return F.grid_sample(S[None, None], grid, align_corners=False, padding_mode="zeros")[0, 0]


def _last_res(unet):
    """Pick for the decoder's last ResBlock ("res" site), whose features are ψ."""
    block, layer = len(unet.up_blocks) - 1, len(unet.up_blocks[-1].resnets) - 1
    return lambda s: s.kind == "res" and s.place == "up" and s.block == block and s.layer == layer


def _pick(s: Site) -> bool:
    return s.kind == "cross" and s.place == "up" and s.pixels <= 16 ** 2


class Observe(Controller):
    """The unguided generation's quantities at every step: shape', size', centroid',
    appearance' per word."""

    def __init__(self, unet, tokens: dict[str, list[int]], features: bool):
        self.tokens, self.feature_pick = tokens, (_last_res(unet) if features else None)
        self.maps, self.psi = {}, {}

    def wants(self, site):
        return _pick(site) or (self.feature_pick is not None and self.feature_pick(site))

    def probs(self, M, site):
        row = site.batch_of(M.shape[0]).row(0, TEXT)
        self.maps.setdefault(site.step, []).append((site, M[row:row + 1].detach().mean(1, keepdim=True)))
        return M

    def features(self, h, site):
        row = site.batch_of(h.shape[0]).row(0, TEXT)
        self.psi[site.step] = h[row].detach().float()
        return h

    def reference(self, step: int) -> dict:
        A = word_maps(self.maps[step], self.tokens)
        out = {w: dict(shape=shape(a), size=size(a), centroid=centroid(a)) for w, a in A.items()}
        if step in self.psi:
            for w, a in A.items():
                out[w]["appearance"] = appearance(a, self.psi[step])
        return out


class SelfGuidance(GradientGuidance):
    """moves: {word: (x, y)}; resizes: {word: s}; `observed`: the `Observe` of the unguided run;
    weight: v, the largest RMS of a step of z_t."""

    def __init__(self, model, cond, tokens, steps: int, observed: Observe, moves=None,
                 resizes=None, keep_appearance: bool = False, weight: float = 0.25,
                 guide_steps: float = 1.0, iterations: int | None = None):
        super().__init__(model, cond, steps, pick=_pick)
        self.tokens, self.observed = tokens, observed
        self.moves, self.resizes = moves or {}, resizes or {}
        self.keep_appearance, self.weight = keep_appearance, weight
        self.iterations = iterations or (4 if self.resizes else 2)
        self.last = round(guide_steps * steps)
        self.feature_pick = _last_res(model.unet) if keep_appearance else None

    def active(self, step):
        return step < self.last

    def energy(self, A: dict, psi, ref: dict) -> torch.Tensor:
        E = 0.0
        for w, (x, y) in self.moves.items():
            to = torch.tensor([x, y])
            E = E + (centroid(A[w]) - to).abs().sum()
            target = transform(ref[w]["shape"], ref[w]["centroid"], to, 1.0)
            E = E + (shape(A[w]) - target).abs().mean()
        for w, s in self.resizes.items():
            E = E + (size(A[w]) - s * ref[w]["size"]).abs()
            c = ref[w]["centroid"]
            E = E + (shape(A[w]) - transform(ref[w]["shape"], c, c, math.sqrt(s))).abs().mean()
        if self.keep_appearance:
            for w in {**self.moves, **self.resizes}:
                E = E + (appearance(A[w], psi) - ref[w]["appearance"]).abs().mean()
        return E

    def update(self, z, step, t):
        ref = self.observed.reference(step)
        for _ in range(self.iterations):
            leaf, rec = self.maps_of(z, step, feature_pick=self.feature_pick)
            A = word_maps(rec.maps, self.tokens)
            psi = rec.feats[-1][1][0].float() if rec.feats else None
            E = self.energy(A, psi, ref)
            (grad,) = torch.autograd.grad(E, [leaf])
            self.energies[step] = e = float(E.detach())
            d = e / grad.pow(2).sum().clamp(min=1e-24) * grad                     # E/‖g‖² · g
            rms = float(d.pow(2).mean().sqrt())
            z = leaf.detach() - d * min(1.0, self.weight / max(rms, 1e-12))
        return z


NAME, EDITS_PICTURES = "self-guidance", "no"
SUMMARY = "Self-Guidance: move or resize an object by steering its word's attention map"


@dataclass
class Params:
    """Self-Guidance's energies and step (no official code: the paper's definitions)."""
    move: dict | None = param(None, "move each word's object to (x, y), fractions of the image "
                                    "in [0, 1] (0,0 top left)", kind="moves")
    resize: dict | None = param(None, "scale each word's object by s > 0", kind="resizes")
    keep_appearance: bool = param(False, "keep the objects' appearance from the unguided image")
    guidance_weight: float = param(0.25, "largest RMS v of a guidance step of z: z ← z − d, "
                                         "d = E·∇E/‖∇E‖² capped at rms(d) ≤ v")
    guide_steps: float = param(1.0, "guide in this first fraction of the steps (1.0: all)")
    guide_iterations: int | None = param(None, "gradient steps per guided step (2 for moves, "
                                               "4 when a word is resized)", kind=int)

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
        it = self.guide_iterations
        if it is not None and (isinstance(it, bool) or not isinstance(it, int) or
                               not 1 <= it <= 50):
            raise ParameterError("guide_iterations", f"must be an integer ≥ 1 and ≤ 50, got {it!r}")
        square(s.height, s.width, s)


def square(height, width, s: Settings) -> None:
    """Self-Guidance's maps are square: refuse another image (None: the size is not known)."""
    if height and width and height != width:
        name, other = ("width", "height") if s.width else ("height", "width")
        value = {"height": height, "width": width}
        raise ParameterError(name, f"{value[name]} must equal {{{other}}} {value[other]}: "
                                   "Self-Guidance's attention maps are square")


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    """The unguided image and the guided one, from the same seed."""
    from ..pipeline import check_size, encode_text, generate, to_pil
    height, width = check_size(model, s.height, s.width)
    square(height, width, s)
    model.scheduler.timesteps(s.steps)
    moves, resizes = p.move or {}, {w: float(k) for w, k in (p.resize or {}).items()}
    tokens = tokens_of(model.tokenizer, prompts[0], {**moves, **resizes})
    kw = dict(seed=s.seed, steps=s.steps, guidance=s.guidance, height=height, width=width,
              progress=s.progress)
    observed = Observe(model.unet, tokens, p.keep_appearance)
    plain = generate(model, prompts, control=observed, **kw)
    ctrl = SelfGuidance(model, encode_text(model, prompts), tokens, s.steps, observed,
                        {w: tuple(xy) for w, xy in moves.items()}, resizes, p.keep_appearance,
                        p.guidance_weight, p.guide_steps, p.guide_iterations)
    guided = generate(model, prompts, control=ctrl, **kw)
    return Result(to_pil(plain) + to_pil(guided), ["unguided", "guided"])


def tokens_of(tok, prompt: str, words) -> dict[str, list[int]]:
    return {w: tok.word_positions(prompt, w) for w in words}
