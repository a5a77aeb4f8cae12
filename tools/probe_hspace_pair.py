"""Does a prompt-pair h direction change the toy's colour when read from the unconditional rows?

Asyrp's prompt-pair direction Δh_t = mean h_t("a blue circle") − mean h_t("a red circle") over
sampled images, read from the conditional rows (as methods/hspace_directions.make_prompts) or
from the unconditional rows of the same guided runs, added to h in both CFG rows of red-circle
seeds, asymmetric (Asyrp) or symmetric (Haas et al.); each picture read by the toy analyser
(colour, shape, IoU of the object's mask with the unedited one).

    OMP_NUM_THREADS=1 python -m tools.probe_hspace_pair [--symmetric] [--weights 0 1 4 16]
"""
from __future__ import annotations

import argparse

from minip2p import load_model
from minip2p.methods.hspace import HShift, sample
from minip2p.methods.hspace_directions import _h_of
from minip2p.pipeline import decode, encode_text, initial_noise
from tools import toydata


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 4.0, 16.0])
    ap.add_argument("--symmetric", action="store_true")
    args = ap.parse_args(argv)
    m, steps, seeds = load_model(), args.steps, list(range(args.samples))
    hu_r, hc_r = _h_of(m, "a red circle", seeds, steps, 7.5, 8, False)
    hu_b, hc_b = _h_of(m, "a blue circle", seeds, steps, 7.5, 8, False)
    dirs = {"unconditional rows": hu_b.mean(0) - hu_r.mean(0),
            "conditional rows": hc_b.mean(0) - hc_r.mean(0)}
    W = args.weights
    cond, unc = encode_text(m, ["a red circle"]).expand(len(W), -1, -1), encode_text(m, [""])
    for name, d in dirs.items():
        for seed in args.seeds:
            shift = HShift(lambda h, step: d[step], W, not args.symmetric)
            x = decode(m, sample(m, cond, unc, initial_noise(m, seed, 64, 64), steps, 7.5, shift,
                                 0, 0, seed, progress=False))
            reads = [toydata.analyse(x[i].float().numpy()) for i in range(len(W))]
            print(name, seed, "  ".join(
                f"×{w:g}: {r['color']} {r['shape']} IoU {toydata.iou(reads[0]['mask'], r['mask']):.2f}"
                for w, r in zip(W, reads)), flush=True)


if __name__ == "__main__":
    main()
