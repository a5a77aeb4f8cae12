"""`python -m tools.eval_inversion --edits N`: every inversion side by side on N of
tools/judge.py's cases (drawn pictures, seed = the case's index; a word swap of colour, shape or
size, clean_runs.same_words_target), resumable.

Each picture is inverted under its source caption, then Prompt-to-Prompt (the registry's
defaults, one batch [source, target]) runs from the inversion: the source row is the
reconstruction, the target row the edit. Per (case, inversion):

    rec         PSNR of the reconstruction against the drawing (dB)
    ok          the toy analyser finds the target's colour and shape (clean_runs.shows)
    bg          PSNR of the edit against the drawing outside the objects: pixels farther than
                0.12 from the border's median colour in either picture, dilated by 2 px (dB)
    structure   PIE-Bench's structure distance (data/edit_metrics.structure_distance, ×10³)
                between the drawing and the edit, by the toy's DINO-layout ViT (--judges);
                structure_rec the same for the reconstruction
    secs        inversion plus edit, wall time (the metrics not counted)

Each result is one JSON line of OUT/results.jsonl, written as soon as it is known, and the
pictures OUT/images/CASE-METHOD.png (reconstruction │ edit) beside OUT/images/CASE-drawing.png;
a restart skips what the file holds (lines of other steps or guidance are ignored). At the end,
or alone with --table-only: the table (means and medians) from the file, and one contact sheet
per inversion (drawing │ reconstruction │ edit, the edit framed green when ok). --rescore: the
structure columns again from the saved pictures (PNG, 8 bits), by the DINO of --judges.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from minip2p.real import images, invert
from tools import judge

DEFAULT_OUT = Path(__file__).parent / "out" / "inversion_edits"          # git-ignored


def objects(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> bool (H, W): farther than 0.12 from the border's median colour."""
    border = torch.cat([x[:, :2].reshape(3, -1), x[:, -2:].reshape(3, -1),
                        x[:, :, :2].reshape(3, -1), x[:, :, -2:].reshape(3, -1)], 1)
    return ((x - border.median(1).values[:, None, None]) ** 2).sum(0).sqrt() > 0.12


def background_psnr(edit: torch.Tensor, src: torch.Tensor) -> float:
    """PSNR of `edit` against `src` (3, H, W) outside both pictures' objects, dilated 2 px."""
    fg = (objects(edit) | objects(src)).float()[None, None]
    keep = F.max_pool2d(fg, 5, 1, 2)[0, 0] < 0.5
    mse = ((edit - src) ** 2)[:, keep].mean()
    return float(-10 * torch.log10(mse.clamp(min=1e-10)))


def out_dir(args) -> Path:
    return Path(args.out) if args.out else DEFAULT_OUT / f"{args.steps}steps-g{args.guidance:g}"


def settings(args) -> dict:
    return dict(steps=args.steps, guidance=args.guidance, inner_steps=args.inner_steps)


def load_results(path: Path, want: dict) -> dict:
    """{(case, method): row} of the lines of `path` made with the settings `want`."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:                    # a line cut short by a kill
                continue
            if all(row.get(k) == v for k, v in want.items()):
                done[row["case"], row["method"]] = row
    return done


def save_png(t: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> PNG."""
    a = (t.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    Image.fromarray(a.astype(np.uint8)).save(path)


def to_hwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().permute(1, 2, 0).numpy()


def one(model, dino, case, i: int, tgt: str, method: str, args) -> tuple[dict, torch.Tensor]:
    """Invert, edit, measure one (case, method) -> (row, out (2, 3, H, W): reconstruction, edit)."""
    from minip2p.data.edit_metrics import SCALES, structure_distance
    from minip2p.methods import p2p
    from minip2p.pipeline import to_pil
    from tools.clean_runs import shows
    src = case.drawn(i)
    t0 = time.perf_counter()
    inv = invert.invert(model, src[None] * 2 - 1, case.source, method, args.steps,
                        args.guidance, args.inner_steps, progress=False)
    control, _ = p2p.build(model.tokenizer, [case.source, tgt], args.steps)
    out = invert.run(model, inv, [case.source, tgt], control, progress=False).cpu()
    secs = time.perf_counter() - t0
    row = dict(case=i, method=method, source=case.source, target=tgt, **settings(args),
               rec=images.psnr(out[:1], src[None]), ok=bool(shows(to_pil(out[1:])[0], tgt)),
               bg=background_psnr(out[1], src), secs=secs)
    if dino is not None:
        x = to_hwc(src)
        row["structure"] = structure_distance(dino, x, to_hwc(out[1])) * SCALES["structure"]
        row["structure_rec"] = structure_distance(dino, x, to_hwc(out[0])) * SCALES["structure"]
    return row, out


def run(model, args) -> None:
    """The --edits mode: compute what results.jsonl lacks, then the table and the sheets."""
    from minip2p.model.dino import load_dino
    from tools.clean_runs import same_words_target
    out = out_dir(args)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = load_results(path, settings(args))
    dino = load_dino(Path(args.judges) / "dino") if args.judges != "none" else None
    cases = judge.make_cases(args.edits)
    todo = sum((i, m) not in done for i in range(len(cases)) for m in args.methods)
    print(f"model {model.name}, {args.steps} steps, guidance {args.guidance:g}, {len(cases)} "
          f"cases, CPU {torch.get_num_threads()} thread(s); {todo} to run, the rest in {path}",
          flush=True)
    for i, case in enumerate(cases):
        tgt = same_words_target(case)
        for method in args.methods:
            if (i, method) in done:
                continue
            row, pics = one(model, dino, case, i, tgt, method, args)
            save_png(case.drawn(i), out / "images" / f"{i:02d}-drawing.png")
            save_png(torch.cat(list(pics), 2), out / "images" / f"{i:02d}-{method}.png")
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[i, method] = row
            sd = (f"  structure {row['structure']:5.2f} (rec {row['structure_rec']:5.2f})"
                  if "structure" in row else "")
            print(f"  {i:2d} {case.source!r:<48} -> {tgt!r:<40} {method:<16} rec "
                  f"{row['rec']:5.2f} dB  edit {'ok' if row['ok'] else 'NO'}  background "
                  f"{row['bg']:5.2f} dB{sd}  {row['secs']:5.1f} s", flush=True)
    finish(args)


def rescore(args) -> None:
    """Recompute the structure columns of results.jsonl from the saved pictures with the DINO of
    --judges (when the judge changed), the file rewritten whole."""
    from minip2p.data.edit_metrics import SCALES, structure_distance
    from minip2p.model.dino import load_dino
    out = out_dir(args)
    path, dino = out / "results.jsonl", load_dino(Path(args.judges) / "dino")
    rows = list(load_results(path, {}).values())
    png = lambda name: np.asarray(Image.open(out / "images" / name).convert("RGB"),  # noqa: E731
                                  dtype=np.float32) / 255
    for r in rows:
        x, both = png(f"{r['case']:02d}-drawing.png"), png(f"{r['case']:02d}-{r['method']}.png")
        w = both.shape[1] // 2
        r["structure"] = structure_distance(dino, x, both[:, w:]) * SCALES["structure"]
        r["structure_rec"] = structure_distance(dino, x, both[:, :w]) * SCALES["structure"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def finish(args) -> str:
    """Print the table of results.jsonl (its first --edits cases) and write the sheets."""
    out = out_dir(args)
    if getattr(args, "rescore", False):
        rescore(args)
    done = load_results(out / "results.jsonl", settings(args))
    rows = {m: [done[i, m] for i in range(args.edits) if (i, m) in done] for m in args.methods}
    text = table(rows)
    print("\n" + text, flush=True)
    sheets(out, rows, Path(args.sheets), args.clean_figures)
    return text


def table(rows: dict[str, list[dict]]) -> str:
    """{method: rows} -> the markdown table: mean and median of each measure."""
    def mm(rs, key, f="{:.2f}"):
        xs = [r[key] for r in rs if key in r]
        if not xs:
            return "–"
        return f"{f.format(statistics.fmean(xs))} / {f.format(statistics.median(xs))}"
    lines = ["| inversion | cases | reconstruction PSNR (dB) | edit ok | background PSNR (dB) "
             "| structure ×10³, edit | structure ×10³, reconstruction | s/edit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, rs in rows.items():
        if not rs:
            lines.append(f"| {m} | 0 | – | – | – | – | – | – |")
            continue
        ok = sum(r["ok"] for r in rs)
        lines.append(f"| {m} | {len(rs)} | {mm(rs, 'rec')} | {100 * ok / len(rs):.0f} % "
                     f"({ok}/{len(rs)}) | {mm(rs, 'bg')} | {mm(rs, 'structure', '{:.3f}')} | "
                     f"{mm(rs, 'structure_rec', '{:.3f}')} | {mm(rs, 'secs', '{:.1f}')} |")
    return "\n".join(lines + ["", "(each cell: mean / median)"])


def sheets(out: Path, rows: dict[str, list[dict]], where: Path, figures) -> None:
    """One contact sheet per inversion from the saved pictures (drawing │ reconstruction │
    edit); with `figures`, also a small one of the first 8 cases there."""
    from tools.sheets import contact_sheet
    for m, rs in rows.items():
        triples = []
        for r in rs:
            pic = out / "images" / f"{r['case']:02d}-{m}.png"
            drawing = out / "images" / f"{r['case']:02d}-drawing.png"
            if not (pic.is_file() and drawing.is_file()):
                continue
            both = Image.open(pic).convert("RGB")
            w, h = both.size
            triples.append((Image.open(drawing).convert("RGB"), both.crop((0, 0, w // 2, h)),
                            both.crop((w // 2, 0, w, h)), r["ok"]))
        if not triples:
            continue
        contact_sheet(triples, where / f"inversion-edit-{m}-{rs[0]['steps']}.png", thumb=64,
                      columns=4)
        if figures:
            contact_sheet(triples[:8], Path(figures) / f"inversion-edit-{m}.png", thumb=48,
                          columns=4)
