"""Write files so that each is either complete or absent: never half-written, and a set of files
(an edit's images) all or none."""
from __future__ import annotations

import os
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
