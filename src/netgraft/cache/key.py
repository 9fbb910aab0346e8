"""The content key of a feature cache: a SHA-256 of everything the cached features depend
on.

That is the prefix's structure, weights and buffers, the cut point, the data (tensor
contents, or file paths with sizes and modification times, subset indices) and its
transforms, the storage dtype and the number of augmented copies. Two caches share a key
only when their contents would be the same. This module never reads or writes a cache
folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

__all__ = ["FORMAT", "KeyedDataset", "cache_key"]

# the cache format version: part of every key and every manifest
FORMAT = 2
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class KeyedDataset(Dataset):
    """A dataset named by a content key (:attr:`key`): a cache built over it hashes the key
    instead of reading every example. :class:`~netgraft.cache.FeatureCache` is one, so a
    cache of cached features has a key too."""

    @property
    def key(self) -> str:
        """The hex key naming this dataset's contents."""
        raise NotImplementedError


def _clean_repr(obj: Any) -> str:
    return _ADDRESS.sub("", repr(obj))


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def _hash_value(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        _hash_tensor(h, value)
    elif isinstance(value, np.ndarray):
        _hash_tensor(h, torch.from_numpy(np.ascontiguousarray(value)))
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(f"{k}=".encode())
            _hash_value(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"seq{len(value)}(".encode())
        for item in value:
            _hash_value(h, item)
        h.update(b")")
    else:
        h.update(f"{type(value).__name__}:{_clean_repr(value)};".encode())


def _model_fingerprint(prefix: nn.Module) -> str:
    """Hash of the prefix's structure (module tree, fx code) and every parameter and buffer."""
    h = hashlib.sha256()
    h.update(_clean_repr(prefix).encode())
    code = getattr(prefix, "code", None)
    if isinstance(code, str):
        h.update(code.encode())
    for name, tensor in list(prefix.named_parameters()) + list(prefix.named_buffers()):
        h.update(name.encode())
        _hash_tensor(h, tensor)
    return h.hexdigest()


def _transform_reprs(dataset: Any) -> str:
    parts = []
    for attr in ("transform", "target_transform", "transforms", "loader"):
        value = getattr(dataset, attr, None)
        if value is not None:
            parts.append(f"{attr}={_clean_repr(value)}")
    return ";".join(parts)


def _data_fingerprint(dataset: Any, h: Any) -> None:
    """Feed what ``dataset``'s examples depend on into ``h``: tensor contents, file paths with
    sizes and mtimes, subset indices and transform reprs; else every example's contents."""
    h.update(f"{type(dataset).__module__}.{type(dataset).__qualname__}[{len(dataset)}];".encode())
    h.update(_transform_reprs(dataset).encode())
    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            _hash_tensor(h, t)
    elif isinstance(dataset, KeyedDataset):
        h.update(dataset.key.encode())
    elif isinstance(dataset, Subset):
        h.update(b"subset")
        _hash_value(h, torch.as_tensor(list(dataset.indices), dtype=torch.int64))
        _data_fingerprint(dataset.dataset, h)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _data_fingerprint(part, h)
    elif isinstance(getattr(dataset, "samples", None), list) and _are_file_samples(dataset.samples):
        for path, *rest in dataset.samples:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{rest};".encode())
    elif isinstance(getattr(dataset, "data", None), (torch.Tensor, np.ndarray)):
        _hash_value(h, dataset.data)
        _hash_value(h, getattr(dataset, "targets", None))
    else:
        # no cheap description of the contents: hash the examples themselves (reading the
        # data is cheap next to running the network over it)
        for i in range(len(dataset)):
            _hash_value(h, dataset[i])


def _are_file_samples(samples: list) -> bool:
    first = samples[0] if samples else None
    return isinstance(first, (tuple, list)) and bool(first) and isinstance(first[0], (str, Path))


def cache_key(
    prefix: nn.Module,
    dataset: Dataset,
    *,
    cut_point: str = "",
    dtype: torch.dtype | None = None,
    augment_copies: int | None = None,
    data_key: str | None = None,
) -> str:
    """The hex key naming a cache: a SHA-256 of the prefix's weights, buffers and structure,
    the cut point, the data and its transforms (or ``data_key`` when given), the storage
    dtype and the number of augmented copies. Any change to one of them changes the key."""
    h = hashlib.sha256()
    h.update(f"netgraft-cache-v{FORMAT};cut={cut_point};dtype={dtype};K={augment_copies};".encode())
    h.update(_model_fingerprint(prefix).encode())
    if data_key is not None:
        h.update(f"data_key={data_key}".encode())
    else:
        _data_fingerprint(dataset, h)
    return h.hexdigest()
