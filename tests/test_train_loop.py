"""The shared trainer loop (minip2p/train/loop.py): a run stopped half-way -- by Ctrl-C, by a
crash (a kill -9 loses the steps since the last checkpoint), or by SIGTERM in a real process --
and started again ends with exactly the parameters, optimizer state and RNG of a straight run."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minip2p.errors import MinipError, ParameterError
from minip2p.train.loop import Plan, checkpoint_for, train

ROOT = Path(__file__).resolve().parent.parent


class Problem:
    """A small regression: random batches drawn from the loop's generator, a noisy target, a
    row that `after` restores, an extra state tensor (the best loss so far)."""

    def __init__(self, stop_at=None, crash_at=None):
        self.w = torch.zeros(4, 3)
        self.b = torch.zeros(3)
        self.best = torch.full((), float("inf"))
        self.stop_at, self.crash_at = stop_at, crash_at

    def step(self, k, g):
        if k == self.stop_at:
            raise KeyboardInterrupt
        if k == self.crash_at:
            raise RuntimeError("crash")
        x = torch.randn(8, 4, generator=g)
        y = x @ torch.arange(12.).view(4, 3) + 0.1 * torch.randn(8, 3, generator=g)
        loss = ((x @ self.w + self.b - y) ** 2).mean()
        self.best.copy_(torch.minimum(self.best, loss.detach()))
        return loss, {"best": self.best.item()}

    def after(self, k):
        self.w[0] = 0.0                         # a row that must not move

    def run(self, plan, ckpt):
        return train({"w": self.w, "b": self.b}, self.step, plan, ckpt, {"what": "toy"},
                     self.after, {"best": self.best})


PLAN = Plan(steps=12, lr=0.05, seed=3, save_every=4, progress=False, clip_value=5.0,
            schedule="cosine", warmup=2)


def adam_of(ckpt):
    with safe_open(str(ckpt), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("rng.torch")}


def test_resume_after_interrupt_equals_a_straight_run(tmp_path):
    straight = Problem()
    done = straight.run(PLAN, tmp_path / "a.ckpt.safetensors")
    assert done.step == 12 and len(done.losses) == 12 and done.losses[-1] < done.losses[0]
    assert (straight.w[0] == 0).all()

    ckpt = tmp_path / "b.ckpt.safetensors"
    half = Problem(stop_at=6)
    with pytest.raises(KeyboardInterrupt):
        half.run(PLAN, ckpt)
    assert json.loads(ckpt.with_suffix(".json").read_text())["step"] == 6   # saved on Ctrl-C
    again = Problem()
    rest = again.run(PLAN, ckpt)
    assert len(rest.losses) == 6 and rest.losses == done.losses[6:]
    assert torch.equal(again.w, straight.w) and torch.equal(again.b, straight.b)
    assert torch.equal(again.best, straight.best)
    a, b = adam_of(tmp_path / "a.ckpt.safetensors"), adam_of(ckpt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_crash_redoes_the_lost_steps(tmp_path):
    straight = Problem()
    straight.run(PLAN, tmp_path / "a.ckpt.safetensors")
    ckpt = tmp_path / "b.ckpt.safetensors"
    with pytest.raises(RuntimeError):
        Problem(crash_at=7).run(PLAN, ckpt)                    # as a kill: no save at step 7
    assert json.loads(ckpt.with_suffix(".json").read_text())["step"] == 4
    again = Problem()
    assert len(again.run(PLAN, ckpt).losses) == 8
    assert torch.equal(again.w, straight.w) and torch.equal(again.b, straight.b)
    assert again.run(PLAN, ckpt).losses == []                  # done: nothing more to do


def test_other_settings_are_refused_not_mixed(tmp_path):
    ckpt = tmp_path / "c.ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        Problem(stop_at=5).run(PLAN, ckpt)
    from dataclasses import replace
    with pytest.raises(MinipError, match="other settings.*lr"):
        Problem().run(replace(PLAN, lr=0.1), ckpt)
    Problem().run(replace(PLAN, save_every=1, progress=False), ckpt)   # not a setting
    ckpt.with_suffix(".json").write_text("{")
    with pytest.raises(MinipError, match="unreadable"):
        Problem().run(PLAN, ckpt)


def test_bad_plans_are_one_parameter_error():
    from dataclasses import replace
    for bad, name in ((dict(steps=0), "steps"), (dict(lr=-1.0), "lr"),
                      (dict(schedule="step"), "schedule"), (dict(clip_value=0.0), "clip_value")):
        with pytest.raises(ParameterError) as e:
            replace(PLAN, **bad).check()
        assert e.value.name == name


def test_checkpoint_for():
    assert checkpoint_for(Path("x/learned_embeds.safetensors")).name == \
        "learned_embeds.ckpt.safetensors"


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_train_loop import PLAN, Problem
    from minip2p.cli import Terminated, _terminate
    import signal
    signal.signal(signal.SIGTERM, _terminate)
    p = Problem()
    slow = p.step
    def step(k, g):
        if k == 5:
            print("ready", flush=True)
            time.sleep(30)
        return slow(k, g)
    p.step = step
    try:
        p.run(PLAN, {ckpt!r})
    except Terminated:
        sys.exit(143)
""")


@pytest.mark.slow
def test_sigterm_in_a_process_checkpoints_the_whole_steps(tmp_path):
    ckpt = tmp_path / "d.ckpt.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(tests=str(ROOT / "tests"),
                                                                ckpt=str(ckpt))],
                            stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert json.loads(ckpt.with_suffix(".json").read_text())["step"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".minip2p-")]
    straight, again = Problem(), Problem()
    straight.run(PLAN, None)
    again.run(PLAN, ckpt)
    assert torch.equal(again.w, straight.w)
