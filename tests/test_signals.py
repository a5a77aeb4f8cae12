"""SIGTERM ends a run as Ctrl-C does (cli/__init__.py): the same clean-up, then one line
`minip2p: terminated` and exit status 143 (Ctrl-C: `minip2p: interrupted`, 130). Real processes
are stopped part-way through sampling (once the progress bar shows) and `explore` while it
serves; in-process, a SIGTERM that lands while an edit's folder is being written. Each leaves
nothing in the output place and no temporary file or folder."""
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from minip2p.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--steps", "1", "--height", "32", "--width", "32", "--quiet"]
LONG = ["--steps", "500", "--height", "64", "--width", "64"]      # seconds of sampling

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread


def start(tmp: Path, *args):
    (tmp / "tmp").mkdir(exist_ok=True)                  # the process's own temporary folder
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               TMPDIR=str(tmp / "tmp"))
    # SIGINT as a terminal gives it: a test run started in the background (`cmd &`) hands its
    # children an ignored SIGINT, and Python then keeps ignoring it
    return subprocess.Popen([sys.executable, "-m", "minip2p", *map(str, args)], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(p, stream, needle: bytes, timeout=120) -> bytes:
    """Read `stream` of `p` until `needle` shows (the process is where the test wants it)."""
    got, end = b"", time.time() + timeout
    while needle not in got:
        assert time.time() < end and p.poll() is None, (got, p.stderr.read())
        if select.select([stream], [], [], 0.5)[0]:
            got += os.read(stream.fileno(), 4096)
    return got


def stop(p, sig, before: bytes = b""):
    """Send `sig`; (exit status, the lines on stderr that are not the progress bar's: a bar cut
    short leaves its line open, and the next line goes on from it)."""
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    lines = (before + err).decode().replace("\r", "\n").splitlines()
    return p.returncode, [x[x.index("minip2p:"):] for x in lines if "minip2p:" in x]


def leftovers(root: Path) -> list:
    return [str(p) for p in root.rglob("*") if p.name.startswith((".minip2p-", "minip2p-"))
            and p.name != ".minip2p-run"]                  # an output folder's marker


def test_sigterm_while_generating(tmp_path):
    p = start(tmp_path, "generate", "a red circle", *LONG, "--out", "a.png")
    seen = wait_for(p, p.stderr, b"%|")                 # sampling has begun
    rc, lines = stop(p, signal.SIGTERM, seen)
    assert rc == 143 and lines == ["minip2p: terminated"], (rc, lines)
    assert not (tmp_path / "a.png").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("argv,out", [
    (["attention", "a red circle", "--out", "maps.png"], "maps.png"),
    (["guide", "a red circle", "--move", "circle=0.8,0.5", "--out-dir", "guide"], "guide"),
    (["invert", "PHOTO", "a red circle", "--method", "ddim", "--out", "inv.safetensors"],
     "inv.safetensors"),
    (["reconstruct", "PHOTO", "a red circle", "--method", "ddim", "--out", "rec.png"], "rec.png"),
    (["edit", "a red circle", "a blue circle", "--image", "PHOTO", "--inversion-method", "ddim",
      "--out-dir", "edit"], "edit")], ids=lambda a: a[0] if isinstance(a, list) else None)
def test_sigterm_during_each_command_leaves_nothing(tmp_path, argv, out):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "photo.png")
    argv = [str(tmp_path / "photo.png") if a == "PHOTO" else a for a in argv]
    p = start(tmp_path, *argv, *LONG)
    seen = wait_for(p, p.stderr, b"%|")                 # the command's loop has begun
    rc, lines = stop(p, signal.SIGTERM, seen)
    assert rc == 143 and lines == ["minip2p: terminated"], (argv[0], rc, lines)
    assert not (tmp_path / out).exists() and leftovers(tmp_path) == []


def test_sigterm_while_editing_leaves_the_previous_folder(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["edit", "a red circle", "a blue circle", *SMALL, "--maps",
                 "--out-dir", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    p = start(tmp_path, "edit", "a red circle", "a green circle", *LONG, "--out-dir", out)
    seen = wait_for(p, p.stderr, b"%|")
    rc, lines = stop(p, signal.SIGTERM, seen)
    assert rc == 143 and lines == ["minip2p: terminated"], (rc, lines)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("sig,rc,line", [(signal.SIGTERM, 143, "minip2p: terminated"),
                                         (signal.SIGINT, 130, "minip2p: interrupted")])
def test_explore_stopped_removes_its_folder(tmp_path, sig, rc, line):
    p = start(tmp_path, "explore", "--port", "0")
    wait_for(p, p.stdout, b"minip2p explorer on http://")
    made = list((tmp_path / "tmp").glob("minip2p-explore-*"))
    assert len(made) == 1 and made[0].is_dir()
    got, lines = stop(p, sig)
    assert got == rc and lines == [line], (got, lines)
    assert not made[0].exists() and leftovers(tmp_path) == []


def test_sigterm_while_the_folder_is_written(tmp_path, capsys, monkeypatch):
    """In-process: the signal lands inside the write of the second run's images -> the first
    run's folder as it was, no temporary folder, exit status 143, one line."""
    out = tmp_path / "e"
    assert main(["edit", "a red circle", "a blue circle", *SMALL, "--out-dir", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    save, calls = Image.Image.save, []

    def save_then_terminate(self, *a, **kw):
        calls.append(1)
        save(self, *a, **kw)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)                               # the handler runs here
    monkeypatch.setattr(Image.Image, "save", save_then_terminate)
    assert main(["edit", "a red circle", "a big red circle", *SMALL, "--out-dir", str(out)]) == 143
    assert capsys.readouterr().err == "minip2p: terminated\n"
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert leftovers(tmp_path) == [] and len(calls) == 2
    assert signal.getsignal(signal.SIGTERM) is not None      # main gave the handler back
