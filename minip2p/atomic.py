"""Write files so that each is either complete or absent: never half-written, and a set of files
(an edit's images) all or none; an output folder as one unit (write_folder: the run's files
replace the previous run's, never mixed with them, and never with a user's files)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from .errors import MinipError


def atomic_write_all(files: list[tuple[Path, Callable[[str], None]]]) -> list[Path]:
    """`write(tmp_name)` fills a temporary file beside each target; only when every one is
    complete are they renamed into place. A full disk, a file-size limit or an unwritable folder
    is one MinipError, and no temporary file is left behind."""
    umask = os.umask(0)
    os.umask(umask)
    done: list[tuple[str, Path]] = []
    path = None
    try:
        for path, write in files:
            path = Path(path)
            fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent, prefix=".minip2p-")
            os.close(fd)
            done.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)      # mkstemp makes 0600 files; give the usual mode
        for tmp, path in done:
            os.replace(tmp, path)
    except (OSError, SafetensorError) as e:    # safetensors reports a full disk as its own error
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise MinipError(f"cannot write '{path}': {why}") from None
    finally:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.remove(tmp)
    return [p for _, p in done]


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """One file: `write(tmp_name)` fills a temporary file in the target folder, renamed after."""
    return atomic_write_all([(path, write)])[0]


# ---- a folder written as one unit ------------------------------------------------------------

MARKER = ".minip2p-run"     # in each output folder: {"command": …, "files": […]}, what wrote it


def check_replaceable(folder: Path, command: str) -> None:
    """Refuse a folder that holds anything but an earlier output of `command`: its marker and
    the files the marker lists. An absent or empty folder is fine. (Names alone do not say
    whose a file is: a user's own 0.png is never replaced.)"""
    folder = Path(folder)
    if not folder.is_dir():
        return
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise MinipError(f"cannot read '{folder}': {e.strerror or e}") from None
    ours, mark = set(), {}
    if (folder / MARKER).exists():
        try:
            mark = json.loads((folder / MARKER).read_text())
            ours = {MARKER, *mark["files"]} if mark["command"] == command else set()
        except (OSError, ValueError, KeyError, TypeError):
            mark = {}                           # unreadable: not a marker of ours
    if not ours and isinstance(mark, dict) and isinstance(mark.get("command"), str):
        raise MinipError(f"'{folder}' holds the output of another command "
                         f"({mark['command']}); give an empty or new folder")
    for e in entries:
        if not (e.name in ours and e.is_file(follow_symlinks=False)):
            raise MinipError(f"'{folder}' holds other files (such as '{e.name}'); give an empty "
                             "or new folder")


def write_folder(folder: Path, files: dict[str, Callable[[str], None]],
                 command: str) -> list[Path]:
    """{name: write(path)} as the whole content of `folder`: written into a temporary sibling
    folder, then swapped into place, the earlier output of `command` there replaced (never
    mixed with this run's). A folder holding anything else is refused (check_replaceable).
    On any failure, or an interrupt, the folder is as it was and no temporary folder is left."""
    folder = Path(folder)
    target = folder.resolve() if folder.is_symlink() else folder     # replace what it points to
    check_replaceable(target, command)
    umask = os.umask(0)
    os.umask(umask)
    tmp, name = None, None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".minip2p-", dir=target.parent))
        for name, write in files.items():
            write(str(tmp / name))
            os.chmod(tmp / name, 0o666 & ~umask)
        name = MARKER
        (tmp / MARKER).write_text(json.dumps({"command": command, "files": list(files)}) + "\n")
        os.chmod(tmp, 0o777 & ~umask)                   # mkdtemp makes 0700 folders
        check_replaceable(target, command)              # once more: the run took a while
        _swap(tmp, target)
    except (OSError, SafetensorError) as e:
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise MinipError(f"cannot write '{folder / name if name else folder}': {why}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return [folder / n for n in files]


def _swap(new: Path, target: Path) -> None:
    """`new` takes `target`'s place; the old folder is removed. SIGINT and SIGTERM wait until
    it is done (a signal between the two renames would leave no folder at `target`)."""
    blocked = hasattr(signal, "pthread_sigmask")
    if blocked:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        try:
            os.replace(new, target)                     # absent or empty: one atomic rename
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = Path(tempfile.mkdtemp(prefix=".minip2p-old-", dir=target.parent))
        try:
            os.replace(target, old)                     # onto the empty folder just made
        except BaseException:
            old.rmdir()
            raise
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
