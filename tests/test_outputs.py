"""Outputs that cannot be written: a full disk (a file-size limit, RLIMIT_FSIZE, and a
tiny tmpfs where `mount` works), a read-only folder, a folder under a file. Each ends in one line
`minip2p: cannot write …`, exit status 2, with no partial file and no temporary file beside it --
for an edit's set of images, none of them (all are written to temporary files first)."""
import contextlib
import functools
import os
import resource
import subprocess
import uuid
from pathlib import Path

import pytest
from PIL import Image

import helpers
from minip2p.cli import main

SMALL = ["--steps", "1", "--height", "32", "--width", "32", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread


@contextlib.contextmanager
def file_size_limit(nbytes):
    """No file may grow past `nbytes` (as on a full disk): writes fail with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


one_line = functools.partial(helpers.one_line, needle="cannot write")   # a refusal to write


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "photo.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def test_image_past_a_file_size_limit(capsys, tmp_path):
    with file_size_limit(512):
        line = one_line(capsys, ["generate", "a red circle", *SMALL, "--out",
                                 str(tmp_path / "a.png")])
    assert "File too large" in line and list(tmp_path.iterdir()) == []


def test_inversion_file_past_a_file_size_limit(capsys, tmp_path, photo):
    with file_size_limit(4096):                                 # safetensors' own error type
        one_line(capsys, ["invert", str(photo), "a red circle", "--method", "ddim", *SMALL,
                          "--out", str(tmp_path / "inv.safetensors")])
    assert list(tmp_path.iterdir()) == []


def test_edit_writes_all_of_its_images_or_none(capsys, tmp_path):
    argv = ["edit", "a red circle", "a blue circle", *SMALL]
    assert main([*argv, "--out-dir", str(tmp_path / "ok")]) == 0
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "ok").iterdir()}
    capsys.readouterr()
    assert sizes["strip.png"] > max(sizes["0.png"], sizes["1.png"])
    with file_size_limit(max(sizes["0.png"], sizes["1.png"]) + 64):   # 0.png, 1.png fit; strip not
        one_line(capsys, [*argv, "--out-dir", str(tmp_path / "full")])
    assert not (tmp_path / "full").exists()                    # nor the folder it made
    (tmp_path / "existing").mkdir()
    with file_size_limit(max(sizes["0.png"], sizes["1.png"]) + 64):
        one_line(capsys, [*argv, "--out-dir", str(tmp_path / "existing")])
    assert list((tmp_path / "existing").iterdir()) == []
    before = {p.name: p.read_bytes() for p in (tmp_path / "ok").iterdir()}
    with file_size_limit(max(sizes["0.png"], sizes["1.png"]) + 64):   # a rerun that fails
        one_line(capsys, [*argv[:2], "a green circle", *SMALL, "--out-dir", str(tmp_path / "ok")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "ok").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "ok"]   # no temporary


def test_an_output_folder_is_replaced_as_a_whole(capsys, tmp_path, monkeypatch):
    """A rerun's files replace the previous run's (maps-N.png gone); through a link, the folder
    it points to; the current folder, a user's file, another command's output: refused."""
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    edit = ["edit", "a red circle", "a blue circle", *SMALL, "--out-dir"]
    assert main([*edit, str(link), "--maps"]) == 0 and (real / "maps-1.png").exists()
    assert main([*edit, str(link)]) == 0 and link.is_symlink()
    assert sorted(p.name for p in real.iterdir()) == [".minip2p-run", "0.png", "1.png", "strip.png"]
    capsys.readouterr()
    guide = ["guide", "a red circle", "--move", "circle=0.7,0.5", *SMALL, "--out-dir", str(real)]
    assert "another command (edit)" in helpers.one_line(capsys, guide, needle="empty or new")
    (real / "notes.txt").write_text("mine")
    assert "'notes.txt'" in helpers.one_line(capsys, [*edit, str(real)], needle="holds other")
    monkeypatch.chdir(tmp_path / "real")
    helpers.one_line(capsys, [*edit, "."], needle="holds the current folder")
    assert (real / "notes.txt").read_text() == "mine" and len(list(real.iterdir())) == 5


def test_a_full_tmpfs(capsys, tmp_path):
    """A real full disk, where this machine lets us mount a 64 KiB tmpfs (root, no sandbox)."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mount is not allowed here; the file-size-limit tests stand in for it")
    try:
        (mnt / "fill").write_bytes(b"\0" * 60 * 1024)
        line = one_line(capsys, ["edit", "a red circle", "a blue circle", *SMALL, "--height",
                                 "128", "--width", "128", "--out-dir", str(mnt / "e")])
        assert "No space left on device" in line
        assert sorted(p.name for p in mnt.iterdir()) == ["fill"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; "
                                                "test_folder_under_a_file stands in")
def test_read_only_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line(capsys, ["generate", "a red circle", *SMALL, "--out", str(ro / "a.png")],
                 needle="not writable")
        one_line(capsys, ["edit", "a red", "a blue", *SMALL, "--out-dir", str(ro / "e")],
                 needle="")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_folder_under_a_file(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    one_line(capsys, ["generate", "a red circle", *SMALL, "--out",
                      str(tmp_path / "afile" / "a.png")], needle="")
    one_line(capsys, ["edit", "a red", "a blue", *SMALL, "--out-dir",
                      str(tmp_path / "afile" / "e")], needle="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("fail", ["write", "interrupt", "swap"])
def test_write_folder_keeps_the_old_folder_on_any_failure(tmp_path, monkeypatch, fail):
    """atomic.write_folder: a failed write, Ctrl-C in a write, or the rename that puts the new
    folder in place failing -> the previous output as it was, and nothing else left."""
    from minip2p import atomic
    from minip2p.errors import MinipError
    out = tmp_path / "out"
    atomic.write_folder(out, {"0.png": lambda p: Path(p).write_text("old")}, "edit")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def write(path):
        Path(path).write_text("new")
        if fail == "write":
            raise OSError(28, "No space left on device")
        if fail == "interrupt":
            raise KeyboardInterrupt
    replace, calls = os.replace, []

    def replace_failing_second(a, b):
        calls.append(b)
        if len(calls) == 3:                           # new -> out, after out -> old
            raise OSError(16, "Device or resource busy")
        replace(a, b)
    monkeypatch.setattr(os, "replace", replace_failing_second)
    with pytest.raises(KeyboardInterrupt if fail == "interrupt" else MinipError):
        atomic.write_folder(out, {"0.png": write, "1.png": write}, "edit")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
