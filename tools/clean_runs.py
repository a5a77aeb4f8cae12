"""Each method's call on one of tools/judge.py's cases, at the registry's defaults: a runner
`run(model, case, i, args) -> (source, result, accurate, note)` per method, grouped by the
evaluation that reports it (GENERATION for eval_toy, EDITS for eval_methods, GUIDANCE for
eval_guidance, INVERSIONS for eval_inversion).

Pictures to edit are drawn (tools/toydata.draw, seed = the case's index), never generated, so
that an edit's defects are the edit's own. `accurate` asks the analyser whether the result
shows what the target caption names: colour and shape for one object, both colours for two.

What each method is asked: P2P Replace, LocalBlend (the object's shape word) and Pix2Pix-Zero the
case's edit as a word swap (a size word added becomes a colour swap); P2P Refine the source with
words added (a background, else a size word); P2P Reweight the source with its colour word ×2;
MasaCtrl the case's edit; plug-and-play ["", target] and SDEdit [target] on the drawn source;
Attend-and-Excite the target with its shape words; Self-Guidance the source with its (first)
object moved to the other side; the inversions reconstruct the drawn source.
"""
from __future__ import annotations

import numpy as np
import torch

from minip2p import methods
from minip2p.pipeline import generate
from tools import toydata
from tools.judge import Case
from tools.toydata import caption


def to_pil(x):
    from tools.sheets import to_pil as pil
    return pil(x)


def array(image) -> np.ndarray:
    from tools.judge import to_array
    return to_array(image)


def color_pixels(image, color: str) -> int:
    x = array(image)
    ref = np.array(toydata.COLORS[color])[:, None, None]
    return int((np.sqrt(((x - ref) ** 2).sum(0)) < 0.25).sum())


def shows(image, prompt: str) -> bool:
    """Does the picture show the caption's object(s)? One object: colour and shape; two: both
    colours (at least 20 pixels each)."""
    words = prompt.split()
    if " and a " in prompt:
        k = words.index("and")
        return color_pixels(image, words[k - 2]) >= 20 and color_pixels(image, words[k + 2]) >= 20
    a = toydata.analyse(torch.from_numpy(array(image)))
    i = next(j for j, w in enumerate(words) if w in toydata.SHAPES)
    return a["color"] == words[i - 1] and a["shape"] == words[i]


def same_words_target(case: Case) -> str:
    """The case's target with as many words as the source (a size word added becomes a colour
    swap), for the word-swap edits."""
    if case.kind == "size" and not case.size:
        c = toydata.COLOR_NAMES[(toydata.COLOR_NAMES.index(case.color) + 2) % 6]
        if c == case.bg:
            c = toydata.COLOR_NAMES[(toydata.COLOR_NAMES.index(case.color) + 4) % 6]
        return caption(c, case.shape, None, case.pos, case.bg, case.second)
    return case.target


def refine_target(case: Case) -> str:
    """The source with words added: a background, else a size word (else the background
    changed, a word swap)."""
    if not case.bg:
        taken = (case.color, *(case.second or ()))
        bg = next(b for b in ("black", "white", "purple") if b not in taken)
        return caption(case.color, case.shape, case.size, case.pos, bg, case.second)
    if not case.size and not case.second:
        return caption(case.color, case.shape, "big", case.pos, case.bg, case.second)
    bg = next(b for b in ("white", "black", "purple") if b not in (case.color, case.bg))
    return caption(case.color, case.shape, case.size, case.pos, bg, case.second)


def _edit(name, target, **extra):
    """A runner: methods.run(model, name, [source, target(case)], …) from noise."""
    def run(model, case, i, args):
        tgt = target(case)
        kw = {k: (v(case) if callable(v) else v) for k, v in extra.items()}
        r = methods.run(model, name, [case.source, tgt], steps=args.clean_steps, seed=i,
                        sampler=args.clean_sampler, **kw)
        note = f"(run: {tgt!r} {kw or ''})" if tgt != case.target or kw else None
        return r.images[0], r.images[-1], shows(r.images[-1], tgt), note
    return run


def _picture(name, prompts):
    """A runner editing the case's drawn source picture with methods.run."""
    def run(model, case, i, args):
        src = case.drawn(i)
        r = methods.run(model, name, prompts(case), steps=args.clean_steps, seed=i,
                        image=to_pil(src))
        return src, r.images[-1], shows(r.images[-1], case.target), None
    return run


def generation(model, case, i, args):
    """Plain generation of the source caption; the drawing beside it."""
    out = generate(model, [case.source], seed=i, steps=args.clean_steps,
                   sampler=args.clean_sampler, progress=False)[0]
    return case.drawn(i), out, shows(out, case.source), None


def attend_excite(model, case, i, args):
    words = [w for w in case.target.split() if w in toydata.SHAPES]
    r = methods.run(model, "attend-excite", [case.target], steps=args.clean_steps, seed=i,
                    sampler=args.clean_sampler, words=words)
    return None, r.images[-1], shows(r.images[-1], case.target), None


def self_guidance(model, case, i, args):
    """Move the (first) object to the side it is not asked to be on: x 0.75 or 0.25."""
    x = 0.25 if (case.pos == "on the right" or i % 2) else 0.75
    r = methods.run(model, "self-guidance", [case.source], steps=args.clean_steps, seed=i,
                    sampler=args.clean_sampler, move={case.shape: (x, 0.5)})
    a = toydata.analyse(torch.from_numpy(array(r.images[-1])))
    moved = a["area"] > 0 and (a["center"][0] / 64 > 0.5) == (x > 0.5)
    return (r.images[0], r.images[-1], bool(moved and shows(r.images[-1], case.source)),
            f"(run: {case.source!r} moved to x {x})")


def inversion(method):
    """Reconstruction of the drawn source picture from the `method` inversion."""
    def run(model, case, i, args):
        from minip2p.real import invert
        src = case.drawn(i)
        inv = invert.invert(model, src[None] * 2 - 1, case.source, method, args.clean_steps,
                            7.5, 10, progress=False)
        rec = invert.run(model, inv, [case.source], progress=False)[0].clamp(0, 1)
        psnr = float(-10 * torch.log10(((rec - src) ** 2).mean()))
        return src, rec, shows(rec, case.source), f"PSNR {psnr:.1f} dB"
    return run


GENERATION = {"generation": generation}
EDITS = {
    "p2p-replace": _edit("p2p", same_words_target, mode="replace"),
    "p2p-refine": _edit("p2p", refine_target),
    "p2p-reweight": _edit("p2p", lambda c: c.source, reweight=lambda c: {c.color: 2.0}),
    "p2p-localblend": _edit("p2p", same_words_target, mode="replace",
                            blend=lambda c: [c.shape, c.new_shape or c.shape]),
    "masactrl": _edit("masactrl", lambda c: c.target),
    "pnp": _picture("pnp", lambda c: ["", c.target]),
    "sdedit": _picture("sdedit", lambda c: [c.target]),
}
GUIDANCE = {"attend-excite": attend_excite,
            "pix2pix-zero": _edit("pix2pix-zero", same_words_target),
            "self-guidance": self_guidance}
INVERSIONS = {f"{m}-inversion": inversion(m) for m in ("ddim", "null-text", "negative-prompt")}
