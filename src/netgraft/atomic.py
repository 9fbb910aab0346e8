"""Atomic file writes: checkpoints, histories, plots, reports, data info.

A file appears under its final name only once it is complete: it is written to a
temporary file in the same folder, flushed to disk and renamed over the target with
``os.replace``. A crash or SIGKILL leaves at most a ``.tmp`` file, never a partial
file under the final name. This module never reads files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["TMP_SUFFIX", "atomic_write", "remove_stale_tmp"]

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` once it is complete on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder``; return what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for tmp in folder.glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
