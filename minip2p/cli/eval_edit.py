"""`minip2p eval-edit SOURCE_DIR EDITED_DIR [--masks DIR] [--prompts FILE]`: PIE-Bench's metrics
(data/edit_metrics.py) for every source picture and its edit, one CSV row each and the means.

Pairs: each picture in SOURCE_DIR and the file of the same name (any image suffix) in
EDITED_DIR; an edit wider than its source by a whole number of panels is read as the benchmark
reads its saved panels, by its last panel. `--prompts` is a JSON object {name: target prompt}
or PIE-Bench's own mapping_file.json (then its image paths, masks and editing prompts are used,
with SOURCE_DIR its annotation_images folder). `--masks DIR`: NAME.png per picture, white = the
edited region. The models load from a folder or the Hugging Face cache (never downloaded here):
a metric whose model is absent is skipped with one line saying what to give.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from ..errors import MinipError
from .common import check_out_file

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ORDER = ("structure", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edit")


def _picture(path: Path) -> np.ndarray:
    from ..real.images import open_image
    return np.asarray(open_image(path), dtype=np.float32) / 255


def _find(folder: Path, stem: str) -> Path | None:
    return next((folder / (stem + s) for s in SUFFIXES if (folder / (stem + s)).is_file()), None)


def _read_prompts(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MinipError(f"--prompts file '{path}' not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinipError(f"--prompts '{path}': not JSON ({e}); give {{name: prompt}} or "
                         "PIE-Bench's mapping_file.json") from None
    if not isinstance(data, dict):
        raise MinipError(f"--prompts '{path}': expected a JSON object {{name: prompt}}")
    return data


def pairs(source: Path, edited: Path, masks: Path | None, prompts: dict):
    """-> [(name, source path, edited path, mask or None, prompt or None)]."""
    from ..data.edit_metrics import mask_decode
    out = []
    if prompts and all(isinstance(v, dict) and "image_path" in v for v in prompts.values()):
        for key, item in prompts.items():                        # PIE-Bench's mapping file
            rel = item["image_path"]
            mask = None if masks else mask_decode(item.get("mask", []))
            prompt = item.get("editing_prompt", "").replace("[", "").replace("]", "")
            out.append((key, source / rel, edited / rel, mask, prompt))
    else:
        for src in sorted(p for p in source.iterdir() if p.suffix.lower() in SUFFIXES):
            edit = _find(edited, src.stem)
            if edit is None:
                raise MinipError(f"no edit of '{src.name}' in {edited} (expected {src.stem}.png "
                                 "or another image suffix)")
            prompt = prompts.get(src.stem, prompts.get(src.name))
            out.append((src.stem, src, edit, None, prompt))
    if not out:
        raise MinipError(f"no pictures in {source} (PNG, JPEG, WebP or BMP)")
    if masks:
        found = []
        for name, src, edit, _, prompt in out:
            m = _find(masks, Path(name).stem) or _find(masks, src.stem)
            if m is None:
                raise MinipError(f"no mask for '{name}' in {masks} (expected {src.stem}.png)")
            found.append((name, src, edit, (_picture(m).mean(axis=2) >= 0.5).astype(float), prompt))
        out = found
    return out


def _size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header (a file PIL cannot read fails in `_picture`)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:                                                     # noqa: BLE001
        return _picture(path).shape[:2]


def _check_sizes(todo) -> None:
    """Every pair (and mask) fits, checked before any model loads."""
    for name, src, edit, mask, _ in todo:
        (h, w), (H, W) = _size(src), _size(edit)
        if (H, W) != (h, w) and not (H == h and W > w and W % w == 0):
            raise MinipError(f"'{name}': the edit is {W}×{H}, its source {w}×{h}; they must be "
                             "the same size (or the edit a strip of panels of that size)")
        if mask is not None and mask.shape != (h, w):
            raise MinipError(f"'{name}': the mask is {mask.shape[1]}×{mask.shape[0]}, the "
                             f"picture {w}×{h}")


def _last_panel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The edit itself, or the last panel of a strip (as the benchmark reads its saved panels)."""
    return y if y.shape == x.shape else y[:, y.shape[1] - x.shape[1]:]


def _cached(spec: str | None, default: str, what: str, flag: str, files: list[str]):
    spec = spec or default
    if spec.lower() == "none":
        return None
    if Path(spec).is_dir():
        return Path(spec)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(spec, local_files_only=True, allow_patterns=files))
    except Exception:                                                     # noqa: BLE001
        print(f"minip2p: {what} skipped: '{spec}' is not a folder nor in the Hugging Face cache "
              f"(give {flag} DIR, or {flag} none)", file=sys.stderr)
        return None


def cmd_eval_edit(args):
    from ..data import edit_metrics
    source, edited = Path(args.source_dir), Path(args.edited_dir)
    for folder, flag in ((source, "SOURCE_DIR"), (edited, "EDITED_DIR"),
                         (Path(args.masks) if args.masks else None, "--masks")):
        if folder is not None and not folder.is_dir():
            raise MinipError(f"{flag} '{folder}' is not a folder")
    out = check_out_file(args.out, suffixes=(".csv",)) if args.out else None
    todo = pairs(source, edited, Path(args.masks) if args.masks else None,
                 _read_prompts(args.prompts))
    _check_sizes(todo)
    if args.lpips and not Path(args.lpips).is_file():
        raise MinipError(f"--lpips: missing weights file {args.lpips}")
    dino = clip = lp = None
    path = _cached(args.dino, "facebook/dino-vitb8", "structure distance", "--dino",
                   ["config.json", "model.safetensors"])
    if path:
        from ..model.dino import load_dino
        dino = load_dino(path)
    if any(p is not None for *_, p in todo):
        path = _cached(args.clip, "openai/clip-vit-large-patch14", "CLIP similarity", "--clip",
                       ["config.json", "model.safetensors", "vocab.json", "merges.txt"])
        if path:
            from ..data.clip_image import load_clip
            clip = load_clip(path)
    if args.lpips:
        from ..data.lpips import load_lpips
        lp = load_lpips(args.lpips)
    else:
        print("minip2p: LPIPS skipped: give --lpips FILE (python -m tools.convert_lpips writes "
              "one)", file=sys.stderr)
    rows = []
    try:
        for i, (name, src, edit, mask, prompt) in enumerate(todo):
            x = _picture(src)
            y = _last_panel(x, _picture(edit))
            rows.append({"name": name, **edit_metrics.scores(x, y, mask, prompt, dino, lp, clip)})
            print(f"\r{i + 1}/{len(todo)} {name}", end="", file=sys.stderr, flush=True)
    finally:
        print(file=sys.stderr)
    columns = ["name"] + [k for k in ORDER if any(k in r for r in rows)]
    if out:
        from ..atomic import atomic_write

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, columns)
                w.writeheader()
                w.writerows(rows)
        atomic_write(out, write)
    for k in columns[1:]:
        vals = [r[k] for r in rows if k in r and not math.isnan(r[k]) and not math.isinf(r[k])]
        mean = f"{sum(vals) / len(vals):.4f}" if vals else "nan"
        print(f"{k:<11} {mean:>12}   ({len(vals)} of {len(rows)} pictures)")
    if out:
        print(f"wrote {out}")


def add_commands(sub):
    e = sub.add_parser("eval-edit", help="PIE-Bench's metrics for edited pictures against their "
                                         "sources")
    e.add_argument("source_dir", metavar="SOURCE_DIR")
    e.add_argument("edited_dir", metavar="EDITED_DIR")
    e.add_argument("--masks", metavar="DIR", help="NAME.png per picture, white = edited region")
    e.add_argument("--prompts", metavar="FILE", help="JSON {name: target prompt}, or PIE-Bench's "
                                                     "mapping_file.json")
    e.add_argument("--dino", metavar="DIR|REPO", help="DINO ViT for the structure distance "
                   "(default facebook/dino-vitb8 from the cache; none: skip)")
    e.add_argument("--clip", metavar="DIR|REPO", help="CLIP for the CLIP similarity (default "
                   "openai/clip-vit-large-patch14 from the cache; none: skip)")
    e.add_argument("--lpips", metavar="FILE", help="squeeze LPIPS weights (.safetensors)")
    e.add_argument("--out", metavar="FILE.csv", help="one row per picture")
    e.set_defaults(run=cmd_eval_edit)
