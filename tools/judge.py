"""Are a method's pictures keepers? The case list every toy evaluation shares, the `clean` rate
(tools/artifacts.py's judgement, with the number of objects read from the caption) and the
loop that runs a method over the cases, prints its table row and writes its contact sheets.

    from tools import judge
    judge.CASES                        24 edits in varied prompt styles (Case: source, target)
    judge.clean_rate(images, counts)   share of pictures judged clean
    judge.evaluate(model, "masactrl", judge.CASES, args)    one method -> a row of the table

The cases vary the prompt's style the way a user writes it: a bare "a red circle", size words,
positions, backgrounds, and two objects ("a red circle and a blue square"); each case has one
edit (a colour swap, a shape swap, or a size word) so that every method gets the same inputs.
The runners (tools/clean_runs.py) turn a case into the method's call at the registry's
defaults; the rows are compared only with rows of the same steps and sampler.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tools.artifacts import artifacts
from tools.toydata import COLOR_NAMES, POSITIONS, SHAPES, SIZES, caption, draw

OUT = Path(__file__).parent / "out" / "sheets"             # git-ignored
FIGURES = Path(__file__).parent / "figures"                # small sheets shown in the README


@dataclass
class Case:
    """One edit: the source's attributes and the target's (a colour, shape or size changed)."""
    color: str
    shape: str
    size: str | None = None
    pos: str | None = None
    bg: str | None = None
    second: tuple[str, str] | None = None
    new_color: str | None = None
    new_shape: str | None = None
    new_size: str | None = None

    @property
    def source(self) -> str:
        return caption(self.color, self.shape, self.size, self.pos, self.bg, self.second)

    @property
    def target(self) -> str:
        return caption(self.new_color or self.color, self.new_shape or self.shape,
                       self.new_size or self.size, self.pos, self.bg, self.second)

    def drawn(self, seed: int) -> torch.Tensor:
        """The toy domain's drawing of the source caption -> (3, 64, 64) in [0, 1]."""
        c2, s2 = self.second or (None, None)
        attrs = torch.tensor([[COLOR_NAMES.index(self.color), SHAPES.index(self.shape),
                               SIZES.index(self.size), POSITIONS.index(self.pos),
                               COLOR_NAMES.index(self.bg) if self.bg else -1,
                               COLOR_NAMES.index(c2) if c2 else -1,
                               SHAPES.index(s2) if s2 else -1]])
        return (draw(attrs, torch.Generator().manual_seed(seed))[0] + 1) / 2

    @property
    def objects(self) -> int:
        return 2 if self.second else 1

    @property
    def kind(self) -> str:
        return "colour" if self.new_color else "shape" if self.new_shape else "size"

    @property
    def changed(self) -> tuple[str, str]:
        """(source word, target word) of the edit."""
        if self.new_color:
            return self.color, self.new_color
        if self.new_shape:
            return self.shape, self.new_shape
        return self.size or "", self.new_size


def make_cases(n: int = 24) -> list[Case]:
    """n cases cycling through six prompt styles and three edit kinds, colours and shapes
    rotating so that no background equals an object's colour."""
    styles = [dict(), dict(size="big"), dict(pos="on the left"), dict(bg=True),
              dict(size="small", pos="on the right", bg=True), dict(second=True)]
    colors = COLOR_NAMES[:6]
    out = []
    for i in range(n):
        st, kind = styles[i % len(styles)], (i // len(styles) + i) % 3
        c, s = colors[(i * 5 + i // 6) % 6], SHAPES[(i + i // 6) % 3]
        second = ((colors[(i * 5 + i // 6 + 3) % 6], SHAPES[(i + i // 6 + 1) % 3])
                  if st.get("second") else None)
        new_c = colors[(i * 5 + i // 6 + 2) % 6]
        taken = {c, new_c} | ({second[0]} if second else set())
        bgs = ["black", "white", "purple", "yellow", "blue"]
        bgs = bgs[i // 6 % 5:] + bgs[:i // 6 % 5]
        bg = next(b for b in bgs if b not in taken) if st.get("bg") else None
        case = Case(c, s, st.get("size"), st.get("pos"), bg, second)
        if kind == 0:
            case.new_color = new_c
        elif kind == 1:
            case.new_shape = SHAPES[(i + i // 6 + 2) % 3]
        elif second:                                   # two-object captions take no size word
            case.new_color = new_c
        else:
            case.new_size = "small" if case.size == "big" else "big"
        out.append(case)
    return out


CASES = make_cases()


def objects_in(prompt: str) -> int:
    """Objects a caption names: one, plus one per " and a "."""
    return 1 + prompt.count(" and a ")


def to_array(image) -> np.ndarray:
    """PIL image, (3, H, W) tensor in [0, 1] or (H, W, 3) uint8 -> (3, H, W) float in [0, 1]."""
    if isinstance(image, torch.Tensor):
        return image.detach().float().cpu().numpy()
    a = np.asarray(image)
    return a.transpose(2, 0, 1).astype(np.float32) / 255 if a.dtype == np.uint8 else a


def is_clean(image, n_objects: int) -> bool:
    return artifacts(to_array(image), n_objects)["clean"]


def clean_rate(images, counts) -> float:
    """Share of `images` judged clean, each with its number of objects (an int or a caption)."""
    flags = [is_clean(im, objects_in(c) if isinstance(c, str) else c)
             for im, c in zip(images, counts)]
    return float(np.mean(flags)) if flags else float("nan")


def pct(xs) -> str:
    xs = [bool(x) for x in xs if x is not None]
    return f"{100 * np.mean(xs):.0f} % ({sum(xs)}/{len(xs)})" if xs else "n/a"


def add_args(p: argparse.ArgumentParser, methods: list[str]) -> None:
    """The options every evaluation shares for the clean rate and its sheets."""
    g = p.add_argument_group("clean rate at the user's defaults (tools/judge.py)")
    g.add_argument("--clean", nargs="*", choices=methods, metavar="METHOD",
                   help=f"measure `clean` and accuracy of these ({', '.join(methods)}; "
                        "none named: all) instead of the tool's other measurements")
    g.add_argument("--clean-n", type=int, default=24, help="cases per method (24)")
    g.add_argument("--clean-steps", type=int, default=50, help="steps (50, the CLI's)")
    g.add_argument("--clean-sampler", default="ddim", choices=["ddim", "euler-a", "dpm++"],
                   help="sampler of the methods that generate from noise (ddim)")
    g.add_argument("--sheets", default=str(OUT), help=f"contact sheets here ({OUT})")
    g.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the model's compute precision (fp32; auto: the CLI's default)")
    g.add_argument("--weights", default="full", choices=["full", "int8"], help="(full)")
    g.add_argument("--sheet-figures", dest="clean_figures", default=None,
                   help=f"also small 8-case sheets here (e.g. {FIGURES})")


def evaluate(model, name: str, cases, args, run) -> dict:
    """Run `run(model, case, index, args)` -> (source image, result image, accurate or None, note) on
    every case; the clean rate of the results (n_objects from the target caption), accuracy,
    seconds per case; writes the contact sheets. A case that fails is counted not clean;
    when every case fails alike (a sampler the method refuses), the row says "refused"."""
    from tools.sheets import contact_sheet
    rows, t0 = [], time.time()
    for i, case in enumerate(cases):
        try:
            src, out, ok, note = run(model, case, i, args)
            clean = is_clean(out, case.objects)
        except Exception as e:                                       # noqa: BLE001 -- reported
            src = out = None
            ok, clean, note = None, False, f"failed: {type(e).__name__}: {e}"
        rows.append(dict(case=case, src=src, out=out, ok=ok, clean=clean, note=note))
        print(f"  {name:<20} {i:2d} {case.source!r} -> {case.target!r}: "
              f"clean {clean}, accurate {ok} {note or ''}", flush=True)
    secs = (time.time() - t0) / max(len(cases), 1)
    tag = f"{name}-{args.clean_steps}-{args.clean_sampler}"
    pairs = [(r["src"], r["out"], r["clean"]) for r in rows]
    contact_sheet(pairs, Path(args.sheets) / f"{tag}.png", thumb=64, columns=4)
    if args.clean_figures:
        contact_sheet(pairs[:8], Path(args.clean_figures) / f"{name}.png", thumb=48, columns=4)
    notes = {str(r["note"]) for r in rows}
    if len(notes) == 1 and notes.pop().startswith("failed"):       # the method refuses the run
        return dict(method=name, clean="refused", accurate=rows[0]["note"][8:], secs=secs,
                    failed=len(rows))
    return dict(method=name, clean=pct([r["clean"] for r in rows]),
                accurate=pct([r["ok"] for r in rows]), secs=secs,
                failed=sum(str(r["note"]).startswith("failed") for r in rows))


def table(results, args) -> str:
    """The markdown table of `evaluate`'s rows."""
    lines = [f"{args.clean_n} cases per method, {args.clean_steps} steps, guidance 7.5, sampler "
             f"{args.clean_sampler} (where the method generates from noise), defaults of "
             "`methods.parameters`", "",
             "| method | clean | accurate | s/case | failed |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['clean']} | {r['accurate']} | {r['secs']:.1f} | "
              f"{r['failed']} |" for r in results]
    return "\n".join(lines)


def run_all(model, names, args, runners) -> list[dict]:
    """Every method of `names` over the first --clean-n cases; prints the table."""
    cases = make_cases(args.clean_n)
    results = [evaluate(model, n, cases, args, runners[n]) for n in names]
    print("\n" + table(results, args))
    return results


def maybe_run(args, runners) -> bool:
    """If --clean was given: load the model, run the named methods (all of `runners` when none
    is named) and return True; else False (the tool goes on with its other measurements)."""
    if args.clean is None:
        return False
    from minip2p.load import load_model
    torch.set_num_threads(getattr(args, "threads", None) or torch.get_num_threads())
    model = load_model(getattr(args, "model", None), dtype=args.dtype, weights=args.weights)
    print(f"model {model.name}: {model.dtype}, weights {args.weights}", flush=True)
    run_all(model, args.clean or list(runners), args, runners)
    return True
