"""One denoising step's UNet call, the part of an edit that runs 50 times: minip2p's fast path
with and without a controller (P2P Replace, MasaCtrl, plug-and-play), its explicit path, and
diffusers' UNet (SDPA) on the same folder, interleaved round by round in one process (so a noisy
machine slows all rows alike).

Batch 4 = two prompts with classifier-free guidance, as in an edit; each controller runs at a step
inside all its windows, so it does the most work: Replace at step 0 (cross and self injection),
MasaCtrl at step S = 4 (mutual self-attention at layers ≥ L). Plug-and-play uses its own 3-row
batch [(source, c), (target, ∅), (target, c)] at step 0 (features and q, k injected) and is
compared with a plain call of the same 3 rows. The model loads at `--dtype` (auto: the CLI's
default, fast/precision.py) and `--weights`; `--fp32` adds plain rows of the same folder in fp32,
`--openvino` OpenVINO's (tools/bench_openvino.py), each at batch 2 (one image) and 4.

    python -m tools.bench_unet --model SD15_FOLDER --threads 2 --rounds 3
    python -m tools.bench_unet --model weights/toy --size 64 --threads 2 --rounds 20 --no-diffusers
    python -m tools.bench_unet --model SD15_FOLDER --threads 2 --rounds 2 --no-explicit \
        --no-diffusers --openvino --fp32     (the default precision against fp32 and OpenVINO)
    (SD15_FOLDER: a diffusers-layout folder, e.g. one kept by `python -m tools.bench --keep`)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minip2p.fast import autotune, switched
from minip2p.guidance import GuidanceBatch
from minip2p.load import load_model
from minip2p.methods import masactrl, p2p, pnp
from minip2p.pipeline import encode_text
from tools.floor import best_rate, unet_flops
from tools.harness import cpu_model, interleave, report, set_threads

PROMPTS = ["a painting of a squirrel eating a burger", "a painting of a lion eating a burger"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="diffusers-layout folder")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (512)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers row")
    ap.add_argument("--no-explicit", action="store_true", help="skip the (slow) explicit row")
    ap.add_argument("--dtype", default="auto", help="auto (the CLI's default), fp32, bf16 …")
    ap.add_argument("--weights", default="full", help="full or int8")
    ap.add_argument("--fp32", action="store_true", help="plain rows in fp32 too (batch 2, 4)")
    ap.add_argument("--openvino", action="store_true",
                    help="OpenVINO rows, default precision and f32 (batch 2, 4)")
    ap.add_argument("--no-methods", action="store_true",
                    help="skip the MasaCtrl and plug-and-play rows")
    ap.add_argument("--only-methods", action="store_true",
                    help="only the plain rows and the MasaCtrl / plug-and-play rows")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top operators of one plain batch-2 call")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    model = load_model(args.model, dtype=args.dtype, weights=args.weights)
    unet, side = model.unet, args.size // 8
    cf = torch.cat([encode_text(model, [""]).expand(2, -1, -1),
                    encode_text(model, PROMPTS)]).float()
    zf = torch.randn(4, 4, side, side, generator=torch.Generator().manual_seed(0))
    z, context = zf.to(model.dtype), cf.to(model.dtype)                # the model's precision
    two = [0, 2]                                                        # [∅, c]: one image
    t = int(model.scheduler.timesteps(50)[0])
    edit, _ = p2p.build(model.tokenizer, PROMPTS, 50, "replace", store=False)
    cfg2 = GuidanceBatch.cfg_layout(2)
    masa = masactrl.build(model.tokenizer, PROMPTS, 50, 4, masactrl.default_layer(unet),
                          len(unet.transformer_blocks()))
    z3, c3, b3 = z[1:], context[1:], pnp.batch()                       # pnp's 3 rows
    pnp_ctrl = pnp.PlugAndPlay(50)
    rows = {"minip2p fast, plain": lambda: unet(z, t, context, batch=cfg2),
            "minip2p fast, plain, batch 2": lambda: unet(z[two], t, context[two])}
    if not args.no_methods:
        rows.update({
            "minip2p fast, MasaCtrl (step 4)": lambda: unet(z, t, context, masa, 4, batch=cfg2),
            "minip2p fast, plain, 3 rows": lambda: unet(z3, t, c3, batch=b3),
            "minip2p fast, plug-and-play (step 0), 3 rows": lambda: unet(
                z3, t, c3, pnp_ctrl, 0, batch=b3)})
    if not args.only_methods:
        rows["minip2p fast, Replace"] = lambda: unet(z, t, context, edit, 0)
    if not args.no_explicit and not args.only_methods:
        def explicit():
            with switched(model, False):                   # the fast path off for this call
                return unet(z, t, context, edit, 0)
        rows["minip2p explicit, Replace"] = explicit
    if not args.no_diffusers and not args.only_methods:
        from diffusers import UNet2DConditionModel
        ref = UNet2DConditionModel.from_pretrained(str(args.model / "unet")).eval()
        rows["diffusers UNet (SDPA), plain"] = lambda: ref(zf, t, cf).sample
    if args.fp32 or args.openvino:
        from minip2p.fast import install
        m32 = load_model(args.model, dtype="fp32", fast=False)
        batches = {2: (zf[two], cf[two]), 4: (zf, cf)}
        if args.openvino:
            from tools import bench_openvino
            rows.update(bench_openvino.rows(m32.unet, batches, t, args.threads))
        if args.fp32:
            install(m32)
            for b, (zb, cb) in batches.items():
                rows[f"minip2p fast fp32, plain, batch {b}"] = \
                    lambda zb=zb, cb=cb: m32.unet(zb, t, cb)
    rows = {name: (lambda fn=fn: fn().float()) for name, fn in rows.items()}
    t0 = time.perf_counter()
    with torch.no_grad():
        rows["minip2p fast, plain"]()                  # the first fast call: the tuner measures here
    first, measured = time.perf_counter() - t0, autotune.tuner().measured
    outs, times, _ = interleave(rows, args.rounds)
    rate, kernel = best_rate()                                       # same run, same threads
    per = {b: unet_flops(unet.cfg, model.vae.cfg, b, args.size, args.size) for b in (2, 3, 4)}
    flops = {name: per[len(out)] for name, out in outs.items()}       # each row's batch
    print(f"\n{args.model}, {model.dtype}, weights {args.weights}, UNet batch 4 (or as named) "
          f"at {args.size}x{args.size}, t = {t}, {args.threads} "
          f"threads, {args.rounds} interleaved rounds; {cpu_model()}; best rate measured now "
          f"{rate / 1e9:.0f} GFLOP/s ({kernel}); floor = GFLOP / that rate\n")
    from minip2p.fast.precision import NATIVE_FLAGS, bf16_native, cpu_flags
    print(f"native bf16: {bf16_native()} (flags: "
          f"{', '.join(f for f in NATIVE_FLAGS if f in cpu_flags()) or 'none'})\n")
    report("UNet call", outs, times, "median", flops=flops, rate=rate)
    print(f"\nfirst fast call of the process: {first:.2f} s, {measured} kernel choices measured in it "
          f"(0 when {autotune.cache_file()} already held them)")
    print(f"\nthe tuner's choices here ({autotune.cache_file()}, {autotune.machine_key()}):")
    for site, choice in sorted(autotune.tuner().table.get(autotune.machine_key(), {}).items()):
        times = autotune.tuner().timings.get(site, {})
        print(f"  {site:28} {str(choice):14} " + "  ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))
    if args.profile:
        profile(rows["minip2p fast, plain, batch 2"])


def profile(call):
    """Where one call's time goes: torch.profiler's operators by their own CPU time, as shares."""
    from torch.profiler import ProfilerActivity
    with torch.no_grad(), torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    print(f"\none plain batch-2 call, {total / 1e6:.2f} s of operator time:")
    for e in ops[:12]:
        print(f"  {e.key:52} {e.self_cpu_time_total / total:6.1%}  {e.count:4d} calls")

if __name__ == "__main__":
    main()
