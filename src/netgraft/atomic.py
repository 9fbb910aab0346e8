"""Atomic writes of files and folders: checkpoints, histories, plots, reports, data info,
saved models, feature caches.

A file appears under its final name only once it is complete: it is written to a
temporary file in the same folder, flushed to disk and renamed over the target with
``os.replace``. A folder is filled under a temporary name beside its target and renamed
into place whole (:func:`atomic_folder`). A crash or SIGKILL leaves at most a temporary
file or folder, never a partial one under the final name. This module never reads files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["TMP_SUFFIX", "atomic_folder", "atomic_write", "remove_stale_tmp"]

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


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a new empty folder beside ``path``; when the ``with`` block completes, rename it
    to ``path`` whole. If the block raises, the temporary folder is removed and ``path`` is
    untouched.

    With ``replace=True`` an existing folder at ``path`` is moved aside, the new one renamed
    in, and the old one removed, so ``path`` never holds a mix of both. With
    ``replace=False`` an existing non-empty folder at ``path`` is kept and
    :class:`FileExistsError` is raised (another writer finished first: the caller decides
    whether its folder will do); the temporary folder is removed either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if replace and path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(errno.EEXIST, "folder exists", str(path)) from exc
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder``; return what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for tmp in folder.glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
