"""The one trainer loop every learner shares (textual inversion, Visii, the toy InstructPix2Pix).

A learner hands over its trainable tensors θ and a step function; the loop owns the rest:

    g ← torch.Generator seeded by plan.seed          (the learner draws every random number from g)
    for k = start … steps−1:
        lr_k = plan.lr · schedule(k)
        L = step(k, g)                                (a scalar; or (L, info) with floats to show)
        ∇θ L;  clip each gradient value to ±plan.clip_value (if set)
        θ ← AdamW(θ, ∇θ L; lr_k, β = (0.9, 0.999), ε = 1e-8, weight decay λ)
        after(k)                                      (the learner restores what must not move)
        every plan.save_every steps, and at the end: checkpoint

A checkpoint is two files beside the learner's output, both written atomically:

    CKPT.safetensors   param.NAME, adam.NAME.{exp_avg, exp_avg_sq, step}, state.NAME (the
                       learner's extra tensors, e.g. the best rows so far), rng.generator,
                       rng.torch; metadata {"step": k}
    CKPT.json          {"step": k, "settings": {...}} -- the settings that decide the result

Nothing is pickled. A run started again with the same settings continues from the checkpoint,
and because every random number comes from g (saved with it) the continued run ends exactly as
an uninterrupted one. Other settings are refused rather than mixed.

Ctrl-C and SIGTERM (which the CLI raises as a KeyboardInterrupt) are blocked while the tensors
are updated (the optimizer step and `after`), so they arrive only between whole steps or during a
forward/backward pass; the loop then checkpoints the last whole step and re-raises. A kill -9
loses at most the steps since the last checkpoint, and those are recomputed identically.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_write_all
from ..errors import MinipError, ParameterError

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Plan:
    """How to optimise: steps, AdamW's settings, the learning-rate schedule, checkpoints."""
    steps: int
    lr: float
    seed: int = 0
    weight_decay: float = 1e-2                  # AdamW's λ (diffusers' and Visii's default)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant"                  # constant | linear (to 0) | cosine (to 0)
    warmup: int = 0                             # steps of linear warm-up from 0
    clip_value: float | None = None             # clamp each gradient value to ±clip_value
    save_every: int = 100                       # checkpoint every N steps (and at the end)
    progress: bool = True
    desc: str = "training"

    def check(self) -> None:
        if self.steps < 1:
            raise ParameterError("steps", f"must be ≥ 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ParameterError("lr", f"must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ParameterError("schedule", f"must be one of {', '.join(SCHEDULES)}, "
                                             f"got {self.schedule!r}")
        if self.save_every < 1:
            raise ParameterError("save_every", f"must be ≥ 1, got {self.save_every}")
        if self.clip_value is not None and not self.clip_value > 0:
            raise ParameterError("clip_value", f"must be > 0, got {self.clip_value}")

    def factor(self, k: int) -> float:
        """lr_k / lr at step k (0-based)."""
        if k < self.warmup:
            return (k + 1) / (self.warmup + 1)
        if self.schedule == "constant":
            return 1.0
        frac = (k - self.warmup) / max(1, self.steps - self.warmup)
        return 1.0 - frac if self.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))


@dataclass
class Outcome:
    """What a run returns: the steps done, and the losses (and infos) of the steps this call ran."""
    step: int
    losses: list[float] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)


def checkpoint_for(out: Path) -> Path:
    """The checkpoint beside a learner's output file: OUT.ckpt.safetensors (+ OUT.ckpt.json)."""
    out = Path(out)
    stem = out.name[:-len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + ".ckpt.safetensors")


def _files(ckpt: Path) -> tuple[Path, Path]:
    """CKPT.safetensors -> (CKPT.safetensors, CKPT.json)."""
    return Path(ckpt), Path(ckpt).with_suffix(".json")


@contextlib.contextmanager
def _signals_held():
    """SIGINT/SIGTERM wait until the block ends (not torn in the middle of an update)."""
    held = hasattr(signal, "pthread_sigmask")
    if held:
        try:
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        except (ValueError, OSError):
            held = False
    try:
        yield
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _save(ckpt: Path, step: int, settings: dict, params: dict, opt: torch.optim.Optimizer,
          state: dict, g: torch.Generator) -> None:
    from safetensors.torch import save_file
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for n, p in params.items():
        for key, v in opt.state.get(p, {}).items():
            v = v if torch.is_tensor(v) else torch.tensor(float(v))
            tensors[f"adam.{n}.{key}"] = v.detach().cpu().contiguous()
    tensors |= {f"state.{n}": t.detach().cpu().contiguous() for n, t in state.items()}
    tensors["rng.generator"] = g.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    st, js = _files(ckpt)
    record = json.dumps({"step": step, "settings": settings}, indent=1, sort_keys=True) + "\n"
    with _signals_held():
        atomic_write_all([
            (st, lambda tmp: save_file(tensors, tmp, metadata={"step": str(step)})),
            (js, lambda tmp: Path(tmp).write_text(record))])


def _load(ckpt: Path, settings: dict, params: dict, opt: torch.optim.Optimizer,
          state: dict, g: torch.Generator) -> int:
    """Put the checkpoint's tensors in place; returns its step (0 when there is none)."""
    from safetensors import safe_open
    st, js = _files(ckpt)
    if not st.exists() or not js.exists():
        return 0
    try:
        record = json.loads(js.read_text())
        with safe_open(str(st), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        step = int(record["step"])
        if int(meta.get("step", -1)) != step:
            raise ValueError("its two files are of different steps")
    except Exception as e:                    # json, safetensors and KeyError alike: one line
        first = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise MinipError(f"checkpoint '{st}' is unreadable ({first}); delete {st.name} and "
                         f"{js.name} to start afresh") from None
    if record.get("settings") != json.loads(json.dumps(settings)):
        theirs, ours = record.get("settings") or {}, json.loads(json.dumps(settings))
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise MinipError(f"checkpoint '{st}' is of a run with other settings "
                         f"({', '.join(differ[:4])}); delete it and {js.name}, or write "
                         "elsewhere")
    expect = {f"param.{n}" for n in params} | {f"state.{n}" for n in state}
    missing = sorted(expect - set(tensors))
    if missing:
        raise MinipError(f"checkpoint '{st}' lacks {missing[0]}; delete it to start afresh")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
        for n, t in state.items():
            t.copy_(tensors[f"state.{n}"])
    adam = {}
    for i, (n, p) in enumerate(params.items()):
        keys = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                if k.startswith(f"adam.{n}.") and k.count(".") == n.count(".") + 2}
        if keys:
            adam[i] = keys
    sd = opt.state_dict()
    opt.load_state_dict({"state": adam, "param_groups": sd["param_groups"]})
    g.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return step


def train(params: dict[str, torch.Tensor], step: Callable, plan: Plan, ckpt: Path | None = None,
          settings: dict | None = None, after: Callable[[int], None] | None = None,
          state: dict[str, torch.Tensor] | None = None) -> Outcome:
    """Optimise `params` ({name: leaf tensor}, updated in place) by `step(k, g) -> loss` or
    `(loss, {name: float})`. `after(k)` runs after each update (inside no_grad). `state`: the
    learner's extra tensors, saved and restored in place with each checkpoint. `ckpt` (a
    .safetensors path, its .json beside it) makes the run resumable; `settings` (JSON-able) must
    match the checkpoint's."""
    from tqdm.auto import tqdm
    plan.check()
    state = state or {}
    settings = {k: v for k, v in asdict(plan).items() if k not in ("progress", "save_every",
                                                                   "desc")} | (settings or {})
    for n, p in params.items():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=plan.lr, betas=plan.betas, eps=plan.eps,
                            weight_decay=plan.weight_decay)
    g = torch.Generator().manual_seed(plan.seed)
    torch.manual_seed(plan.seed)              # torch's own RNG too (dropout), saved with g
    start = _load(ckpt, settings, params, opt, state, g) if ckpt else 0
    out = Outcome(step=start)
    bar = tqdm(total=plan.steps, initial=start, disable=not plan.progress, desc=plan.desc)
    try:
        for k in range(start, plan.steps):
            for group in opt.param_groups:
                group["lr"] = plan.lr * plan.factor(k)
            opt.zero_grad(set_to_none=True)
            result = step(k, g)
            loss, info = result if isinstance(result, tuple) else (result, {})
            if not torch.isfinite(loss):
                raise MinipError(f"the loss became {loss.item()} at step {k}; try a smaller "
                                 "learning rate")
            loss.backward()
            with _signals_held(), torch.no_grad():
                if plan.clip_value is not None:
                    for p in params.values():
                        if p.grad is not None:
                            p.grad.clamp_(-plan.clip_value, plan.clip_value)
                opt.step()
                if after is not None:
                    after(k)
                out.step = k + 1
            out.losses.append(loss.item())
            out.infos.append(info)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", **{n: f"{v:.4f}" for n, v in info.items()})
            if ckpt and (out.step % plan.save_every == 0 or out.step == plan.steps):
                _save(ckpt, out.step, settings, params, opt, state, g)
    except KeyboardInterrupt:                 # Ctrl-C, or SIGTERM via the CLI: keep what is done
        if ckpt and out.step > start:
            _save(ckpt, out.step, settings, params, opt, state, g)
        raise
    finally:
        bar.close()
    for p in params.values():
        p.requires_grad_(False)
    return out
