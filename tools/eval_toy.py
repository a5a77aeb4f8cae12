"""Evaluate the toy model: fidelity to the caption and Prompt-to-Prompt edits, measured with the
analyser of the drawn domain (tools/toydata.py: background from the border, object mask,
dominant colour, shape from the fill ratio). Prints a markdown table.

    python -m tools.eval_toy                          # weights/toy, minutes on a laptop CPU
    python -m tools.eval_toy --figures weights/toy/figures --card weights/toy/README.md
    python -m tools.eval_toy --sampler dpm++ --steps 20   # DPM-Solver++ (2M), tools/README.md's table

fidelity   144 prompts (6 templates x 24 colour-shape pairs, 3 pairs never seen in training),
           one seed each: colour / shape / position / size / background accuracy
P2P        colour swaps with Replace: IoU of the edited object's mask with the source's, and the
           new colour; the same seed without injection for comparison; shape swaps: shift of the
           centre and ratio of the sizes; the shape word's cross-attention map (thresholded at
           --attn-threshold of its max) against the object mask (IoU).
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minip2p import views
from minip2p.methods import p2p
from minip2p.load import load_model
from minip2p.pipeline import decode, denoise, encode_text, generate, to_pil
from minip2p.samplers import SAMPLERS, make_sampler
from tools.toydata import COLOR_NAMES, HELD_OUT, SHAPES, Captions, analyse, draw, iou
from tools import clean_runs, judge

TEMPLATES = ["a {c} {s}", "a big {c} {s}", "a small {c} {s} on the left", "a {c} {s} at the top",
             "a big {c} {s} on the right on a {b} background",
             "a {c} {s} in the middle on a {b} background"]
BACKGROUNDS = ["blue", "yellow", "green", "black", "red", "white", "purple", "orange"]


def background_for(c):
    return next(b for b in BACKGROUNDS[COLOR_NAMES.index(c) % 3:] + BACKGROUNDS if b != c)


def fidelity_prompts():
    out = []
    for t in TEMPLATES:
        for c in COLOR_NAMES:
            for s in SHAPES:
                out.append((t.format(c=c, s=s, b=background_for(c)), c, s))
    return out


def check_position(prompt, a, size=64):
    x, y = a["center"]
    rules = {"on the left": x < size * 0.42, "on the right": x > size * 0.58,
             "at the top": y < size * 0.42, "at the bottom": y > size * 0.58,
             "in the middle": abs(x - size / 2) < 8 and abs(y - size / 2) < 8}
    for phrase, ok in rules.items():
        if phrase in prompt:
            return ok
    return None


def images_for(model, prompts, seeds, steps, guidance, sampler="ddim", batch=48):
    """One picture per prompt, each from its own seed (z_T as the pipeline draws it); Euler
    ancestral's step noise from a generator seeded with the first seed of the batch."""
    from minip2p.pipeline import initial_noise
    out = []
    uncond = encode_text(model, [""])
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i:i + batch], seeds[i:i + batch]
        z = torch.cat([initial_noise(model, s, 64, 64) for s in ss])
        smp = make_sampler(sampler, model.scheduler.cfg, torch.Generator().manual_seed(ss[0]))
        z = denoise(model, encode_text(model, ps), uncond, z, steps, guidance, progress=False,
                    sampler=smp)
        out.append(decode(model, z))
    return torch.cat(out)


def pct(xs):
    xs = [x for x in xs if x is not None]
    return f"{100 * np.mean(xs):.1f} % ({sum(xs)}/{len(xs)})" if xs else "n/a"


def analyser_ceiling(model, prompts, args, rows):
    """The analyser on pictures drawn for the same captions, and on their VAE round trips: what
    a perfect diffusion model would score (the VAE's rounded corners are the only loss)."""
    caps = Captions(model.tokenizer)
    attrs = caps.attrs[torch.tensor([caps.find(p) for p, _, _ in prompts])]
    x = draw(attrs, torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        rec = model.vae.decode(model.vae.encode(x.to(model.device, model.dtype))).float().cpu()
    for name, ims in (("drawn pictures", x), ("their VAE round trips", rec)):
        got = [analyse((im.clamp(-1, 1) + 1) / 2) for im in ims]
        rows.append((f"analyser on {name}: colour / shape",
                     f"{pct([a['color'] == c for a, (_, c, _) in zip(got, prompts)])} / "
                     f"{pct([a['shape'] == s for a, (_, _, s) in zip(got, prompts)])}"))


def fidelity(model, args, rows):
    prompts = fidelity_prompts()
    t0 = time.time()
    ims = images_for(model, [p for p, _, _ in prompts], [args.seed + i for i in range(len(prompts))],
                     args.steps, args.guidance, args.sampler)
    res = {"all": [], "seen": [], "held out": []}
    for (p, c, s), im in zip(prompts, ims):
        a = analyse(im)
        r = dict(color=a["color"] == c, shape=a["shape"] == s, pos=check_position(p, a),
                 bg=(a["background"] == p.split(" on a ")[-1].split()[0]) if "background" in p else None,
                 area=a["area"], prompt=p, a=a)
        res["all"].append(r)
        res["held out" if (c, s) in HELD_OUT else "seen"].append(r)
    big = [r["area"] for r in res["all"] if " big " in r["prompt"]]
    small = [r["area"] for r in res["all"] if " small " in r["prompt"]]
    rows.append(("**fidelity**", f"{len(prompts)} prompts, 1 seed each, {args.steps} {args.sampler} steps, "
                 f"guidance {args.guidance} ({time.time() - t0:.0f} s)"))
    for k in ("all", "seen", "held out"):
        rows.append((f"colour accuracy, {k}", pct([r["color"] for r in res[k]])))
        rows.append((f"shape accuracy, {k}", pct([r["shape"] for r in res[k]])))
    rows.append(("position accuracy (prompts with a position)", pct([r["pos"] for r in res["all"]])))
    rows.append(("background colour accuracy (prompts with one)", pct([r["bg"] for r in res["all"]])))
    rows.append(("mean object area, big / small (px)", f"{np.mean(big):.0f} / {np.mean(small):.0f}"))
    analyser_ceiling(model, prompts, args, rows)
    return ims, [p for p, _, _ in prompts], res


def shape_map(store, tok, prompt, index, word, threshold, pixels):
    """The word's cross-attention at `pixels` (16x16: the latent resolution), max-normalised,
    upsampled to 64x64, thresholded at `threshold`."""
    maps, pixels = views.cross_maps(store, index, pixels)
    m = maps[tok.word_positions(prompt, word)].sum(0)
    side = int(round(pixels ** 0.5))
    m = (m / m.max().clamp_min(1e-12)).reshape(1, 1, side, side)
    m = F.interpolate(m, size=(64, 64), mode="nearest")[0, 0]
    return m.numpy(), m.numpy() > threshold, side


EDITS_COLOR = [("a big red circle on the left", "red", "blue"),
               ("a big green square", "green", "yellow"), ("a big blue triangle", "blue", "red"),
               ("a yellow circle at the top", "yellow", "purple"),
               ("a big purple square on the right", "purple", "orange"),
               ("a big white triangle at the bottom", "white", "green"),
               ("a black circle in the middle", "black", "white"),
               ("a big orange square on a blue background", "orange", "red"),
               ("a red triangle on the left", "red", "black"), ("a big green circle", "green", "purple"),
               ("a blue square at the top", "blue", "white"), ("a big yellow triangle", "yellow", "orange")]
EDITS_SHAPE = [("a big red circle on the left", "circle", "square"),
               ("a big blue square", "square", "triangle"), ("a big green triangle", "triangle", "circle"),
               ("a yellow circle at the top", "circle", "triangle"),
               ("a big purple square on the right", "square", "circle"),
               ("a big black triangle at the bottom", "triangle", "square")]


def run_edit(model, src, tgt, args):
    control, store = p2p.build(model.tokenizer, [src, tgt], args.steps, "replace")
    ims = generate(model, [src, tgt], seed=args.seed, steps=args.steps, guidance=args.guidance,
                   control=control, progress=False, sampler=args.sampler)
    plain = generate(model, [tgt], seed=args.seed, steps=args.steps, guidance=args.guidance,
                     progress=False, sampler=args.sampler)[0]
    return ims[0], ims[1], plain, store


def p2p_eval(model, args, rows):
    tok, t0 = model.tokenizer, time.time()
    ious, ious_plain, new_color, attn, shown = [], [], [], [], []
    for src, c0, c1 in EDITS_COLOR:
        tgt = src.replace(c0, c1, 1)
        a_im, b_im, plain, store = run_edit(model, src, tgt, args)
        a, b, pl = analyse(a_im), analyse(b_im), analyse(plain)
        ious.append(iou(a["mask"], b["mask"]))
        ious_plain.append(iou(a["mask"], pl["mask"]))
        new_color.append(b["color"] == c1)
        shape = next(s for s in SHAPES if s in src)
        _, m, side = shape_map(store, tok, src, 0, shape, args.attn_threshold, args.map_res ** 2)
        attn.append(iou(m, a["mask"]))
        shown.append((src, tgt, a_im, b_im, plain, store))
    shift, ratio, shape_ok = [], [], []
    for src, s0, s1 in EDITS_SHAPE:
        tgt = src.replace(s0, s1)
        a_im, b_im, plain, store = run_edit(model, src, tgt, args)
        a, b = analyse(a_im), analyse(b_im)
        shift.append(float(np.hypot(a["center"][0] - b["center"][0], a["center"][1] - b["center"][1])))
        ratio.append(float(np.sqrt(max(b["area"], 1) / max(a["area"], 1))))
        shape_ok.append(b["shape"] == s1)
        _, m, side = shape_map(store, tok, src, 0, s0, args.attn_threshold, args.map_res ** 2)
        attn.append(iou(m, a["mask"]))
        shown.append((src, tgt, a_im, b_im, plain, store))
    rows.append(("**Prompt-to-Prompt** (Replace, cross 0.8, self 0.4)",
                 f"{len(EDITS_COLOR)} colour swaps, {len(EDITS_SHAPE)} shape swaps, {args.steps} "
                 f"{args.sampler} steps ({time.time() - t0:.0f} s)"))
    rows.append(("colour swap: mask IoU with the source, mean (min)",
                 f"{np.mean(ious):.3f} ({np.min(ious):.3f})"))
    rows.append(("colour swap: new colour shown", pct(new_color)))
    rows.append(("same seed, no injection: mask IoU with the source, mean (min)",
                 f"{np.mean(ious_plain):.3f} ({np.min(ious_plain):.3f})"))
    rows.append(("shape swap: centre shift (px), mean (max)", f"{np.mean(shift):.1f} ({np.max(shift):.1f})"))
    rows.append(("shape swap: size ratio √(area'/area), mean (range)",
                 f"{np.mean(ratio):.2f} ({np.min(ratio):.2f}-{np.max(ratio):.2f})"))
    rows.append(("shape swap: new shape shown", pct(shape_ok)))
    rows.append((f"shape word's attention ({side}x{side}, > {args.attn_threshold} of max) vs object mask: "
                 "IoU, mean (min)", f"{np.mean(attn):.3f} ({np.min(attn):.3f})"))
    return shown


def figures(model, folder: Path, shown, fid_ims, fid_prompts, pixels):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    tok, tiles, caps = model.tokenizer, [], []
    for i in (0, 2, 5, 12, 13):                    # a few colour swaps and shape swaps
        src, tgt, a_im, b_im, plain, store = shown[i]
        a_pil, b_pil, p_pil = to_pil(torch.stack([a_im, b_im, plain]))
        color = next(c for c in COLOR_NAMES if c in src.split())
        shape = next(s for s in SHAPES if s in src.split())
        maps, pixels = views.cross_maps(store, 0, pixels)
        shape_hw = views._shape(pixels, a_pil)
        heat = []
        for w in (color, shape):
            m = maps[tok.word_positions(src, w)].sum(0)
            heat.append(views._heat((m / m.max().clamp_min(1e-12)).numpy(), shape_hw, a_pil))
        big = [im.resize((views.TILE, views.TILE), Image.NEAREST) for im in (a_pil, b_pil, p_pil)]
        tiles += big + heat
        caps += [src, tgt, "same seed, no P2P", f"attn '{color}'", f"attn '{shape}'"]
    views.caption_grid(tiles, caps, per_row=5, title="Prompt-to-Prompt on the toy model "
                       "(source, edit, plain target, source attention)").save(folder / "edits.png")
    pick = list(range(0, len(fid_prompts), 7))[:24]
    ims = [im.resize((views.TILE, views.TILE), Image.NEAREST) for im in to_pil(fid_ims[pick])]
    views.caption_grid(ims, [fid_prompts[i] for i in pick], per_row=6,
                       title="samples (seed = index), held-out pairs included").save(folder / "samples.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default weights/toy)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                   help="ddim (default), euler-a or dpm++ (DPM-Solver++ 2M)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-threshold", type=float, default=0.5)
    p.add_argument("--map-res", type=int, default=16, help="rows of the attention maps shown and "
                   "scored (16: the toy model's latent resolution, its finest cross-attention)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--figures", default=None, help="write edits.png and samples.png here")
    p.add_argument("--card", default=None, help="model card to write the table into")
    p.add_argument("--skip-fidelity", action="store_true")
    judge.add_args(p, list(clean_runs.GENERATION))
    args = p.parse_args(argv)
    if judge.maybe_run(args, clean_runs.GENERATION):
        return
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype, weights=args.weights)
    rows = []
    fid = fidelity(model, args, rows) if not args.skip_fidelity else (None, None, None)
    shown = p2p_eval(model, args, rows)
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    if fid[0] is not None:
        bad = [r["prompt"] + f" -> {r['a']['color']} {r['a']['shape']}" for r in fid[2]["all"]
               if not (r["color"] and r["shape"])]
        print(f"\n{len(bad)} misses:", *bad[:30], sep="\n  ")
    if args.figures and fid[0] is not None:
        figures(model, Path(args.figures), shown, fid[0], fid[1], args.map_res ** 2)
    if args.card:
        card = Path(args.card).read_text()
        block = f"<!-- eval -->\n{table}\n<!-- /eval -->"
        card = re.sub(r"<!-- eval -->.*<!-- /eval -->", lambda m: block, card, flags=re.S)
        Path(args.card).write_text(card)


if __name__ == "__main__":
    main()
