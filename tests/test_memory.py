"""The memory pre-flight (minip2p/memory.py): its estimate against the peak RSS measured in a
fresh process, on the toy model and a random SD-1.x-structured one (within ±35 %); and the two
requests that used to fail -- `--steps 1000` (a traceback in DDIM) and 65536² px
(killed by the kernel) -- refused in one line before any work."""
import resource
import subprocess
import sys

import pytest

from helpers import one_line
from minip2p import memory
from minip2p.cli import main
from minip2p.samplers.ddim import DDIM
from minip2p.load import load_model


def peak_rss(argv) -> int:
    """Peak RSS in bytes of `python -m minip2p ARGV` (a fresh process: RUSAGE_CHILDREN is the
    maximum over this test process's children, so each run goes through its own helper)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "minip2p", *argv],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1]) * 1024                       # Linux: ru_maxrss in KiB


CASES = [  # (model: None = toy, "sd" = the random checkpoint), command, size, explicit
    (None, ["generate", "a red circle"], 64, False),
    (None, ["edit", "a red circle", "a blue circle"], 160, True),
    ("sd", ["generate", "a red circle"], 256, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("which,command,size,explicit", CASES)
def test_estimate_matches_measured_peak_rss(tmp_path, sd_ckpt, which, command, size, explicit):
    folder = sd_ckpt[1] if which == "sd" else None
    model = load_model(folder)
    images = len(command) - 1
    want = memory.estimate(model, images, size, size, explicit,
                           controlled=16 ** 2 if command[0] == "edit" else 0)
    out = ["--out-dir", str(tmp_path / "e")] if command[0] == "edit" else \
        ["--out", str(tmp_path / "a.png")]
    argv = [*command, "--steps", "1", "--quiet", "--height", str(size), "--width", str(size),
            *out, *(["--explicit"] if explicit else []),
            *(["--model", str(folder)] if folder else [])]
    got = peak_rss(argv)
    print(f"{which or 'toy'} {command[0]} {size}² explicit={explicit}: estimate "
          f"{want / 2 ** 20:.0f} MiB, measured {got / 2 ** 20:.0f} MiB ({want / got - 1:+.0%})")
    assert abs(want / got - 1) <= 0.35


def test_largest_step_count_comes_from_the_scheduler():
    sched = DDIM()
    assert sched.max_steps == 999                                   # 1000 training steps, offset 1
    ts = sched.timesteps(999)
    assert max(ts) == 999 and len(set(ts)) == 999
    import torch
    z = torch.zeros(1, 4, 2, 2)
    for t in ts:                                                    # every ᾱ_t exists
        z = sched.step(torch.zeros_like(z), t, z, 999)


def test_steps_1000_is_one_line(capsys, tmp_path):
    err = one_line(capsys, ["generate", "a red circle", "--steps", "1000", "--quiet",
                            "--out", str(tmp_path / "a.png")])
    assert "steps must be ≤ 999" in err and list(tmp_path.iterdir()) == []


def test_65536_pixels_is_refused_before_any_work(capsys, tmp_path):
    err = one_line(capsys, ["generate", "a red circle", "--height", "65536", "--width", "65536",
                            "--quiet", "--out", str(tmp_path / "a.png")])
    assert "needs about" in err and "TiB" in err and "smaller --height/--width" in err
    assert list(tmp_path.iterdir()) == []


def test_explicit_1024_names_the_fast_path(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIP2P_MEMORY_LIMIT", str(8 * 2 ** 30))
    err = one_line(capsys, ["edit", "a red circle", "a blue circle", "--explicit", "--height",
                            "1024", "--width", "1024", "--quiet", "--out-dir",
                            str(tmp_path / "e")])
    assert "drop --explicit" in err and "fewer prompts" in err and "8 GiB allowed" in err
    assert not (tmp_path / "e").exists()


def test_help_states_the_limits(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "999" in text and "downscale factor" in text and "available memory" in text
