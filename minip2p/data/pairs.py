"""Prompt-to-Prompt paired data at scale: the InstructPix2Pix data recipe (Brooks et al. 2023,
`dataset_creation/generate_img_dataset.py`), resumable and sharded.

For item i of CAPTIONS.jsonl ({"caption", "edit", "output"}) and try j = 0 … samples−1:

    seed_ij, (threshold, guidance) from (--seed, i, j) alone        (numpy SeedSequence)
    threshold ~ U(min_p2p, max_p2p),  guidance ~ U(7.5, 15)
    [caption, output] generated together with Euler ancestral (one noise shared by both images at
    every step), self-attention maps of image 1 copied from image 0 while threshold > step/(N−1)
    (SelfCopy, below)
    CLIP scores (clip_image.py): kept if sim_0, sim_1 ≥ clip_threshold, sim_img ≥
    clip_img_threshold, sim_dir ≥ clip_dir_threshold; the best `keep` by sim_dir
    (no CLIP: no filter, the first `keep` tries)

Output, per item: DIR/{i:07d}/prompt.json, {seed}_0.jpg, {seed}_1.jpg, metadata.jsonl (one record
per kept pair: seed, p2p_threshold, cfg_scale, the four scores). Every file is written atomically
and metadata.jsonl LAST: an item is done exactly when its metadata.jsonl exists. A rerun skips
done items, empties and redoes the others; as every number comes from (--seed, i, j), a run killed
at any moment and run again equals a clean run.

Sharding: partition K of N takes the K-th of N contiguous chunks (np.array_split's); items never
overlap, so partitions never write the same file. Each partition records its settings in
DIR/run-K-of-N.json (its own file); a DIR whose records name other captions or other settings
is refused.

Batching (`--batch K`): K tries, of one item or of several, run as one UNet batch of 2K images
(4K rows with the unconditional ones): each try keeps its own noise stream (GroupSampler), its
own threshold (SelfCopy with one per pair) and its own guidance, so the pictures are those of
the tries run one by one, within float rounding; only the speed changes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..control import Controller, Site
from ..errors import MinipError, ParameterError

FIELDS = ("caption", "edit", "output")
DONE = "metadata.jsonl"


@dataclass(frozen=True)
class Settings:
    """Everything that decides an item's output (recorded in DIR/run-K-of-N.json)."""
    samples: int = 100
    min_p2p: float = 0.1
    max_p2p: float = 0.9
    min_cfg: float = 7.5
    max_cfg: float = 15.0
    clip: str | None = None
    clip_threshold: float = 0.2
    clip_dir_threshold: float = 0.2
    clip_img_threshold: float = 0.7
    keep: int = 4
    seed: int = 0
    steps: int = 100
    sampler: str = "euler-a"
    model: str | None = None
    height: int | None = None
    width: int | None = None


def read_captions(path) -> tuple[list[dict], str]:
    """CAPTIONS.jsonl -> (items, sha256 of the file); every problem names its line."""
    path = Path(path)
    if not path.is_file():
        raise MinipError(f"captions file '{path}' not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MinipError(f"{path}: not UTF-8 text") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise MinipError(f"{path} is empty: expected one JSON object per line with "
                         "\"caption\", \"edit\" and \"output\"")
    items = []
    for n, line in enumerate(lines, 1):
        where = f"{path}: line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MinipError(f"{where}: not JSON ({e.msg}); expected "
                             '{"caption": …, "edit": …, "output": …}') from None
        if not isinstance(obj, dict):
            raise MinipError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in FIELDS:
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise MinipError(f"{where}: missing or empty {key!r} (a non-empty string)")
        items.append(obj)
    return items, hashlib.sha256(raw).hexdigest()


def partition(n: int, k: int, parts: int) -> range:
    """Item indices of the k-th of `parts` contiguous chunks (np.array_split's sizes)."""
    q, r = divmod(n, parts)
    start = k * q + min(k, r)
    return range(start, start + q + (k < r))


def parse_partition(text: str | None, env=os.environ) -> tuple[int, int]:
    """partition K/N, else torchrun's RANK/WORLD_SIZE, else 0/1."""
    if text is None:
        if "RANK" in env or "WORLD_SIZE" in env:
            try:
                k, parts = int(env["RANK"]), int(env["WORLD_SIZE"])
            except (KeyError, ValueError):
                raise MinipError("RANK and WORLD_SIZE must both be integers (torchrun sets "
                                 "them)") from None
        else:
            return 0, 1
    else:
        try:
            k, parts = (int(x) for x in text.split("/"))
        except ValueError:
            raise ParameterError("partition", f"{text!r}: expected K/N, e.g. 0/4") from None
    if parts < 1 or not 0 <= k < parts:
        raise MinipError(f"partition {k}/{parts}: need 0 ≤ K < N")
    return k, parts


def sample_params(s: Settings, item: int, j: int) -> tuple[int, float, float]:
    """(seed, p2p threshold, guidance) of try j of item `item`: from (--seed, item, j) only."""
    ss = np.random.SeedSequence(entropy=s.seed, spawn_key=(item, j))
    seed = int(ss.generate_state(1, np.uint32)[0])
    u = np.random.default_rng(ss).random(2)
    return (seed, s.min_p2p + float(u[0]) * (s.max_p2p - s.min_p2p),
            s.min_cfg + float(u[1]) * (s.max_cfg - s.min_cfg))


def item_dir(out: Path, i: int) -> Path:
    return Path(out) / f"{i:07d}"


def is_done(out: Path, i: int) -> bool:
    return (item_dir(out, i) / DONE).is_file()


def check_dir(out: Path, digest: str, settings: Settings, n_items: int) -> None:
    """Refuse a DIR made from other captions or with other settings (before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ParameterError("out", f"'{out}' is a file; give a folder")
    if not out.exists():
        if not out.parent.is_dir():
            raise ParameterError("out", f"'{out}': the folder holding it does not exist; create it "
                                        "first")
        return
    records = sorted(out.glob("run-*.json"))
    if not records and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise MinipError(f"'{out}' exists and is not a pairs folder (no run-*.json); "
                         "give a new or empty output folder")
    want = asdict(settings)
    for rec in records:
        try:
            got = json.loads(rec.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            raise MinipError(f"{rec}: unreadable run record; remove it or use another folder") \
                from None
        if got.get("captions_sha256") != digest or got.get("items") != n_items:
            raise MinipError(f"'{out}' was made from other captions ({rec.name}); "
                             "give another output folder")
        diff = [k for k in want if got.get("settings", {}).get(k) != want[k]]
        if diff:
            k = diff[0]
            raise MinipError(f"'{out}' was made with other settings ({k}: "
                             f"{got.get('settings', {}).get(k)!r}, now {want[k]!r}); use the "
                             "same options or another output folder")


def write_record(out: Path, k: int, parts: int, digest: str, settings: Settings, n: int):
    """This partition's own record of what it makes (never written by another partition)."""
    rec = dict(captions_sha256=digest, items=n, partition=f"{k}/{parts}",
               settings=asdict(settings))
    path = Path(out) / f"run-{k:03d}-of-{parts:03d}.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(rec, indent=1) + "\n"))


def clean_item(out: Path, i: int) -> Path:
    """An item that is not done: empty its folder (files of a killed run) and return it."""
    d = item_dir(out, i)
    d.mkdir(exist_ok=True)
    for p in d.iterdir():
        if p.is_file():
            p.unlink()
    return d


def select(results: list[dict], s: Settings, filtering: bool) -> list[dict]:
    """The kept tries: without CLIP the first `keep`; with it those passing every threshold,
    the best `keep` by directional similarity (ties: the earlier try)."""
    if not filtering:
        return results[:s.keep]
    ok = [r for r in results
          if r["clip_sim_image"] >= s.clip_img_threshold and r["clip_sim_dir"] >= s.clip_dir_threshold
          and r["clip_sim_0"] >= s.clip_threshold and r["clip_sim_1"] >= s.clip_threshold]
    return sorted(ok, key=lambda r: -r["clip_sim_dir"])[:s.keep]


def write_item(d: Path, prompt: dict, kept: list[dict], images: dict) -> None:
    """prompt.json, the kept images, and metadata.jsonl last (the item's done mark)."""
    atomic_write(d / "prompt.json", lambda tmp: Path(tmp).write_text(json.dumps(prompt) + "\n"))
    for r in kept:
        for side in (0, 1):
            im = images[r["seed"]][side]
            atomic_write(d / f"{r['seed']}_{side}.jpg", lambda tmp: im.save(tmp, "JPEG",
                                                                           quality=100))
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write(d / DONE, lambda tmp: Path(tmp).write_text(text))


def check(out: Path, items: list[dict]) -> dict[str, list[int]]:
    """{"done", "missing", "broken"}: item indices. Broken: a done mark whose records or files do
    not hold (unreadable metadata, a missing or unreadable image, a prompt.json of another line)."""
    from PIL import Image
    report = {"done": [], "missing": [], "broken": []}
    for i, prompt in enumerate(items):
        d = item_dir(out, i)
        if not (d / DONE).is_file():
            report["missing"].append(i)
            continue
        try:
            if json.loads((d / "prompt.json").read_text()) != prompt:
                raise ValueError("prompt")
            for line in (d / DONE).read_text().splitlines():
                seed = json.loads(line)["seed"]
                for side in (0, 1):
                    with Image.open(d / f"{seed}_{side}.jpg") as im:
                        im.load()
        except (OSError, ValueError, KeyError, TypeError):
            report["broken"].append(i)
            continue
        report["done"].append(i)
    return report


class SelfCopy(Controller):
    """The InstructPix2Pix data recipe's Prompt-to-Prompt variant: no cross-attention edit; at
    every self-attention layer (all resolutions) the maps of images 1 … B−1 are those of image 0,
    in every guidance half (∅ and c), while the step i satisfies  threshold > i / (N − 1)
    (the official `prompt2prompt_threshold > i / (len(sigmas) − 2)`, len(sigmas) = N + 1).
    The official code copies the logits QKᵀ/√d before the softmax: the same maps after it.
    Batched tries (`group` = 2): images 2q, 2q+1 are try q's pair, each with its own threshold
    (`threshold` a sequence); image 2q+1 copies image 2q."""

    def __init__(self, threshold, steps: int, group: int | None = None):
        if steps < 2:
            raise MinipError("the self-attention copy schedule needs at least 2 steps")
        self.thresholds = [float(x) for x in np.atleast_1d(threshold)]
        self.threshold, self.steps, self.group = self.thresholds[0], steps, group

    def active(self, step: int, q: int = 0) -> bool:
        return self.thresholds[q] > step / (self.steps - 1)

    def wants(self, site: Site) -> bool:
        return (site.kind == "self" and site.step is not None
                and any(self.active(site.step, q) for q in range(len(self.thresholds))))

    def probs(self, M, site: Site):
        batch = site.batch_of(M.shape[0])
        g = self.group or batch.images
        src = [batch.row(b - b % g, c) if self.active(site.step, b // g) else r
               for r, (b, c) in enumerate(batch.rows)]                    # image 0 of its group
        return M[src]


class GroupSampler:
    """Batched tries: one sampler per group of `group` images (each with its own seed's
    generator, so Euler ancestral's fresh noise stays shared within a pair only), stepped on its
    own rows; timesteps and input scaling are the same for all."""

    def __init__(self, samplers: list, group: int):
        self.samplers, self.group, self.name = samplers, group, samplers[0].name

    def timesteps(self, steps: int):
        return self.samplers[0].timesteps(steps)

    def init_sigma(self, steps: int) -> float:
        return self.samplers[0].init_sigma(steps)

    def scale_input(self, z, t, steps: int):
        return self.samplers[0].scale_input(z, t, steps)

    def step(self, eps, t, z, steps: int):
        import torch
        g = self.group
        return torch.cat([s.step(eps[q * g:(q + 1) * g], t, z[q * g:(q + 1) * g], steps)
                          for q, s in enumerate(self.samplers)])
