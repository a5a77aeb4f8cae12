"""Wall time of one Prompt-to-Prompt edit under each sampler, in one process (the model loaded
once): text encoding, every denoising step with the P2P controller (Replace, cross 0.8, self
0.4, as `minip2p edit`), decoding both images. The configurations run interleaved, round after
round, so that a shared machine's load falls on all of them alike; min and median per row.

    python -m tools.time_edit --rounds 7                       # toy model: ddim 50 vs dpm++ 20
    python -m tools.time_edit --model FOLDER --size 512 --rounds 1 --runs ddim:50,dpm++:20
"""
from __future__ import annotations

import argparse

from minip2p.load import load_model
from minip2p.methods import p2p
from minip2p.pipeline import generate
from minip2p.samplers import SAMPLERS
from tools.harness import best_median, interleave, set_threads, table

PROMPTS = ["a big red circle on the left", "a big blue circle on the left"]


def edit(model, sampler, steps, size, seed):
    control, _ = p2p.build(model.tokenizer, PROMPTS, steps, store=False)
    generate(model, PROMPTS, seed=seed, steps=steps, height=size, width=size, control=control,
             progress=False, sampler=sampler)


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
    set_threads(args.threads)
    model = load_model(args.model)
    edit(model, "ddim", 2, args.size, args.seed)                      # warm-up, not counted
    rows = {r: (lambda r=r: edit(model, *r, args.size, args.seed)) for r in runs}
    times = interleave(rows, args.rounds, warmup=False)[1]
    base = min(times[runs[0]])
    cells = []
    for (name, steps), ts in times.items():
        best, median = best_median(ts)
        cells.append([f"{name}, {steps}", f"{best:.3f}", f"{median:.3f}", f"{base / best:.2f}×"])
    table(["sampler, steps", "min s", "median s",
           f"speed-up (min) vs {runs[0][0]}-{runs[0][1]}"], cells, "llll")


if __name__ == "__main__":
    main()
