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
import subprocess
import sys
import time

import numpy as np
import torch

from tools import toydata
from tools.harness import peak_rss_gib

METHODS = ["plain", "excite", "guide", "pix2pix-zero", "diffusers-plain", "diffusers-excite",
           "diffusers-pix2pix-zero"]


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


PAIRS = [("plain", "diffusers-plain"), ("excite", "diffusers-excite"), ("guide", None),
         ("pix2pix-zero", "diffusers-pix2pix-zero")]
PROMPT, TARGET = "a red circle and a blue square", "a red circle and a green square"


def count_unet(unet) -> dict:
    """Count the UNet's calls and the rows (images) they carry: the work each row of the table
    does, so that minip2p's and diffusers' rows can be seen to do the same."""
    n = {"calls": 0, "rows": 0}

    def hook(module, args, kwargs):
        n["calls"] += 1
        n["rows"] += (args[0] if args else kwargs["sample"]).shape[0]
    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return n


def excite_side(down_block_types, latent_side: int) -> int:
    """Attend-and-Excite's map side, by minip2p's rule (attend_excite.map_pixels), for a UNet
    config that minip2p has not loaded (the diffusers rows)."""
    from types import SimpleNamespace as NS
    from minip2p.methods.attend_excite import map_pixels
    model = NS(unet=NS(cfg=NS(down_block_types=down_block_types)), vae=NS(cfg=NS(downscale=1)))
    return int(map_pixels(model, latent_side, latent_side) ** 0.5)


def diffusers_cost(method: str, model: str | None, steps: int, size: int | None = None):
    """diffusers' pipeline for `method` on the same folder, fp32, DDIM, default size; the same
    settings as minip2p's row: guidance 7.5, A&E on every step with minip2p's thresholds (the
    reference's {0, 10, 20} scaled to `steps`, at most 20 refinement iterations) and its map
    side, Pix2Pix-Zero's two passes with λ = 0.1 and one sentence on each side."""
    from diffusers import (DDIMScheduler, StableDiffusionAttendAndExcitePipeline,
                           StableDiffusionPipeline, StableDiffusionPix2PixZeroPipeline)
    from minip2p.load import DEFAULT_MODEL
    from minip2p.methods.attend_excite import scaled
    pipe = StableDiffusionPipeline.from_pretrained(str(model or DEFAULT_MODEL), safety_checker=None,
                                                   torch_dtype=torch.float32,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    c = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    hw = dict(height=size, width=size) if size else {}
    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=1, output_type="latent", **hw)          # warm-up
    side = size // pipe.vae_scale_factor if size else pipe.unet.config.sample_size  # minip2p's z_T
    z = torch.randn((1, pipe.vae.config.latent_channels, side, side),
                    generator=torch.Generator().manual_seed(0))
    n = count_unet(pipe.unet)
    t0 = time.perf_counter()
    with torch.no_grad():
        if method == "diffusers-plain":
            pipe(PROMPT, num_inference_steps=steps, latents=z, output_type="latent", **hw)
        elif method == "diffusers-excite":
            ae = StableDiffusionAttendAndExcitePipeline(**c, requires_safety_checker=False)
            ae.set_progress_bar_config(disable=True)
            words = {v: k for k, v in ae.get_indices(PROMPT).items()}
            res = excite_side(pipe.unet.config.down_block_types, side)
            max_iter, thresholds = scaled(steps, 50)
            ae(PROMPT, token_indices=[words["circle</w>"], words["square</w>"]],
               num_inference_steps=steps, latents=z, output_type="latent",
               attn_res=(res, res), max_iter_to_alter=max_iter, thresholds=thresholds, **hw)
        else:
            pz = StableDiffusionPix2PixZeroPipeline(**c, caption_generator=None,
                                                    caption_processor=None,
                                                    inverse_scheduler=None,
                                                    requires_safety_checker=False)
            pz.set_progress_bar_config(disable=True)
            pz(PROMPT, source_embeds=pz.get_embeds([PROMPT]),
               target_embeds=pz.get_embeds([TARGET]), num_inference_steps=steps, latents=z,
               output_type="latent", cross_attention_guidance_amount=0.1, **hw)
    return time.perf_counter() - t0, n


def minip2p_cost(method: str, model: str | None, steps: int, size: int | None = None):
    """minip2p's row, as the CLI runs it (fast kernels), after the same warm-up."""
    from minip2p.load import load_model
    from minip2p.methods import attend_excite, self_guidance as sg, pix2pix_zero as pzm
    from minip2p.pipeline import check_size, encode_text, generate, initial_noise
    m = load_model(model)
    h, w = check_size(m, size, size)
    kw = dict(steps=steps, progress=False, return_latents=True, height=h, width=w)
    generate(m, [PROMPT], **dict(kw, steps=1))                                  # warm-up
    n = count_unet(m.unet)
    t0 = time.perf_counter()
    if method == "plain":
        generate(m, [PROMPT], **kw)
    elif method == "excite":
        ctrl = attend_excite.build(m, PROMPT, encode_text(m, [PROMPT]), ["circle", "square"],
                                   steps, h, w, excite_steps=50)
        generate(m, [PROMPT], control=ctrl, **kw)
    elif method == "guide":
        tokens = sg.tokens_of(m.tokenizer, PROMPT, ["circle"])
        obs = sg.Observe(m.unet, tokens, False)
        generate(m, [PROMPT], control=obs, **kw)
        ctrl = sg.SelfGuidance(m, encode_text(m, [PROMPT]), tokens, steps, obs,
                               moves={"circle": (0.8, 0.5)}, guide_steps=1.0)
        generate(m, [PROMPT], control=ctrl, **kw)
    else:
        d = pzm.direction(m, [PROMPT], [TARGET])
        pzm.edit(m, PROMPT, d, initial_noise(m, 0, h, w), steps, progress=False)
    return time.perf_counter() - t0, n


def one_cost(method: str, model: str | None, steps: int, size: int | None = None) -> dict:
    """Run one method once, after a 1-step plain generation as warm-up -> seconds per step,
    peak RSS of the process, UNet calls and rows during the timed run."""
    run = diffusers_cost if method.startswith("diffusers") else minip2p_cost
    dt, n = run(method, model, steps, size)
    return dict(method=method, s_per_step=dt / steps, unet_calls=n["calls"],
                unet_rows=n["rows"],
                peak_mb=peak_rss_gib() * 1024)


def cost(args):
    """Every method in its own process; then minip2p and diffusers side by side."""
    got = {}
    for method in METHODS:
        cmd = [sys.executable, "-m", "tools.eval_guidance", "--one", method,
               "--steps", str(args.steps)]
        if args.model:
            cmd += ["--model", args.model]
        if args.size:
            cmd += ["--size", str(args.size)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{method:24s} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}",
                  flush=True)
            continue
        got[method] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{method:24s} {r['s_per_step']:8.3f} s/step {r['peak_mb']:8.0f} MB peak RSS  "
              f"UNet calls {r['unet_calls']} ({r['unet_rows']} rows)", flush=True)
    print(f"\nmodel {args.model or 'weights/toy'}, {args.size or 'native'} px, {args.steps} steps, {torch.get_num_threads()} "
          "threads; ratio = minip2p / diffusers (< 1: minip2p faster or smaller); × plain = the "
          "method's s/step over its own library's plain generation; calls = UNet calls (rows)\n")
    print("| method | minip2p s/step | diffusers s/step | ratio | minip2p × plain | "
          "diffusers × plain | minip2p peak RSS MB | diffusers peak RSS MB | ratio | "
          "calls minip2p / diffusers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731
    for ours, theirs in PAIRS:
        a, b = got.get(ours), got.get(theirs)
        pa, pb = got.get("plain"), got.get("diffusers-plain")
        ratio = lambda k: a[k] / b[k] if a and b else None  # noqa: E731
        rel = lambda r, p: r["s_per_step"] / p["s_per_step"] if r and p else None  # noqa: E731
        calls = " / ".join("–" if r is None else f"{r['unet_calls']} ({r['unet_rows']})"
                           for r in (a, b))
        print(f"| {ours} | {fmt(a and a['s_per_step'], '.3f')} | "
              f"{fmt(b and b['s_per_step'], '.3f')} | {fmt(ratio('s_per_step'), '.2f')} | "
              f"{fmt(rel(a, pa), '.2f')} | {fmt(rel(b, pb), '.2f')} | "
              f"{fmt(a and a['peak_mb'], '.0f')} | {fmt(b and b['peak_mb'], '.0f')} | "
              f"{fmt(ratio('peak_mb'), '.2f')} | {calls} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=24, help="prompts × seeds per measurement (24)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--weight", type=float, default=0.25, help="Self-Guidance weight v (0.25)")
    p.add_argument("--guide-steps", type=float, default=1.0,
                   help="Self-Guidance: guide in this first fraction of the steps (1.0)")
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
    args = p.parse_args(argv)
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
