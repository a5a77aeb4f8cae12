"""The cost half of `python -m tools.eval_guidance --cost`: each guidance method of minip2p and
its diffusers counterpart run once in a process of its own (time per step, peak RSS, UNet
calls and rows), then the two side by side in one table."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from tools.harness import peak_rss_gib

METHODS = ["plain", "excite", "guide", "pix2pix-zero", "diffusers-plain", "diffusers-excite",
           "diffusers-pix2pix-zero"]
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
