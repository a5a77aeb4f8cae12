"""Wall time of one Prompt-to-Prompt edit under each sampler, in one process (the model loaded
once): text encoding, every denoising step with the P2P controller (Replace, cross 0.8, self
0.4, as `minip2p edit`), decoding both images. The configurations run interleaved, round after
round, so that a shared machine's load falls on all of them alike; min and median per row.

    python tools/time_edit.py --rounds 7                       # toy model: ddim 50 vs dpm++ 20
    python tools/time_edit.py --model FOLDER --size 512 --rounds 1 --runs ddim:50,dpm++:20
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minip2p.load import load_model  # noqa: E402
from minip2p.methods import p2p  # noqa: E402
from minip2p.pipeline import generate  # noqa: E402
from minip2p.samplers import SAMPLERS  # noqa: E402

PROMPTS = ["a big red circle on the left", "a big blue circle on the left"]


def edit(model, sampler, steps, size, seed):
    control, _ = p2p.build(model.tokenizer, PROMPTS, steps, store=False)
    t0 = time.perf_counter()
    generate(model, PROMPTS, seed=seed, steps=steps, height=size, width=size, control=control,
             progress=False, sampler=sampler)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the toy model)")
    ap.add_argument("--runs", default="ddim:50,dpm++:20", help="SAMPLER:STEPS,… (first: the "
                    "baseline the others are compared with)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=None, help="image side (default: native)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    runs = []
    for item in args.runs.split(","):
        name, _, steps = item.partition(":")
        if name not in SAMPLERS or not steps.isdigit():
            ap.error(f"--runs {item!r}: expected SAMPLER:STEPS with SAMPLER in {SAMPLERS}")
        runs.append((name, int(steps)))
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    edit(model, "ddim", 2, args.size, args.seed)                      # warm-up, not counted
    times = {r: [] for r in runs}
    for _ in range(args.rounds):
        for name, steps in runs:
            times[(name, steps)].append(edit(model, name, steps, args.size, args.seed))
    base = min(times[runs[0]])
    print(f"| sampler, steps | min s | median s | speed-up (min) vs {runs[0][0]}-{runs[0][1]} |")
    print("|---|---|---|---|")
    for (name, steps), ts in times.items():
        print(f"| {name}, {steps} | {min(ts):.3f} | {statistics.median(ts):.3f} | "
              f"{base / min(ts):.2f}× |")


if __name__ == "__main__":
    main()
