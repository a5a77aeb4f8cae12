"""Every input at its edges: property-based tests of the whole CLI.

For each command, hypothesis draws a command line from strategies for every option (numbers at and
beyond each boundary, NaN and inf, empty, huge and unicode strings, words present in and absent
from the prompts, paths that do not exist, are files instead of folders, or lie under a file),
runs the real CLI in-process (`minip2p.cli.main(argv)`) on the toy model at tiny sizes and 1-2
steps, and checks the promise of the CLI:

    success  exit status 0 and exactly the promised files added to the output folder;
    failure  exit status 2 and exactly one line `minip2p: …` on stderr (warnings, each
             `minip2p: warning: …`, may precede it) and nothing added anywhere --
             no output, no temporary file;
    never    a traceback (an exception escaping `main` fails the test).

Commands: generate, edit, attention, invert, reconstruct, guide, instruct (always a one-line
failure on the toy model, whose UNet has 4 input channels, not InstructPix2Pix's 8), pairs
(validation, and --samples 1 --steps 2 for success) and explore (argument and bind failures
only: its success path serves forever).

CI runs a fixed budget (MAX_EXAMPLES per command, a deadline per example); set
MINIP2P_HYPOTHESIS_EXAMPLES=2000 for a large run. Failing examples stay in hypothesis' database
(.hypothesis/ in the working folder, git-ignored) and are replayed first on the next run.

Read-only folders: the tests run as root here, where chmod does not stop writes, so an
unwritable output place is simulated by a path under a regular file (`file/sub`), which fails
for root too; tests/test_outputs.py covers a real read-only folder when not root.
"""
import contextlib
import io
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis.errors import InvalidArgument
from PIL import Image, ImageDraw

from cli_strategies import (ATTENTION, EDIT, EXPLORE, GENERATE, GUIDE, INSTRUCT, INVERT, PAIRS,
                            RECONSTRUCT)
from helpers import NOT_ERRORS
from minip2p.cli import main

MAX_EXAMPLES = int(os.environ.get("MINIP2P_HYPOTHESIS_EXAMPLES", "12"))
# deadline: an example takes < 1 s alone, but up to 78 s was seen with the full suite beside it
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=timedelta(seconds=120),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=True)

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Inputs shared by every example (never written to): a photo, a non-image, an empty file,
    a folder, a file to put paths under, and a real inversion file."""
    d = tmp_path_factory.mktemp("assets")
    im = Image.new("RGB", (40, 30), (235, 235, 225))
    ImageDraw.Draw(im).ellipse((10, 5, 30, 25), fill=(200, 30, 30))
    im.save(d / "photo.png")
    Image.new("RGB", (1, 1), "red").save(d / "tiny.png")
    Image.new("RGB", (200, 10), "red").save(d / "thin.png")
    (d / "notes.txt").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "folder").mkdir()
    (d / "afile").write_text("x")
    (d / "src.txt").write_text("a red circle\na red disc on a wall\n")
    (d / "tgt.txt").write_text("a blue circle\na blue disc on a wall\n")
    (d / "blank.txt").write_text("\n  \n")
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "caps.jsonl").write_text('{"caption": "a red circle", "edit": "make it blue", '
                                  '"output": "a blue circle"}\n')
    (d / "caps-bad.jsonl").write_text('{"caption": "a red circle", "edit"\n')
    (d / "caps-list.jsonl").write_text('[1, 2]\n')
    (d / "caps-keys.jsonl").write_text('{"caption": "a red circle"}\n')
    (d / "caps-types.jsonl").write_text('{"caption": 1, "edit": null, "output": []}\n')
    (d / "caps-blank.jsonl").write_text("\n\n")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["invert", str(d / "photo.png"), "a red circle", "--method", "ddim", "--steps",
                   "2", "--height", "32", "--width", "32", "--quiet",
                   "--out", str(d / "inv.safetensors")])
    assert rc == 0
    return d


# ---- the property --------------------------------------------------------------------------

def files(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def last(argv, flag):
    """The value of `flag` (argparse keeps the last one given)."""
    return argv[len(argv) - argv[::-1].index(flag)]


def promised(argv, out: Path) -> str:
    """The file a successful generate/attention/invert/reconstruct must write (relative)."""
    return Path(last(argv, "--out")).relative_to(out).as_posix()


MARKER = ".minip2p-run"            # what edit and guide write beside their images (atomic.py)


def expand(argv, out: Path, assets: Path) -> list:
    """`@out` -> the example's output folder, `@name` -> the assets' file."""
    return [a.replace("@out", str(out)).replace("@", str(assets) + "/")
            if a.startswith("@") else a for a in argv]


def run_main(argv) -> tuple:
    """(exit status, stdout, stderr) of the CLI in-process."""
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = main(argv)                                    # an escaping exception fails the test
    return rc, std.getvalue(), err.getvalue()


def check_cli(argv, assets: Path):
    """Run `argv`, check the promise (module docstring); (exit status, stderr)."""
    with tempfile.TemporaryDirectory(prefix="minip2p-prop-") as tmp:
        out = Path(tmp)
        argv = expand(argv, out, assets)
        before_out, before_assets = files(out), files(assets)
        rc, std, err = run_main(argv)
        with contextlib.suppress(InvalidArgument):         # outside @given: no events
            event(f"exit status {rc}")
        lines = err.splitlines()
        added = files(out) - before_out
        assert files(assets) == before_assets, "an input folder was written to"
        assert not [p for p in added if Path(p).name.startswith(".minip2p-")
                    and Path(p).name != MARKER], "temporary file"
        assert "Traceback" not in err
        if argv[0] == "pairs" and rc in (0, 1):
            assert all(line.startswith(NOT_ERRORS) for line in lines), err
            if "--check" in argv:                    # a report on stdout, nothing written
                assert std.count("\n") == 1 and " items: " in std and added == set(), (std, added)
            else:
                assert rc == 0
                folder = Path(last(argv, "--out-dir"))
                assert list(folder.glob("run-*.json")) and added and all(
                    (out / p).resolve().is_relative_to(folder.resolve()) or out / p == folder
                    for p in added), added
        elif rc == 0:
            assert argv[0] not in ("instruct", "explore"), "succeeded where it cannot"
            assert all(line.startswith(NOT_ERRORS) for line in lines), err
            written = {Path(p).relative_to(out).as_posix()
                       for p in std.strip().removeprefix("wrote ").split(" (")[0].split(", ")}
            folders = {Path(p).parent.as_posix() for p in written}
            marker = {(Path(f) / MARKER).as_posix() for f in folders} \
                if argv[0] in ("edit", "guide") else set()
            assert written and added == written | marker | (folders - {"."}), (added, std)
            if argv[0] in ("edit", "guide"):
                assert {"0.png", "1.png", "strip.png"} <= {Path(p).name for p in written}
            else:
                assert written == {promised(argv, out)}
        else:
            errors = [line for line in lines if not line.startswith(NOT_ERRORS)]
            assert rc == 2, (rc, err)
            assert len(errors) == 1 and errors[0].startswith("minip2p: "), err
            assert errors[0] == lines[-1] and std == "", (err, std)
            assert added == set(), f"left behind: {sorted(added)}"
        return rc, err


@SETTINGS
@given(argv=GENERATE)
def test_generate(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=EDIT)
def test_edit(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=ATTENTION)
def test_attention(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=INVERT)
def test_invert(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=RECONSTRUCT)
def test_reconstruct(assets, argv):
    check_cli(argv, assets)


FEW = settings(SETTINGS, max_examples=max(2, MAX_EXAMPLES // 2))   # the slower commands


@SETTINGS
@given(argv=GUIDE)
def test_guide(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=INSTRUCT)
def test_instruct(assets, argv):
    assert check_cli(argv, assets)[0] == 2


@FEW
@given(argv=PAIRS)
def test_pairs(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=EXPLORE)
def test_explore(assets, argv):
    assert check_cli(argv, assets)[0] == 2
