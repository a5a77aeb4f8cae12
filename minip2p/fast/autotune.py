"""Kernels chosen by measurement on the running machine, never by a constant.

The fast path has a choice at a few places, and which side wins depends on the CPU, the PyTorch
build, the thread count and the shape: the same candidate wins on one CPU and loses on another
(tools/README.md, "Kernels and the tuner"), so no choice is written into the code.

    kind        candidates                   where (fast/kernels.py, pipeline.decode)
    linear      torch | onednn               y = x Wᵀ + b          (MKL sgemm vs oneDNN matmul)
    geglu       torch | onednn               a · GELU(g)           (three passes vs two fused matmuls)
    attention   sdpa  | onednn               softmax(QKᵀ/√d)·V, m ≥ 1024 keys (fused vs query slices)
    conv        torch | packed               convolution (plain weight vs packed once)
    decode      contiguous | channels_last   the VAE decoder's memory layout
    precision   fp32  | bf16                 the model's compute precision (fast/precision.py)

In bf16 the linear, GEGLU and attention candidates are the same kernels in bf16 (oneDNN's bf16
matmul, PyTorch's bf16 SDPA), measured separately: their sites carry the dtype ("…xbf16").

The first time the fast path meets a (kind, shape) on a machine, `Tuner.pick` times every
candidate on a slice of the real input (256-2048 rows, about 0.5 GFLOP; one image·head of
attention), in alternation, best of ≥ `REPS` rounds and ≥ 20 ms, and keeps the fastest. The
decoder's layout cannot be judged on a slice (its cost is in reorders and fresh pages of
full-size tensors), so `Tuner.trial` has the real decodes at a new size run once in each layout
(an edit's two images, or two calls) and keeps the faster: no extra work. Choices are
cached in one JSON file (`$MINIP2P_CACHE_DIR`, else `$XDG_CACHE_HOME/minip2p`, else
`~/.cache/minip2p`, file `kernels.json`) under the key  CPU model | torch version | threads,
so a new machine, a new PyTorch or another `torch.set_num_threads` measures again.

`--no-autotune` (every model-running command) or `MINIP2P_NO_AUTOTUNE=1` switch measuring off
for reproducible runs: then every choice is PyTorch's own kernel (the `DEFAULT` column), with no
file read or written. A model without the fast path installed (`load_model(fast=False)`,
`--explicit`, `fast.uninstall`) never asks. Every candidate computes the same
function; tests/test_autotune.py proves each one equals the explicit path.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

KINDS = {"linear": ("torch", "onednn"), "geglu": ("torch", "onednn"),
         "attention": ("sdpa", "onednn"), "conv": ("torch", "packed"),
         "decode": ("contiguous", "channels_last"),
         "precision": ("fp32", "bf16")}
DEFAULT = {kind: names[0] for kind, names in KINDS.items()}       # PyTorch's own kernels
REPS = 2
ENV_OFF = "MINIP2P_NO_AUTOTUNE"


@functools.cache
def cpu_model() -> str:
    """'AMD EPYC …' / 'Intel(R) Xeon(R) …' from /proc/cpuinfo, else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cache_file() -> Path:
    root = os.environ.get("MINIP2P_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = os.path.join(xdg, "minip2p")
    return Path(root) / "kernels.json"


def machine_key() -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def best_times(run: dict[str, Callable[[], object]], budget: float = 0.02,
               rounds: int = 50) -> dict[str, float]:
    """The best time of each candidate, timed in alternation (A B A B …: a burst of load hits
    both alike) for at least `REPS` rounds and until `budget` seconds were spent, at most
    `rounds`. Small ops get many tries, so one preempted run cannot decide."""
    for fn in run.values():
        fn()                                                      # warm-up: allocations, packing
    best = {name: float("inf") for name in run}
    spent, n = 0.0, 0
    while n < REPS or (spent < budget and n < rounds):
        for name, fn in run.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best[name], spent = min(best[name], dt), spent + dt
        n += 1
    return best


class Tuner:
    """Picks, per (kind, shape), the fastest candidate measured on this machine; remembers it."""

    def __init__(self, enabled: bool = True, path: Path | None = None,
                 fixed: dict[str, str] | None = None):
        for kind, name in (fixed or {}).items():
            if name not in KINDS.get(kind, ()):
                raise ValueError(f"unknown kernel {kind}={name}; choose from {KINDS}")
        self.enabled = enabled and fixed is None
        self.fixed = fixed or {}                                 # kind -> choice, never measured
        self.path = path
        self.table: dict[str, dict] = {}        # machine key -> {site: choice, or trial times}
        self.timings: dict[str, dict[str, float]] = {}           # this process's measurements
        self.measured = 0                                        # how many picks were timed here
        self._loaded = False
        self._memo: dict[tuple, str] = {}                        # (threads, kind, shape) -> choice

    def _load(self):
        self._loaded = True
        try:
            data = json.loads(self.path.read_text())
            self.table = {k: dict(v) for k, v in data.items() if isinstance(v, dict)}
        except (OSError, ValueError, AttributeError):
            self.table = {}                                      # absent or unreadable: measure

    def _save(self):
        """Merge into the file (another process may have added keys) and replace it atomically;
        a cache that cannot be written is not an error -- the choice is still used here."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                on_disk = json.loads(self.path.read_text())
            except (OSError, ValueError):
                on_disk = {}
            for mkey, sites in self.table.items():
                on_disk.setdefault(mkey, {}).update(sites)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def _sites(self) -> dict[str, str]:
        if not self._loaded:
            if self.path is None:
                self.path = cache_file()
            self._load()
        return self.table.setdefault(machine_key(), {})

    def pick(self, kind: str, shape: tuple,
             candidates: Callable[[], dict[str, Callable[[], object]]]) -> str:
        """The candidate to use for `kind` at `shape`. `candidates()` -> {name: run}, `run()` runs
        candidate `name` once on a representative slice; called only when this machine has not
        measured `shape` yet (so a layer's call costs one dict lookup once it has)."""
        if not self.enabled:
            return self.fixed.get(kind, DEFAULT[kind])
        memo = (torch.get_num_threads(), kind, shape)     # every linear layer asks: keep it cheap
        if memo in self._memo:
            return self._memo[memo]
        sites, site = self._sites(), _site(kind, shape)
        if sites.get(site) not in KINDS[kind]:
            with torch.no_grad():
                times = best_times(candidates())
            sites[site] = min(times, key=times.get)
            self.timings[site] = times
            self.measured += 1
            self._save()
        self._memo[memo] = sites[site]
        return sites[site]

    def trial(self, kind: str, shape: tuple) -> tuple[str, bool]:
        """For work too big to time on a slice (the decode: its layout matters only at full size):
        (candidate, True) while some candidate has not yet run the real work at `shape` on this
        machine -- the caller times that work and hands the seconds to `record` -- then
        (choice, False). Trials are cached like choices, so single-image runs also get there."""
        if not self.enabled:
            return self.fixed.get(kind, DEFAULT[kind]), False
        got = self._sites().get(_site(kind, shape))
        if isinstance(got, str) and got in KINDS[kind]:
            return got, False
        tried = got if isinstance(got, dict) else {}
        return next(name for name in KINDS[kind] if name not in tried), True

    def record(self, kind: str, shape: tuple, name: str, seconds: float):
        sites, site = self._sites(), _site(kind, shape)
        tried = sites[site] if isinstance(sites.get(site), dict) else {}
        tried[name] = seconds
        sites[site] = tried
        if len(tried) == len(KINDS[kind]):                       # every candidate ran: decide
            sites[site] = min(tried, key=tried.get)
            self.timings[site] = dict(tried)
            self.measured += 1
        self._save()


def _site(kind: str, shape: tuple) -> str:
    return f"{kind} {'x'.join(str(s) for s in shape)}"


_tuner: Tuner | None = None


def tuner() -> Tuner:
    """This process's tuner: on unless MINIP2P_NO_AUTOTUNE is set (to anything but 0/empty)."""
    global _tuner
    if _tuner is None:
        _tuner = Tuner(enabled=os.environ.get(ENV_OFF, "") in ("", "0"))
    return _tuner


def set_tuner(t: Tuner) -> Tuner:
    """Replace this process's tuner (the CLI's --no-autotune, tests); returns the old one."""
    global _tuner
    old, _tuner = _tuner, t
    return old


def forced(**choices: str) -> Tuner:
    """A tuner that always answers `choices` (other kinds: PyTorch's own) -- for tests and for
    reproducing a choice made on another machine."""
    return Tuner(fixed=choices)
