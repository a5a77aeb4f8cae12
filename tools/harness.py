"""What the benchmark tools share: thread setup, timing (best of a few runs; rows interleaved
round by round, so that a noisy machine slows every row alike; a pipeline's phases from its
UNet's calls), best / median, peak memory, the machine's CPU model, and markdown tables.

Used by tools/bench.py, bench_unet.py, bench_decode.py, bench_kernels.py, time_edit.py and
parity.py; eval_guidance.py takes its peak memory from here.
"""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def set_threads(n: int | None) -> int:
    """torch's intra-op threads: `n` if given (0 / None: torch's own choice) -> the count in use."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (getrusage ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: torch.device):
    """Start counting peak memory afresh: CUDA's allocator statistics, or Linux's RSS mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: reset the RSS high-water mark that getrusage reports
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_gib(device: torch.device) -> float:
    """Peak memory, GiB: CUDA's max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def cpu_model() -> str:
    """'AMD EPYC …' / 'Intel(R) Xeon(R) …': the CPU, as the kernel tuner names the machine."""
    from minip2p.fast.autotune import cpu_model as name
    return name()


class Clock:
    """Timestamps of the UNet's calls (forward pre/post hooks), synchronised on CUDA. `run(fn)`
    -> (fn's output, seconds: run and cpu in all, text before the first UNet call, denoise from
    the first to the last, decode after it)."""

    def __init__(self, unet: torch.nn.Module, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.starts, self.ends = [], []
        unet.register_forward_pre_hook(lambda *_: self.mark(self.starts))
        unet.register_forward_hook(lambda *_: self.mark(self.ends))

    def mark(self, where):
        self.sync()
        where.append(time.perf_counter())

    def run(self, fn):
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = fn()
        self.sync()
        t1 = time.perf_counter()
        return out, dict(run=t1 - t0, cpu=time.process_time() - c0, text=self.starts[0] - t0,
                         denoise=self.ends[-1] - self.starts[0], decode=t1 - self.ends[-1])


def best_of(fn: Callable, reps: int) -> float:
    """One warm-up call, then the least wall time of `reps` calls, in seconds."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleave(rows: dict, rounds: int, warmup: bool = True):
    """Run every row once (warm-up; its output is kept) unless `warmup` is off, then `rounds`
    rounds of all rows in turn, so that a noisy machine slows every row alike. -> outputs (the
    warm-up's, else the last round's), wall times, minor page faults, each a dict by row."""
    with torch.no_grad():
        outs = {name: fn() for name, fn in rows.items()} if warmup else {}
        times = {name: [] for name in rows}
        faults = {name: [] for name in rows}
        for _ in range(rounds):
            for name, fn in rows.items():
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                if not warmup:
                    outs[name] = out
    return outs, times, faults


def best_median(times: list[float]) -> tuple[float, float]:
    """(min, median) of a row's times."""
    return min(times), statistics.median(times)


def table(heads: list[str], rows: list[list[str]], align: str):
    """Print a markdown table; `align` has a letter per column: l (---) or r (---:)."""
    print("| " + " | ".join(heads) + " |")
    print("|" + "".join("---:|" if a == "r" else "---|" for a in align))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def report(what: str, outs: dict, times: dict, stat: str = "mean", faults: dict | None = None,
           flops: dict | None = None, rate: float | None = None):
    """A markdown table: per row the mean (or median) and min time, the mean minor page faults
    if given, the row's GFLOP and its time over the floor (FLOPs ÷ `rate`, tools/floor.py) if
    given, and max|Δ| of its output against the first row's (– where the shapes differ)."""
    centre = statistics.mean if stat == "mean" else statistics.median
    first = next(iter(outs.values()))
    heads = [what, f"{stat} s", "min s"] + (["minor page faults"] if faults else [])
    heads += ["GFLOP", "floor s", f"{stat} / floor"] if flops else []
    lines = []
    for name, out in outs.items():
        fmt = ".3f" if min(times[name]) < 1 else ".2f"
        cells = [name, f"{centre(times[name]):{fmt}}", f"{min(times[name]):{fmt}}"]
        cells += [str(sum(faults[name]) // len(faults[name]))] if faults else []
        if flops:
            floor = flops[name] / rate
            cells += [f"{flops[name] / 1e9:,.1f}", f"{floor:{fmt}}",
                      f"{centre(times[name]) / floor:.2f}x"]
        diff = f"{(out - first).abs().max().item():.1e}" if out.shape == first.shape else "–"
        lines.append(cells + [diff])
    table(heads + ["max abs diff vs first row"], lines, "l" + "r" * len(heads))
