"""The on-disk shard store of a feature cache: a folder of ``.npy`` shards, a labels file
and a manifest holding every file's SHA-256.

A store is written into a temporary folder and renamed into place whole
(:func:`netgraft.atomic.atomic_folder`), under a file lock (:func:`locked`) so two
processes building the same cache wait for each other. :func:`open_store` checks a store
fully (format, key, rows, every checksum and shape) before it hands out memory-mapped
shards. This module never computes features and never decides what a cache is keyed on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .key import FORMAT

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps a store whole
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SHARD_BYTES",
    "ShardWriter",
    "Store",
    "UnusableStore",
    "locked",
    "open_store",
    "remove_folder",
]

SHARD_BYTES = 256 << 20
_MANIFEST = "manifest.json"
_LABELS = "labels.npy"


class UnusableStore(Exception):
    """A store folder that cannot be read as the cache asked for; the message says why."""


@dataclass
class Store:
    """A checked store: its memory-mapped shards with the first row of each, the labels (or
    None) and the dtype features are returned in."""

    shards: list[np.ndarray]
    starts: list[int]
    labels: torch.Tensor | None
    out_dtype: torch.dtype


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (fcntl), so concurrent builders of one cache
    wait for each other instead of both computing it; where fcntl is missing the atomic
    rename alone keeps the cache whole."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def remove_folder(path: Path) -> None:
    """Remove a folder without a window in which a half-deleted cache sits under its name."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


class ShardWriter:
    """Writes feature batches into ``folder`` as shards of about ``shard_bytes`` each, then
    the labels and the manifest (:meth:`close`)."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.labels: list[torch.Tensor] = []
        self.shape: list[int] = []
        self.dtype = ""
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0

    def add(self, features: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Append a batch of features (in storage dtype, on the CPU) and its labels."""
        self.shape = list(features.shape[1:])
        self._buffer.append(features)
        self._buffered += features.numel() * features.element_size()
        if labels is not None:
            self.labels.append(labels)
        if self._buffered >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        array = torch.cat(self._buffer).numpy()
        name = f"shard-{len(self.shards):05d}.npy"
        np.save(self.folder / name, array)
        self.shards.append(
            {"file": name, "rows": int(array.shape[0]), "sha256": _sha256_file(self.folder / name)}
        )
        self.dtype = str(array.dtype)
        self._buffer, self._buffered = [], 0

    def close(
        self,
        *,
        key: str,
        examples: int,
        copies: int,
        out_dtype: torch.dtype,
        cut_point: str,
        seconds: float,
    ) -> None:
        """Write the last shard, the labels and the manifest that describes them all
        (``seconds``: how long building took, kept for the record)."""
        self._flush()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "key": key,
            "rows": examples * copies,
            "examples": examples,
            "copies": copies,
            "shape": self.shape,
            "dtype": self.dtype,
            "out_dtype": str(out_dtype).removeprefix("torch."),
            "cut_point": cut_point,
            "shards": self.shards,
            "labels": None,
            "seconds": round(seconds, 3),
        }
        if self.labels:
            np.save(self.folder / _LABELS, torch.cat(self.labels).numpy())
            manifest["labels"] = {"file": _LABELS, "sha256": _sha256_file(self.folder / _LABELS)}
        with open(self.folder / _MANIFEST, "w") as fh:  # the folder is renamed whole, atomically
            json.dump(manifest, fh, indent=1)


def open_store(path: Path, key: str, rows: int) -> Store:
    """Open the store at ``path`` after checking it fully: written for ``key`` in this
    format, holding ``rows`` rows, every shard and the labels matching their checksums and
    shapes. Raises :class:`UnusableStore` saying why it cannot be used."""
    manifest_path = path / _MANIFEST
    if not manifest_path.is_file():
        raise UnusableStore("no manifest" if path.exists() else "missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            raise UnusableStore("its manifest was written for another key or format")
        if manifest["rows"] != rows:
            raise UnusableStore(f"it holds {manifest['rows']} rows, {rows} expected")
        shards = _open_shards(path, manifest)
        labels = _open_labels(path, manifest, sum(a.shape[0] for a in shards))
        out_dtype = getattr(torch, manifest["out_dtype"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnusableStore(f"unreadable: {type(exc).__name__}: {exc}") from exc
    starts = np.cumsum([0] + [a.shape[0] for a in shards[:-1]]).tolist()
    return Store(shards, starts, labels, out_dtype)


def _open_shards(path: Path, manifest: dict[str, Any]) -> list[np.ndarray]:
    shards, total = [], 0
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if not file.is_file():
            raise UnusableStore(f"{shard['file']} is missing")
        if _sha256_file(file) != shard["sha256"]:
            raise UnusableStore(f"{shard['file']} fails its checksum")
        array = np.load(file, mmap_mode="r")
        if array.shape[0] != shard["rows"] or list(array.shape[1:]) != manifest["shape"]:
            raise UnusableStore(f"{shard['file']} has shape {array.shape}")
        shards.append(array)
        total += array.shape[0]
    if total != manifest["rows"]:
        raise UnusableStore(f"its shards hold {total} rows, {manifest['rows']} expected")
    return shards


def _open_labels(path: Path, manifest: dict[str, Any], rows: int) -> torch.Tensor | None:
    if manifest["labels"] is None:
        return None
    file = path / manifest["labels"]["file"]
    if not file.is_file() or _sha256_file(file) != manifest["labels"]["sha256"]:
        raise UnusableStore("its labels file is missing or fails its checksum")
    labels = torch.from_numpy(np.load(file))
    if labels.shape[0] != rows:
        raise UnusableStore(f"it holds {labels.shape[0]} labels for {rows} rows")
    return labels
