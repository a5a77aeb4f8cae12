"""Write a file so that it is either complete or absent: never half-written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import MinipError


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """`write(tmp_name)` fills a temporary file in the target folder, renamed into place after."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent, prefix=".minip2p-")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except OSError as e:
        raise MinipError(f"cannot write '{path}': {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
