"""DiffuseIT beside SDEdit at the same strength, on drawn toy pictures: does the colour change
while the shape stays where it was?

Cases: a red circle, square or triangle (no size word, small, big; positions and a white or no
background varied), drawn by tools/toydata.py; the target prompt names the object blue. Both
methods start from the same z_t₀ at the same strength (0.6): the picture noised with the case's
seed, or (the `-inverted` rows) DDIM-inverted under the source prompt. DiffuseIT runs at its
defaults (`--set K=V` changes them), `diffuseit-official` at the official loss weights. Read by
the toy analyser: **colour** (the object's colour is blue), **kept** (IoU of the object's mask
with the source's ≥ 0.8, the IoU printed per case), **clean** (tools/artifacts.py). The judges
are the toy's own CLIP and DINO-layout ViT (tools/train_toy_judges.py).

    OMP_NUM_THREADS=1 python -m tools.eval_diffuseit --judges weights/toy-judges --n 24 \
        [--rows sdedit diffuseit diffuseit-official sdedit-inverted diffuseit-inverted] \
        [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from minip2p import load_model, methods
from tools import toydata
from tools.judge import is_clean, to_array
from tools.sheets import contact_sheet, to_pil

SHAPES, SIZES = ("circle", "square", "triangle"), (0, 1, 2)
POSITIONS = (0, 1, 2, 5)                    # none, left, right, middle


def cases(n: int):
    """n (source caption, target caption, attrs) triples."""
    red, blue, white = (toydata.COLOR_NAMES.index(c) for c in ("red", "blue", "white"))
    out = []
    for i in range(n):
        s, z, p = i % 3, (i // 3) % 3, POSITIONS[(i // 9 + i) % 4]
        b = white if i % 2 else -1
        attrs = torch.tensor([[red, s, z, p, b, -1, -1]])
        words = lambda colour: toydata.caption(colour, SHAPES[s], toydata.SIZES[z],  # noqa: E731
                                               toydata.POSITIONS[p], "white" if b >= 0 else None)
        out.append((words("red"), words("blue"), attrs))
    return out


def judge(source: np.ndarray, result) -> dict:
    a, r = toydata.analyse(source), toydata.analyse(to_array(result))
    iou = toydata.iou(a["mask"], r["mask"])
    return dict(colour=r["color"] == "blue", kept=iou >= 0.8, iou=iou, clean=is_clean(result, 1))


ROWS = ("sdedit", "diffuseit", "sdedit-inverted", "diffuseit-inverted", "diffuseit-official")
OFFICIAL = dict(clip_weight=2000.0, structure_weight=1000.0, semantic_weight=100.0)


def edit(model, row: str, src: str, tgt: str, photo, i: int, args, judges: Path, extra: dict):
    """One case by one row: SDEdit (target prompt) or DiffuseIT, from the picture noised to the
    strength or DDIM-inverted there under the source prompt (the same start for both)."""
    inverted = row.endswith("-inverted")
    extra = {**extra, **OFFICIAL} if row == "diffuseit-official" else extra
    if row.startswith("sdedit"):
        from minip2p.methods.sdedit import generate
        out = generate(model, photo, [tgt], args.strength, i, args.steps, 7.5, progress=False,
                       invert_prompt=src if inverted else None)
        return to_pil(out[0].numpy())
    return methods.run(model, "diffuseit", [src, tgt], image=photo, seed=i, steps=args.steps,
                       strength=args.strength, dino=str(judges / "dino"),
                       clip=str(judges / "clip"), start="inverted" if inverted else "noised",
                       progress=False, **extra).images[-1]


def grid(cases, rows, path: Path, thumb: int = 64, columns: int = 2) -> None:
    """Each case a row of thumbnails: source, then each row's result; `columns` cases across."""
    from PIL import Image
    width = (1 + len(rows)) * thumb
    lines = -(-len(cases) // columns)
    sheet = Image.new("RGB", (columns * width + (columns - 1) * 12, lines * (thumb + 4)), "white")
    for k, pictures in enumerate(cases):
        x, y = (k % columns) * (width + 12), (k // columns) * (thumb + 4)
        for j, im in enumerate(pictures):
            sheet.paste(im.resize((thumb, thumb)), (x + j * thumb, y))
    sheet.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judges", default="weights/toy-judges")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--cases", nargs="*", type=int, default=None, help="only these case "
                    "indices (0-based) of the --n")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--rows", nargs="*", default=list(ROWS[:4]), choices=ROWS,
                    help="diffuseit-official: the official loss weights, noised start")
    ap.add_argument("--set", nargs="*", default=[], metavar="K=V", help="DiffuseIT parameters")
    ap.add_argument("--sheets", default="tools/out/sheets")
    ap.add_argument("--cache", default=None, help="a folder keeping each result (resumable)")
    ap.add_argument("--reverse", action="store_true", help="cases from the last (a second "
                    "process sharing --cache)")
    args = ap.parse_args(argv)
    extra = {k: float(v) if v.replace(".", "", 1).replace("-", "", 1).isdigit() else v
             for k, v in (kv.split("=", 1) for kv in args.set)}
    extra = {k: int(v) if k in ("cuts", "semantic_until", "resample") else v for k, v in extra.items()}
    model = load_model()
    judges = Path(args.judges)
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    rows = {name: [] for name in args.rows}
    pairs = {name: [] for name in args.rows}
    seconds = {name: [] for name in args.rows}
    shown = []
    order = [(i, c) for i, c in enumerate(cases(args.n)) if args.cases is None or i in args.cases]
    for i, (src, tgt, attrs) in order[::-1] if args.reverse else order:
        picture = (toydata.draw(attrs, torch.Generator().manual_seed(i))[0] / 2 + 0.5).numpy()
        photo = to_pil(picture)
        shown.append([photo])
        for name in args.rows:
            file = cache / f"{name}-{i}.png" if cache else None
            if file and file.is_file():
                from PIL import Image
                result = Image.open(file).convert("RGB")
                seconds[name].append(float(json.loads(file.with_suffix(".json").read_text())))
            else:
                t0 = time.time()
                result = edit(model, name, src, tgt, photo, i, args, judges, extra)
                seconds[name].append(time.time() - t0)
                if file:
                    result.save(file)
                    file.with_suffix(".json").write_text(json.dumps(seconds[name][-1]))
            rows[name].append(judge(picture, result))
            pairs[name].append((photo, result, rows[name][-1]["clean"]))
            shown[-1].append(result)
        print(f"{i + 1}/{args.n} {tgt}: " + "  ".join(
            f"{k} {'colour' if rows[k][-1]['colour'] else '-'}/{'kept' if rows[k][-1]['kept'] else '-'}"
            f"/{'clean' if rows[k][-1]['clean'] else '-'} ({rows[k][-1]['iou']:.2f})" for k in rows), flush=True)
    print(f"\n| method | colour blue | shape kept (IoU ≥ 0.8) | both | clean | s/edit |\n"
          f"|---|---:|---:|---:|---:|---:|")
    Path(args.sheets).mkdir(parents=True, exist_ok=True)
    for name, rs in rows.items():
        share = lambda key: f"{100 * np.mean([r[key] for r in rs]):.0f} % ({sum(r[key] for r in rs)}/{len(rs)})"  # noqa: E731
        both = sum(r["colour"] and r["kept"] for r in rs)
        print(f"| {name} | {share('colour')} | {share('kept')} | {100 * both / len(rs):.0f} % "
              f"({both}/{len(rs)}) | {share('clean')} | {np.mean(seconds[name]):.1f} |")
        contact_sheet(pairs[name][:24], Path(args.sheets) / f"diffuseit-vs-{name}.png")
    grid(shown[:24], args.rows, Path(args.sheets) / "diffuseit-side-by-side.png")
    print(f"sheets in {args.sheets} (side by side: source, {', '.join(args.rows)})")


if __name__ == "__main__":
    main()
