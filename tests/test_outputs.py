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
