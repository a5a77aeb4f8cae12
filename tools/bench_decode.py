"""The VAE decode alone: minip2p's fast path in the layout the tuner picked here
(minip2p/fast/autotune.py), each of the two layouts forced, and diffusers' AutoencoderKL on the same
folder, interleaved round by round in one process (so a noisy machine slows all rows alike).
Prints mean wall time, minor page faults and the time over the floor (tools/floor.py) per decode.

    python -m tools.bench_decode --model SD15_FOLDER --threads 2 --rounds 3
    (SD15_FOLDER: a diffusers-layout folder, e.g. one kept by `python -m tools.bench --keep`)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minip2p.fast import autotune
from minip2p.load import load_model
from minip2p.pipeline import decode
from tools.floor import best_rate, decode_flops
from tools.harness import cpu_model, interleave, report, set_threads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="diffusers-layout folder")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (512)")
    ap.add_argument("--images", type=int, default=1, help="latents decoded per call (1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers row")
    args = ap.parse_args(argv)
    set_threads(args.threads)
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
          f"{args.rounds} interleaved rounds; {cpu_model()}; best rate measured now "
          f"{rate / 1e9:.0f} GFLOP/s ({kernel})\n")
    report("decode", outs, times, "mean", faults, flops={k: flops for k in rows}, rate=rate)

if __name__ == "__main__":
    main()
