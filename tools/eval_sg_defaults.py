"""Self-Guidance at the user's defaults: does a move or resize keep the picture?

    python -m tools.eval_sg_defaults --n 24 --steps 50      moves and resizes, `methods.run`
    python -m tools.eval_sg_defaults --n 8 --set guide_steps=0.5   … with other parameters
    python -m tools.eval_sg_defaults --n 4 --no-move --seed-from 1000   resizes, other seeds
    python -m tools.eval_sg_defaults --cases 0-11 --log A.jsonl   part of the cases (resumable)

Cases: "a [big|small] COLOUR SHAPE [on a COLOUR background]" (toydata's colours and shapes),
each with the first seed whose unguided object lies clearly in one half (centroid x outside
[0.4, 0.6]); the move asks for the other half (x 0.2 or 0.8, y 0.5); resizes ×0.5 and ×1.5.
Each edit goes through `methods.run(model, "self-guidance", …)` with only the edit and --steps
given (every other parameter at its default unless --set). Reported: moved (centroid in the
asked half), colour and shape kept (toydata.analyse), area within ±25 % of S × the unguided
area, and clean (tools.artifacts) — for the unguided pictures too, as the reference.
`--log FILE` keeps each finished case (one JSON line) and skips it when the run is started again;
`--summary FILE…` only adds up such logs. `--sheet PNG` writes the contact sheet (source │ result,
green frame = clean): per prompt the move, ×0.5 and ×1.5 (the cases of this run, not the
logged ones).
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import numpy as np
import torch

from tools import toydata
from tools.artifacts import artifacts


def tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def prompts(n: int) -> list[str]:
    """n prompts cycling through sizes, colours, shapes and backgrounds (never the object's)."""
    colours, out = toydata.COLOR_NAMES[:6], []
    backs = [None, "white", "black", "yellow", "blue"]
    for i in range(n):
        size = ["", "big", "small"][i % 3]
        colour = colours[(i * 5) % 6]
        shape = toydata.SHAPES[(i // 2) % 3]
        back = backs[(i * 3) % 5]
        back = None if back == colour else back
        words = ["a", size, colour, shape] + ([f"on a {back} background"] if back else [])
        out.append(" ".join(w for w in words if w))
    return out


def pick_seed(m, prompt: str, steps: int, start: int = 0):
    """The first seed whose unguided object is clearly in one half; (seed, analyse)."""
    from minip2p.pipeline import generate
    for seed in range(start, start + 40):
        a = toydata.analyse(generate(m, [prompt], seed=seed, steps=steps, progress=False)[0])
        if a["color"] is not None and abs(a["center"][0] / 64 - 0.5) > 0.1:
            return seed, a
    raise RuntimeError(f"no seed for {prompt!r}")


def pct(xs):
    return f"{100 * sum(xs) / max(len(xs), 1):.0f} % ({sum(xs)}/{len(xs)})"


KEYS = ("moved", "kept", "clean_move", "resized", "kept_resize", "clean_resize", "clean_plain")


def cases(spec: str | None, n: int) -> list[int]:
    """"0-5,12" -> [0, 1, 2, 3, 4, 5, 12]; None: range(n)."""
    if not spec:
        return list(range(n))
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def summary(rows: list[dict]) -> str:
    r = {k: [x for row in rows for x in row.get(k, [])] for k in KEYS}
    return "\n".join(f"{k}: {pct(v)}" for k, v in r.items() if v)


def measure(m, args, extra: dict) -> str:
    from minip2p import methods
    from tools.sheets import contact_sheet
    done = {}
    if args.log and Path(args.log).exists():
        for line in Path(args.log).read_text().splitlines():
            row = json.loads(line)
            done[row["case"]] = row
    rows, pairs, names = [], [], prompts(max(args.n, max(cases(args.cases, args.n)) + 1))
    for i in cases(args.cases, args.n):
        if i in done:
            rows.append(done[i])
            print(done[i]["line"], "(logged)", flush=True)
            continue
        prompt = names[i]
        r = {k: [] for k in KEYS}
        shape = next(s for s in toydata.SHAPES if s in prompt)
        seed, a0 = pick_seed(m, prompt, args.steps, args.seed_from + 100 * i)
        line = f"  {i} {prompt!r} seed {seed}:"
        if not args.no_move:
            x = 0.2 if a0["center"][0] / 64 > 0.5 else 0.8
            res = methods.run(m, "self-guidance", [prompt], move={shape: (x, 0.5)},
                              steps=args.steps, seed=seed, progress=False, **extra)
            plain, guided = (tensor(im) for im in res.images)
            r["clean_plain"].append(artifacts(plain)["clean"])
            a = toydata.analyse(guided)
            cx = a["center"][0] / 64
            r["moved"].append((cx > 0.5) == (x > 0.5))
            r["kept"].append(a["color"] == a0["color"] and a["shape"] == a0["shape"])
            f = artifacts(guided)
            r["clean_move"].append(f["clean"])
            pairs.append((plain, guided, f["clean"]))
            line += (f" x {a0['center'][0] / 64:.2f} -> {cx:.2f} {a['color']} {a['shape']} "
                     f"purity {f['background_purity']:.3f} solid {f['solidity']:.2f} strays "
                     f"{f['stray_blobs']}")
        if not args.no_resize:
            for s in (0.5, 1.5):
                res = methods.run(m, "self-guidance", [prompt], resize={shape: s},
                                  steps=args.steps, seed=seed, progress=False, **extra)
                g = tensor(res.images[1])
                a = toydata.analyse(g)
                ratio = a["area"] / max(a0["area"], 1)
                r["resized"].append(abs(ratio / s - 1) <= 0.25)
                r["kept_resize"].append(a["color"] == a0["color"] and a["shape"] == a0["shape"])
                f = artifacts(g)
                r["clean_resize"].append(f["clean"])
                pairs.append((tensor(res.images[0]), g, f["clean"]))
                line += (f" | ×{s}: ×{ratio:.2f} clean {f['clean']} ({f['background_purity']:.3f} "
                         f"{f['solidity']:.2f} {f['stray_blobs']})")
        print(line, flush=True)
        rows.append(dict(r, case=i, line=line))
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        if args.sheet and pairs:             # after every case: a stopped run keeps its sheet
            contact_sheet(pairs, args.sheet, columns=(1 - args.no_move) + 2 * (1 - args.no_resize))
    return summary(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-resize", action="store_true", help="moves only")
    p.add_argument("--no-move", action="store_true", help="resizes only")
    p.add_argument("--seed-from", type=int, default=0,
                   help="prompt i's seeds are searched from this + 100·i (0; others to check "
                        "settings away from the evaluation's cases)")
    p.add_argument("--cases", default=None, metavar="I-J,K",
                   help="only these prompts (indices into the n prompts; default all)")
    p.add_argument("--log", default=None, help="JSON lines of finished cases, skipped on a rerun")
    p.add_argument("--summary", nargs="+", default=None, metavar="LOG",
                   help="only add up these logs")
    p.add_argument("--sheet", default=None, help="write the contact sheet of this run's cases")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a Self-Guidance parameter other than its default")
    args = p.parse_args(argv)
    if args.summary:
        rows = [json.loads(x) for f in args.summary for x in Path(f).read_text().splitlines()]
        rows = list({row["case"]: row for row in rows}.values())
        print(f"{len(rows)} cases\n{summary(rows)}")
        return
    extra = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        extra[k] = ast.literal_eval(v)
    from minip2p.load import load_model
    torch.manual_seed(0)
    print(f"steps {args.steps}, n {args.n}, {extra or 'defaults'}")
    print(measure(load_model(args.model), args, extra))


if __name__ == "__main__":
    main()
