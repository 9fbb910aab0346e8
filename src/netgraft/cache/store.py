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
    """A checked store: per shard, the memory-mapped array of each field, with the first row
    of each shard; the labels (or None); the dtype each field is returned in, and whether the
    features are one tensor (``single``) rather than a tuple of fields."""

    shards: list[list[np.ndarray]]
    starts: list[int]
    labels: torch.Tensor | None
    out_dtypes: list[torch.dtype]
    single: bool


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
    the labels and the manifest (:meth:`close`). A batch is one tensor or a tuple of tensors
    (*fields*: the leaves of a structured output such as hidden states and an attention
    mask); each field of a shard is its own ``.npy`` file, every field with the same rows."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.labels: list[torch.Tensor] = []
        self.fields: list[dict[str, Any]] = []
        self.single = True
        self._buffer: list[tuple[torch.Tensor, ...]] = []
        self._buffered = 0

    def add(
        self, features: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor | None
    ) -> None:
        """Append a batch of features (one tensor or a tuple of fields, in storage dtype, on
        the CPU) and its labels."""
        self.single = isinstance(features, torch.Tensor)
        fields = (features,) if self.single else tuple(features)
        self.fields = [{"shape": list(f.shape[1:])} for f in fields]
        self._buffer.append(fields)
        self._buffered += sum(f.numel() * f.element_size() for f in fields)
        if labels is not None:
            self.labels.append(labels)
        if self._buffered >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        index = len(self.shards)
        files = []
        for i, field in enumerate(zip(*self._buffer, strict=True)):
            array = torch.cat(field).numpy()
            name = f"shard-{index:05d}.npy" if i == 0 else f"shard-{index:05d}-{i}.npy"
            np.save(self.folder / name, array)
            files.append({"file": name, "sha256": _sha256_file(self.folder / name)})
            self.fields[i]["dtype"] = str(array.dtype)
        rows = sum(fields[0].shape[0] for fields in self._buffer)
        self.shards.append({"rows": int(rows), "files": files})
        self._buffer, self._buffered = [], 0

    def close(
        self,
        *,
        key: str,
        examples: int,
        copies: int,
        out_dtypes: list[torch.dtype],
        cut_point: str,
        seconds: float,
    ) -> None:
        """Write the last shard, the labels and the manifest that describes them all
        (``out_dtypes``: the dtype each field is returned in; ``seconds``: how long building
        took, kept for the record)."""
        self._flush()
        for field, dtype in zip(self.fields, out_dtypes, strict=True):
            field["out_dtype"] = str(dtype).removeprefix("torch.")
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "key": key,
            "rows": examples * copies,
            "examples": examples,
            "copies": copies,
            "single": self.single,
            "fields": self.fields,
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
        labels = _open_labels(path, manifest, manifest["rows"])
        out_dtypes = [getattr(torch, f["out_dtype"]) for f in manifest["fields"]]
        single = bool(manifest["single"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnusableStore(f"unreadable: {type(exc).__name__}: {exc}") from exc
    starts = np.cumsum([0] + [arrays[0].shape[0] for arrays in shards[:-1]]).tolist()
    return Store(shards, starts, labels, out_dtypes, single)


def _open_shards(path: Path, manifest: dict[str, Any]) -> list[list[np.ndarray]]:
    shards, total = [], 0
    fields = manifest["fields"]
    for shard in manifest["shards"]:
        if len(shard["files"]) != len(fields):
            raise UnusableStore(
                f"a shard holds {len(shard['files'])} fields, {len(fields)} expected"
            )
        arrays = []
        for entry, field in zip(shard["files"], fields, strict=True):
            file = path / entry["file"]
            if not file.is_file():
                raise UnusableStore(f"{entry['file']} is missing")
            if _sha256_file(file) != entry["sha256"]:
                raise UnusableStore(f"{entry['file']} fails its checksum")
            array = np.load(file, mmap_mode="r")
            if array.shape[0] != shard["rows"] or list(array.shape[1:]) != field["shape"]:
                raise UnusableStore(f"{entry['file']} has shape {array.shape}")
            arrays.append(array)
        shards.append(arrays)
        total += shard["rows"]
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
