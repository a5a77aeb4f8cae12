"""Guidance through attention on the toy model: does each method do what it says, and what does it
cost? (figures in tools/README.md).

    python -m tools.eval_guidance --n 24 --steps 20     success rates (Self-Guidance move and
                                                        resize, Attend-and-Excite, Pix2Pix-Zero)
    python -m tools.eval_guidance --only self-guidance --cases 0-5,12-17 --iterations 3
                                                        Self-Guidance alone, some cases, settings
    python -m tools.eval_guidance --size-fit --n 48     does size(k) follow the object's area?
    python -m tools.eval_guidance --cost --steps 3      time per step, peak memory (ru_maxrss):
                                                        minip2p / diffusers, a process per method
    python -m tools.eval_guidance --cost --model DIR    … on a folder kept by
                                                        `python -m tools.bench --keep DIR`
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch

from tools import toydata

from tools.guidance_cost import METHODS, cost, one_cost
from tools import clean_runs, judge


def color_pixels(image, color: str) -> int:
    """How many pixels are within 0.25 (RGB distance) of a palette colour."""
    x = torch.as_tensor(np.asarray(image), dtype=torch.float)                 # (3, H, W)
    ref = torch.tensor(toydata.COLORS[color])[:, None, None]
    return int((((x - ref) ** 2).sum(0).sqrt() < 0.25).sum())


def self_guidance_quality(m, args, cases) -> str:
    """Self-Guidance --move {0.8,0.2},0.5 and --resize {0.5,1.5} of each case's shape word."""
    from minip2p.methods import self_guidance as sg
    from minip2p.pipeline import encode_text, generate
    kw = dict(steps=args.steps, progress=False)
    sgkw = dict(keep_appearance=True, weight=args.weight, guide_steps=args.guide_steps,
                iterations=args.iterations)
    moved, kept, resized = [], [], []
    for (color, shape), seed in cases:
        prompt = f"a {color} {shape}"
        tokens = sg.tokens_of(m.tokenizer, prompt, [shape])
        obs = sg.Observe(m.unet, tokens, True)
        a0 = toydata.analyse(generate(m, [prompt], seed=seed, control=obs, **kw)[0])
        cond = encode_text(m, [prompt])
        xs, ratios = [], []
        for x in (0.8, 0.2):
            ctrl = sg.SelfGuidance(m, cond, tokens, args.steps, obs, moves={shape: (x, 0.5)},
                                   **sgkw)
            a = toydata.analyse(generate(m, [prompt], seed=seed, control=ctrl, **kw)[0])
            cx = a["center"][0] / 64
            xs.append(cx)
            moved.append((cx > 0.5) == (x > 0.5))
            kept.append(a["color"] == a0["color"] and a["shape"] == a0["shape"])
        for s in (0.5, 1.5):
            ctrl = sg.SelfGuidance(m, cond, tokens, args.steps, obs, resizes={shape: s}, **sgkw)
            a = toydata.analyse(generate(m, [prompt], seed=seed, control=ctrl, **kw)[0])
            ratios.append(a["area"] / max(a0["area"], 1))
            resized.append(abs(ratios[-1] / s - 1) <= 0.25)
        print(f"  {prompt} seed {seed}: x {a0['center'][0] / 64:.2f} -> {xs[0]:.2f} / "
              f"{xs[1]:.2f}, moved {moved[-2:]}, kept {kept[-2:]}, area ×{ratios[0]:.2f} / "
              f"×{ratios[1]:.2f}, resized {resized[-2:]}", flush=True)
    return (f"Self-Guidance --move {{0.8,0.2}},0.5: centroid in the asked half {pct(moved)}, "
            f"colour and shape kept {pct(kept)}\n"
            f"Self-Guidance --resize {{0.5,1.5}}: area × S ± 25 % {pct(resized)}")


def size_fit(args):
    """size(k) against the object's area over unguided generations of "a [small|big] COLOUR
    SHAPE": the correlation at a few steps, and the least-squares line at the last."""
    from minip2p.load import load_model
    from minip2p.methods import self_guidance as sg
    from minip2p.pipeline import generate
    m = load_model(args.model)
    combos = [(z, c, s) for z in ("small", "", "big") for c in toydata.COLOR_NAMES[:6]
              for s in toydata.SHAPES]
    at = sorted({0, 3, 6, args.steps // 2, args.steps - 1})
    area, size = [], {i: [] for i in at}
    for n in range(args.n):
        z, c, s = combos[(n * 7) % len(combos)]
        prompt = " ".join(w for w in ("a", z, c, s) if w)
        tokens = sg.tokens_of(m.tokenizer, prompt, [s])
        obs = sg.Observe(m.unet, tokens, False)
        a = toydata.analyse(generate(m, [prompt], seed=n, control=obs, steps=args.steps,
                                     progress=False)[0])
        area.append(a["area"] / 64 ** 2)
        for i in at:
            size[i].append(float(sg.size(sg.word_maps(obs.maps[i], tokens)[s])))
    corr = ", ".join(f"step {i} {np.corrcoef(area, size[i])[0, 1]:.2f}" for i in at)
    k, c = np.polyfit(area, size[at[-1]], 1)
    print(f"{args.n} generations, area {min(area):.3f}–{max(area):.3f} of the image; correlation "
          f"of size(k) with the area: {corr}; last step: size(k) = {k:.3f}·area {c:+.3f}")


def pick_cases(cases, spec: str | None):
    """--cases "0-5,12-17" -> those of the cases."""
    if not spec:
        return cases
    keep = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        keep.update(range(int(a), int(b or a) + 1))
    return [c for i, c in enumerate(cases) if i in keep]


def pct(xs):
    return f"{100 * sum(xs) / max(len(xs), 1):.0f} % ({sum(xs)}/{len(xs)})"


def quality(args):
    from minip2p.load import load_model
    from minip2p.methods import attend_excite, pix2pix_zero as pz
    from minip2p.pipeline import decode, encode_text, generate, initial_noise
    m = load_model(args.model)
    combos = [(c, s) for c in toydata.COLOR_NAMES[:6] for s in toydata.SHAPES]
    cases = [(combos[i % len(combos)], i // len(combos)) for i in range(args.n)]
    kw = dict(steps=args.steps, progress=False)
    if args.only in (None, "self-guidance"):
        report = self_guidance_quality(m, args, pick_cases(cases, args.cases))
        if args.only:
            print("\n" + report)
            return
    both = {"plain": [], "excite": []}
    pairs = list(itertools.permutations(toydata.COLOR_NAMES[:4], 2))
    for i in range(args.n):
        (c1, c2), (s1, s2) = pairs[i % len(pairs)], ("circle", "square")
        prompt = f"a {c1} {s1} and a {c2} {s2}"
        x0 = generate(m, [prompt], seed=i, **kw)[0]
        ctrl = attend_excite.build(m, prompt, encode_text(m, [prompt]), [s1, s2], args.steps,
                                   64, 64)
        x1 = generate(m, [prompt], seed=i, control=ctrl, **kw)[0]
        for k, x in (("plain", x0), ("excite", x1)):
            both[k].append(color_pixels(x, c1) >= 20 and color_pixels(x, c2) >= 20)
    edits = {"colour": [], "shape": [], "iou": []}
    for i in range(args.n):
        (color, shape), seed = cases[i]
        new_c = toydata.COLOR_NAMES[(toydata.COLOR_NAMES.index(color) + 2) % 6]
        new_s = toydata.SHAPES[(toydata.SHAPES.index(shape) + 1) % 3]
        src = f"a {color} {shape}"
        for kind, tgt in (("colour", f"a {new_c} {shape}"), ("shape", f"a {color} {new_s}")):
            d = pz.direction(m, *pz.sentences(src, tgt))
            zs, ze = pz.edit(m, src, d, initial_noise(m, seed, 64, 64), args.steps, 7.5, 0.1,
                             progress=False)
            a0, a1 = (toydata.analyse(x) for x in decode(m, torch.cat([zs, ze])))
            edits[kind].append(a1["color"] == new_c if kind == "colour" else a1["shape"] == new_s)
            if kind == "colour":
                edits["iou"].append(toydata.iou(a0["mask"], a1["mask"]))

    print("\n" + report)
    print(f"Attend-and-Excite, both objects' colours present: plain {pct(both['plain'])}, "
          f"excited {pct(both['excite'])}")
    print(f"Pix2Pix-Zero: new colour {pct(edits['colour'])}, new shape {pct(edits['shape'])}, "
          f"mask IoU (colour edits) {np.mean(edits['iou']):.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=24, help="prompts × seeds per measurement (24)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--weight", type=float, default=0.25, help="Self-Guidance weight v (0.25)")
    p.add_argument("--guide-steps", type=float, default=0.3,
                   help="Self-Guidance: guide in this first fraction of the steps (0.3)")
    p.add_argument("--iterations", type=int, default=None,
                   help="Self-Guidance: gradient steps per guided step (default: the "
                        "method's, 2 for moves, 4 for resizes)")
    p.add_argument("--only", choices=["self-guidance"],
                   help="measure this method only (success rates)")
    p.add_argument("--cases", help="Self-Guidance: only these of the --n cases, e.g. 0-5,12-17")
    p.add_argument("--size-fit", action="store_true",
                   help="size(k) against the object's area over --n unguided generations")
    p.add_argument("--cost", action="store_true")
    p.add_argument("--size", type=int, default=None, help="--cost: image side (default: the model's)")
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    judge.add_args(p, list(clean_runs.GUIDANCE))
    args = p.parse_args(argv)
    if judge.maybe_run(args, clean_runs.GUIDANCE):
        return
    torch.manual_seed(0)
    if args.one:
        print(json.dumps(one_cost(args.one, args.model, args.steps, args.size)))
    elif args.size_fit:
        size_fit(args)
    elif args.cost:
        cost(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()
