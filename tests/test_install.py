"""A regular install works: the wheel carries the toy model and CLIP's tables, the command runs
from any folder, and nothing is written into site-packages.

The wheel is built from a copy of the source (no build/ or egg-info left in the checkout) and
installed into a fresh virtual environment that sees this interpreter's packages through a .pth
file naming its site-packages folders (torch is not installed again; `--system-site-packages`
would give the base Python's, not those of a venv this test runs in):
`pip install --no-deps --no-build-isolation`, no network.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", "build", "dist", "__pycache__", ".pytest_cache", "out", ".hypothesis"}


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


@pytest.mark.slow
def test_wheel_installs_and_runs_from_anywhere(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP
                                                        or n.endswith(".egg-info")
                                                        or n.startswith(".venv")
                                                        or (Path(d) == ROOT / "weights"
                                                            and n not in ("toy", "toy-controlnet",
                                                                          "clip-tokenizer",
                                                                          "README.md"))])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", tmp_path / "dist", src], env=env)
    wheel = next((tmp_path / "dist").glob("minip2p-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], env=env)
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", wheel], env=env)
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    env=env).stdout.strip())
    outer = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site / "outer-packages.pth").write_text("".join(f"{p}\n" for p in outer))
    assert (site / "minip2p" / "weights" / "toy" / "unet" / "config.json").is_file()
    assert (site / "minip2p" / "weights" / "clip-tokenizer" / "vocab.json").is_file()
    assert (site / "minip2p" / "explore" / "page.html").is_file()              # the explorer's page
    before = files_under(site)
    run([py, "-c", "import torch, einops, safetensors"], env=env)      # the outer packages, seen

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([py, "-c", "import minip2p, minip2p.load.checkpoint as c; "
                 "print(minip2p.__file__); print(c.DEFAULT_MODEL)"], env=env, cwd=elsewhere)
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    p = run([venv / "bin" / "minip2p", "edit", "a big red circle on the left",
             "a big blue circle on the left", "--steps", "2", "--quiet", "--out-dir", "edit"],
            env=env, cwd=elsewhere)
    assert sorted(x.name for x in (elsewhere / "edit").iterdir()), p.stdout
    assert files_under(site) == before, sorted(files_under(site) ^ before)[:10]
