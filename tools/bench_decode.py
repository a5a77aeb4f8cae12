"""The VAE decode alone: minip2p's fast path in the layout the tuner picked here
(minip2p/fast/autotune.py), each of the two layouts forced, and diffusers' AutoencoderKL on the same
folder, interleaved round by round in one process (so a noisy machine slows all rows alike).
Prints mean wall time, minor page faults and the time over the floor (tools/floor.py) per decode.

    python tools/bench_decode.py --model SD15_FOLDER --threads 2 --rounds 3
    (SD15_FOLDER: a diffusers-layout folder, e.g. one kept by `tools/bench.py --keep`)
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from floor import best_rate, decode_flops  # noqa: E402
from minip2p.fast import autotune  # noqa: E402
from minip2p.load import load_model  # noqa: E402
from minip2p.pipeline import decode  # noqa: E402


def interleave(rows: dict, rounds: int):
    """Run every row once (warm-up; its output is kept), then `rounds` rounds of all rows in
    turn, so that a noisy machine slows every row alike. -> outputs, wall times, minor faults."""
    with torch.no_grad():
        outs = {name: fn() for name, fn in rows.items()}
        times = {name: [] for name in rows}
        faults = {name: [] for name in rows}
        for _ in range(rounds):
            for name, fn in rows.items():
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return outs, times, faults


def report(what: str, outs: dict, times: dict, stat: str = "mean", faults: dict | None = None,
           flops: dict | None = None, rate: float | None = None):
    """A markdown table: per row the mean (or median) and min time, the mean minor page faults
    if given, the row's GFLOP and its time over the floor (FLOPs ÷ `rate`, tools/floor.py) if
    given, and max|Δ| of its output against the first row's (– where the shapes differ)."""
    centre = statistics.mean if stat == "mean" else statistics.median
    first = next(iter(outs.values()))
    heads = [what, f"{stat} s", "min s"] + (["minor page faults"] if faults else [])
    heads += ["GFLOP", "floor s", f"{stat} / floor"] if flops else []
    print("| " + " | ".join(heads + ["max abs diff vs first row"]) + " |")
    print("|---|" + "---:|" * len(heads))
    for name, out in outs.items():
        fmt = ".3f" if min(times[name]) < 1 else ".2f"
        cells = [name, f"{centre(times[name]):{fmt}}", f"{min(times[name]):{fmt}}"]
        cells += [str(sum(faults[name]) // len(faults[name]))] if faults else []
        if flops:
            floor = flops[name] / rate
            cells += [f"{flops[name] / 1e9:,.1f}", f"{floor:{fmt}}", f"{centre(times[name]) / floor:.2f}x"]
        diff = f"{(out - first).abs().max().item():.1e}" if out.shape == first.shape else "–"
        print("| " + " | ".join(cells + [diff]) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="diffusers-layout folder")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (512)")
    ap.add_argument("--images", type=int, default=1, help="latents decoded per call (1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers row")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    sf = model.vae.cfg.scaling_factor
    f = model.vae.cfg.downscale
    z = torch.randn(args.images, model.vae.cfg.latent_channels, args.size // f, args.size // f,
                    generator=torch.Generator().manual_seed(0)) * 5
    def forced(layout):
        def run():
            old = autotune.set_tuner(autotune.forced(decode=layout))
            try:
                return decode(model, z)
            finally:
                autotune.set_tuner(old)
        return run
    rows = {"minip2p fast (the tuner's layout)": lambda: decode(model, z),
            "minip2p, channels-last forced": forced("channels_last"),
            "minip2p, default layout forced": forced("contiguous")}
    if not args.no_diffusers:
        from diffusers import AutoencoderKL
        ref = AutoencoderKL.from_pretrained(str(args.model / "vae")).eval()
        rows["diffusers AutoencoderKL"] = lambda: (ref.decode(z / sf).sample / 2 + 0.5).clamp(0, 1)
    outs, times, faults = interleave(rows, args.rounds)
    picked, _ = autotune.tuner().trial("decode", tuple(z[0].shape))
    print(f"\nthe tuner's decode layout here: {picked} (its first two calls are its two trials, "
          f"the warm-up and round 1)")
    rate, kernel = best_rate()
    flops = args.images * decode_flops(model.vae.cfg, args.size, args.size)
    print(f"\n{args.model}, {args.images} x {args.size}x{args.size}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds; {autotune.cpu_model()}; best rate measured now "
          f"{rate / 1e9:.0f} GFLOP/s ({kernel})\n")
    report("decode", outs, times, "mean", faults, flops={k: flops for k in rows}, rate=rate)

if __name__ == "__main__":
    main()
