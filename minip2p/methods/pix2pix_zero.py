"""Pix2Pix-Zero (Parmar et al., SIGGRAPH 2023, arXiv 2302.03027): edit with a direction in
text-embedding space, while cross-attention guidance keeps the source's structure.

    Δc     = mean_j ψ(target sentence_j) − mean_j ψ(source sentence_j)     (1, 77, d), all tokens
    pass 1 (reconstruction): denoise z_T with c = ψ(source); record every cross-attention map
           M_ref(l, t) (rows [∅, c], heads kept) at every layer l and step t
    pass 2 (edit), from the same z_T, with c' = c + Δc; at each step, on the rows x = [z_t, z_t]:
           L  = Σ_l mean_{rows, heads} Σ_{p, k} (M(l, t; x) − M_ref(l, t))²
           x ← x − λ ∇_x L                                   (λ = 0.1: xa_guidance)
           ε̃ = ε_θ(x_∅, t, ∅) + g (ε_θ(x_c, t, c') − ε_θ(x_∅, t, ∅))
           z_{t−1} = DDIM(x_∅, ε̃)

(as the reference, pix2pixzero/pix2pix-zero and diffusers' `StableDiffusionPix2PixZeroPipeline`:
the unconditional and the conditional copy of z_t each take their own gradient step, and DDIM
continues from the unconditional copy). The sentences are the user's files, or by default the
two prompts themselves, so that Δc = ψ(TARGET) − ψ(SOURCE) and c' = ψ(TARGET).

Deliberate difference from the official code: it has no built-in sentences (its direction files
hold about a thousand captions per concept, written by a language model) and they matter. Short
templates around the lone word ("a photo of a cat") put the word at other token positions than
the prompt's, and the mean over all 77 positions then adds the colour or shape of the edit to
the slots of the prompt's other words: on the toy model, "yellow → orange" in "a yellow circle on
a black background" tints the background into a haze and a two-object prompt loses the object
not edited. The prompts themselves are aligned token by token, so the direction changes only
what the prompts change. `sentences(…, templates=True)` gives the template set (`TEMPLATES`
around the words that differ, plus the prompts) for models that know such captions.

Real images: z_T from the DDIM inversion of the picture under SOURCE, with `--regularise` the
paper's regularised inversion (auto-correlation and KL terms on each predicted noise:
noise_reg.py).

Memory: the reference keeps every map of every step (fp32, heads kept) between the passes, so it
grows with steps × cross layers × heads × pixels × 77 tokens: gigabytes at 512 px and 50 steps, as
in diffusers; on the toy model it is small.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..control import Compose, Controller
from ..real.direct import AddOffsets
from ..real.invert import Inversion
from .base import INVERSIONS, ParameterError, Result, Settings, check_number, param, words_of
from .editing import RealImage
from ..conditioning import eps as unet_eps
from ..guidance import GuidanceBatch, cfg
from ..pipeline import denoise, encode_text
from .gradient import MapRecorder, forward_with_grad

__all__ = ["TEMPLATES", "sentences", "read_sentences", "direction", "RecordCross", "edit"]

TEMPLATES = ["{}", "a {}", "a photo of a {}", "a picture of a {}", "an image of a {}",
             "a painting of a {}", "a close-up photo of a {}", "a rendering of a {}",
             "a drawing of a {}", "a good photo of a {}"]


NAME, EDITS_PICTURES = "pix2pix-zero", "optional"
SUMMARY = "Pix2Pix-Zero: an edit direction in text space, the structure kept by cross-attention"


@dataclass
class Params(RealImage):
    """Pix2Pix-Zero's parameters (the official defaults; the paper inverts with DDIM)."""
    inversion: str = param("ddim", "how the picture is inverted: ddim, null-text, "
                                   "negative-prompt, direct or renoise", INVERSIONS)
    source_sentences: list | None = param(None, "sentences about the source concept (default: "
                                                "the source prompt itself)", kind="lines")
    target_sentences: list | None = param(None, "sentences about the target concept",
                                          kind="lines")
    xa_guidance: float = param(0.1, "cross-attention guidance step λ")

    def check(self, prompts: list[str], s: Settings) -> None:
        self.check_real(s, Params)
        if self.strength is not None:
            raise ParameterError("strength", "(SDEdit) does not combine with pix2pix-zero")
        if self.inversion == "edict":
            raise ParameterError("inversion", "edict: Pix2Pix-Zero's guided edit runs one "
                                              "sequence, not EDICT's pair; use another")
        if s.maps:
            raise ParameterError("maps", "are not available with pix2pix-zero")
        s.ddim_only("Pix2Pix-Zero")
        check_number("xa_guidance", self.xa_guidance)
        if (self.source_sentences is None) != (self.target_sentences is None):
            raise ParameterError("source_sentences", "and target_sentences go together (or "
                                 "neither: built-in sentences around the words that differ)")
        for name in ("source_sentences", "target_sentences"):
            v = getattr(self, name)
            if v is not None and (not v or not all(isinstance(x, str) and x for x in v)):
                raise ParameterError(name, "must be a non-empty list of sentences")
        if len(prompts) + isinstance(s.image, Inversion) != 2:
            raise ParameterError("prompts", "Pix2Pix-Zero edits a SOURCE prompt into one TARGET")
        if self.source_sentences is None and not isinstance(s.image, Inversion):
            differing_words(*prompts)


def run(model, prompts: list[str], p: Params, s: Settings) -> Result:
    from ..pipeline import check_size, decode, initial_noise, to_pil
    from .editing import inversion_of
    if isinstance(s.image, Inversion):
        prompts = [s.image.prompt] + list(prompts)
    src_s, tgt_s = p.source_sentences, p.target_sentences
    if src_s is None:
        src_s, tgt_s = sentences(prompts[0], prompts[1])
    delta = direction(model, src_s, tgt_s)
    shown, inv = [], None
    if s.image is None:
        height, width = check_size(model, s.height, s.width)
        z = initial_noise(model, s.seed, height, width)
    else:
        inv = inversion_of(model, p, s, prompts[0])
        z = inv.z_T
        if inv.image is not None:
            from PIL import Image
            shown = [Image.fromarray(inv.image.numpy())]
    pin = None if inv is None or inv.offsets is None else AddOffsets(inv.offsets)
    z_src, z_edit = edit(model, prompts[0], delta, z, s.steps, s.guidance, p.xa_guidance,
                         progress=s.progress, source_control=pin)
    out = to_pil(decode(model, torch.cat([z_src, z_edit])))
    return Result(out, list(prompts), shown, extra={"inversion": inv} if inv else {})


def differing_words(source: str, target: str) -> tuple[str, str]:
    a, b = words_of(source), words_of(target)
    if len(a) != len(b):
        raise ParameterError("prompts", "without source_sentences/target_sentences, SOURCE and "
                             "TARGET must have the same number of words (the differing ones "
                             "make the sentences)")
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    if not diff:
        raise ParameterError("prompts", "SOURCE and TARGET are the same prompt: nothing to edit")
    return " ".join(x for x, _ in diff), " ".join(y for _, y in diff)


def sentences(source: str, target: str, templates: bool = False) -> tuple[list[str], list[str]]:
    """The built-in sentence sets: the prompts themselves (the default), or with `templates`
    the templates around the differing words and the prompts."""
    w_src, w_tgt = differing_words(source, target)
    if not templates:
        return [source], [target]
    return ([t.format(w_src) for t in TEMPLATES] + [source],
            [t.format(w_tgt) for t in TEMPLATES] + [target])


def read_sentences(path: str, name: str) -> list[str]:
    """One sentence a line; refuses a missing, unreadable or empty file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ParameterError(name, f"{path!r} cannot be read ({e.__class__.__name__}); give a text "
                         "file with one sentence a line") from None
    lines = [s.strip() for s in lines if s.strip()]
    if not lines:
        raise ParameterError(name, f"{path!r} holds no sentence; give one sentence a line")
    return lines


@torch.no_grad()
def direction(model, source_sentences: list[str], target_sentences: list[str],
              batch: int = 16) -> torch.Tensor:
    """Δc = mean ψ(target) − mean ψ(source): (1, 77, d)."""
    def mean(xs):
        return torch.cat([encode_text(model, xs[i:i + batch]) for i in range(0, len(xs), batch)]
                         ).float().mean(0)
    return (mean(target_sentences) - mean(source_sentences))[None]


class RecordCross(Controller):
    """Pass 1: every cross-attention map (rows, heads, p, 77) of every step, detached."""

    def __init__(self):
        self.maps: dict[int, list[torch.Tensor]] = {}

    def wants(self, site):
        return site.kind == "cross"

    def probs(self, M, site):
        self.maps.setdefault(site.step, []).append(M.detach())
        return M


def edit(model, source: str, delta: torch.Tensor, z: torch.Tensor, steps: int = 50,
         guidance: float = 7.5, xa_guidance: float = 0.1, progress: bool = True,
         source_control=None) -> torch.Tensor:
    """z_T (1, 4, h, w) -> (z_0 of the reconstruction, z_0 of the edit), each (1, 4, h, w).
    `source_control`: also on the reconstruction (Direct Inversion's offsets)."""
    cond, uncond = encode_text(model, [source]), encode_text(model, [""])
    ref = RecordCross()
    z_src = denoise(model, cond, uncond, z, steps, guidance, Compose(source_control, ref),
                    progress=progress)

    batch = GuidanceBatch.cfg_layout(1)                                  # rows [∅, c']
    context = torch.cat([uncond, cond + delta.to(cond)])
    sched, z = model.scheduler, z.float().to(model.device)
    stop = None
    for i, t in enumerate(tqdm(sched.timesteps(steps), disable=not progress, desc="editing")):
        rec = MapRecorder(lambda s: s.kind == "cross", stop_after=stop)
        x, _ = forward_with_grad(model, torch.cat([z, z]), t, context, rec, batch, step=i,
                                 steps=steps)
        stop = max(s.index for s, _ in rec.maps)               # later passes stop there
        L = sum(((M.float() - R.float()) ** 2).sum((-2, -1)).mean()
                for (_, M), R in zip(rec.maps, ref.maps[i]))
        (grad,) = torch.autograd.grad(L, [x])
        x = x.detach() - xa_guidance * grad                              # x ← x − λ ∇_x L
        with torch.no_grad():
            eps = unet_eps(model, x.to(model.dtype), t, context, step=i, batch=batch,
                           at=(i, steps))
        eps_u, eps_c = eps.float().chunk(2)
        z = sched.step(cfg(eps_u, eps_c, guidance), t, x[:1], steps)   # from the ∅ copy
    return z_src, z
