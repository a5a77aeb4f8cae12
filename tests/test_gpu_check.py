"""tools/gpu_check.sh, the prepared GPU check, runs its whole sequence on the CPU with the tiny
geometry (--smoke): machine line, parity PASS, benchmark rows with the floor, its tables in $OUT.
(On a lent GPU the same script runs with the SD 1.5 shape in fp16.)"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_smoke_writes_its_tables(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--smoke"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "torch" in (tmp_path / "machine.txt").read_text()
    assert "PASS" in (tmp_path / "parity.txt").read_text()
    bench = (tmp_path / "bench.txt").read_text()
    for row in ("minip2p-plain", "minip2p-edit", "diffusers-plain"):
        assert f"| {row} |" in bench
    assert "Floor: best rate measured in this run" in bench
    dpm = (tmp_path / "bench_dpm.txt").read_text()                  # the DPM-Solver++ rows
    assert "dpm++ steps" in dpm and "| minip2p-edit |" in dpm and "(diffusers-plain) |" in dpm
