"""FeatureCache: the outputs of a frozen prefix over a dataset, computed once and served
as a dataset of ``(features, label)`` pairs, in memory or from an on-disk shard store.

An on-disk cache lives in a folder named after its key (:func:`~netgraft.cache.cache_key`):
a valid one is reused, one built for other weights or data has another key and is never
read, a corrupt one is rebuilt. A random data pipeline is refused unless
``augment_copies=K``, which caches K augmented passes (epoch ``e`` reads pass ``e % K``).
This module never changes the prefix's weights, never leaves its train/eval modes changed
and never leaves the global random streams changed.
"""

from __future__ import annotations

import logging
import os
import time
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from rich.progress import track
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..atomic import atomic_folder
from ..data import as_dataset, split_example, to_device
from ..deprecation import legacy
from ..errors import CacheError
from ..layers import call_model, device_of, evaluating
from ..rng import forked, seed_everything
from .key import KeyedDataset, cache_key
from .store import (
    SHARD_BYTES,
    ShardWriter,
    UnusableStore,
    locked,
    open_store,
    remove_folder,
)
from .transforms import random_transforms, reads_differ

__all__ = ["FeatureCache"]

# the messages of the whole cache package share one logger, where users listen for them
log = logging.getLogger("netgraft.cache")

# augmented copies are drawn from fixed seeds so every builder of one cache writes the same
_AUGMENT_SEED = 20240607


def _random_parts(dataset: Dataset, augment_copies: int | None) -> list[str]:
    """What makes ``dataset`` random; raises :class:`CacheError` when it cannot be cached
    (empty, a bad ``augment_copies``, or random without ``augment_copies``)."""
    if augment_copies is not None and (not isinstance(augment_copies, int) or augment_copies < 1):
        raise CacheError(f"augment_copies must be a positive integer; found {augment_copies!r}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise CacheError("cannot cache features of an empty dataset")
    found = random_transforms(dataset)
    if not found and augment_copies is None and reads_differ(dataset):
        found = ["an unnamed random transform (the first example differs between reads)"]
    if found and augment_copies is None:
        raise CacheError(
            f"the data pipeline is random ({', '.join(found)}): a cache would keep one "
            "augmentation forever; pass augment_copies=K to cache K augmented passes, make "
            "the transforms deterministic, or train without the cache"
        )
    return found


def _fields(output: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a structured output, in pytree leaf order; anything else that is not
    ``None`` cannot be cached."""
    leaves = pytree.tree_leaves(output)
    others = sorted({type(v).__name__ for v in leaves if not isinstance(v, torch.Tensor)})
    if others or not leaves:
        raise CacheError(
            f"the prefix returns {type(output).__name__} holding "
            f"{', '.join(others) if others else 'no tensor'}: only tensors (alone or in tuples, "
            "dicts and model outputs) can be cached"
        )
    return tuple(leaves)


class FeatureCache(KeyedDataset):
    """The outputs of a frozen ``prefix`` over ``dataset`` (a dataset or ``(inputs, targets)``
    tensors, or dicts whose ``labels`` are the targets), computed once: a dataset of
    ``(features, label)`` in the same order (``features`` alone for unlabelled data).

    ``features`` is a tensor when the prefix returns one. A prefix that returns a structure
    (a tuple, a dict, a Hugging Face ``ModelOutput``, the ``(inputs, value)`` pair of a cut by
    substitution) has its tensors cached as they are, each in its own dtype: ``features`` is
    then the tuple of those tensors in ``torch.utils._pytree`` leaf order, which the suffix of
    a cut by substitution takes directly. Every example must give tensors of the same shapes
    (pad text to a fixed length, with its attention mask).

    ``cache_dir=None`` keeps the features in memory; otherwise they are stored under
    ``cache_dir/<key>/`` in ``.npy`` shards read with memory mapping and reused by later runs while
    the key (weights, cut point, data, transforms, dtype) matches and every shard's checksum
    holds. ``dtype`` is the storage dtype (``torch.float16`` halves the size); features are
    returned in the prefix's own dtype; integer fields (token ids, masks) are never
    converted. ``augment_copies=K`` allows random transforms by
    caching K passes; otherwise a random pipeline raises :class:`CacheError`.
    ``status`` says what happened: ``"memory"``, ``"built"``, ``"reused"`` or ``"rebuilt"``.

    ``parallel`` (what :func:`netgraft.fit` passes when started with ``torchrun``: an object
    with ``world_size``, ``is_main``, ``share_rows(n)``, ``gather_rows``, ``any`` and
    ``barrier``) splits the one-off pass between the processes when the pipeline is
    deterministic: each computes its contiguous share of the rows, and an on-disk store is
    written once, by rank 0, then read by every process.
    """

    # its public home: pickles name it there, and keys of caches built over a cache (which
    # hash the dataset's type) stay what they were before the cache became a package
    __module__ = "netgraft.cache"

    @legacy(dir="cache_dir")
    def __init__(
        self,
        prefix: nn.Module,
        dataset: Dataset | tuple[Any, Any],
        *,
        cache_dir: str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
        augment_copies: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        cut_point: str = "",
        data_key: str | None = None,
        shard_bytes: int = SHARD_BYTES,
        progress: bool = False,
        parallel: Any = None,
    ) -> None:
        if not isinstance(dataset, Dataset):  # (inputs, targets) tensors, as fit takes them
            dataset = as_dataset(dataset)
        self.random = bool(_random_parts(dataset, augment_copies))
        self.copies = augment_copies or 1
        self.epoch = 0
        self.n = len(dataset)  # type: ignore[arg-type]
        self.dtype = dtype
        self.cut_point = cut_point
        self._prefix: nn.Module | None = prefix
        self._dataset: Dataset | None = dataset
        self._batch_size, self._num_workers = batch_size, num_workers
        self._shard_bytes, self._progress = shard_bytes, progress
        self._parallel = parallel
        self._key_args = {
            "cut_point": cut_point,
            "dtype": dtype,
            "augment_copies": augment_copies,
            "data_key": data_key,
        }
        self._key: str | None = None
        self.path: Path | None = None
        self._features: list[torch.Tensor] | None = None
        self._labels: torch.Tensor | None = None
        self._shards: list[list[np.ndarray]] | None = None
        self._single = True
        self._out_dtypes: list[torch.dtype] = []
        self.build_seconds = 0.0
        if cache_dir is None:
            self.status = self._build_in_memory()
        else:
            root = Path(cache_dir).expanduser()
            root.mkdir(parents=True, exist_ok=True)
            self.path = root / self.key[:32]
            self.status = self._open_or_build(root)
        # on-disk outcomes (built, reused, rebuilt) are worth a line; an in-memory build is
        # reported by whoever uses it (fit's plan line)
        log.log(
            logging.DEBUG if self.status == "memory" else logging.INFO,
            "feature cache %s: %s",
            self.status,
            self.describe(),
        )

    # ------------------------------------------------------------------ building

    def _compute(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
        """Yield ``(fields, labels)`` batches in storage dtype on the CPU, copy after copy,
        with the prefix in eval mode and the global random streams untouched."""
        prefix = self._prefix
        assert prefix is not None and self._dataset is not None
        device = device_of(prefix)
        with evaluating(prefix), forked():
            for copy in range(self.copies):
                seed_everything(_AUGMENT_SEED + copy)
                loader = DataLoader(
                    self._part(),
                    batch_size=self._batch_size,
                    shuffle=False,
                    num_workers=self._num_workers,
                    generator=torch.Generator().manual_seed(copy),
                )
                batches: Any = loader
                if self._progress:
                    batches = track(
                        loader, description=f"caching features ({copy + 1}/{self.copies})"
                    )
                for batch in batches:
                    yield self._features_of(prefix, batch, device)

    def _features_of(
        self, prefix: nn.Module, batch: Any, device: torch.device
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        inputs, y = split_example(batch)
        out = call_model(prefix, to_device(inputs, device))
        self._single = isinstance(out, torch.Tensor)
        fields = (out,) if self._single else _fields(out)
        self._out_dtypes = [f.dtype for f in fields]
        stored = tuple(self._stored(f.detach().cpu()).contiguous() for f in fields)
        return stored, None if y is None else torch.as_tensor(y)

    def _stored(self, field: torch.Tensor) -> torch.Tensor:
        """A field in its storage dtype: ``dtype`` applies to floating-point fields only."""
        if self.dtype is not None and field.is_floating_point():
            return field.to(self.dtype)
        return field

    def _build_in_memory(self) -> str:
        start = time.perf_counter()
        batches, labels = [], []
        for fields, y in self._compute():
            batches.append(fields)
            labels.append(y)
        self._features = [torch.cat(field) for field in zip(*batches, strict=True)]
        self._labels = torch.cat(labels) if labels[0] is not None else None
        if self._splits():  # every process computed its share: put the rows together
            self._features = [self._parallel.gather_rows(f) for f in self._features]
            if self._labels is not None:
                self._labels = self._parallel.gather_rows(self._labels)
        self.build_seconds = time.perf_counter() - start
        return "memory"

    # ------------------------------------------------------------------ many processes

    def _splits(self) -> bool:
        """Whether the one-off pass is split between the processes of a data-parallel run
        (``parallel``): a deterministic pipeline with a row for every process."""
        p = self._parallel
        return p is not None and p.world_size > 1 and not self.random and self.n >= p.world_size

    def _part(self) -> Dataset:
        """The rows this process computes: all, or its contiguous share when split."""
        assert self._dataset is not None
        if not self._splits():
            return self._dataset
        return Subset(self._dataset, self._parallel.share_rows(self.n))

    def _open_or_build_split(self, root: Path) -> str:
        """The on-disk cache of a data-parallel run: every process computes its share, rank 0
        writes the store (under the lock, renamed into place whole), every process reads it."""
        assert self.path is not None
        parallel, start = self._parallel, time.perf_counter()
        if not parallel.any(self._validate() is not None):
            return "reused"
        existed = parallel.any(self.path.exists())
        self._build_in_memory()
        if parallel.is_main:
            with locked(root / f"{self.path.name}.lock"):
                problem = self._validate()
                if problem is not None:
                    if self.path.exists():
                        log.warning(
                            "feature cache %s is unusable (%s); rebuilding", self.path, problem
                        )
                    remove_folder(self.path)
                    self._build(self._memory_batches())
        parallel.barrier()
        self._features = None  # read from the store, like every other process
        problem = self._validate()
        if problem is not None:
            raise CacheError(f"the feature cache just built at {self.path} is invalid: {problem}")
        self.build_seconds = time.perf_counter() - start
        return "rebuilt" if existed else "built"

    def _memory_batches(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
        """The features held in memory, in batches as :meth:`_compute` yields them."""
        assert self._features is not None
        for begin in range(0, self.n * self.copies, self._batch_size):
            end = begin + self._batch_size
            labels = None if self._labels is None else self._labels[begin:end]
            yield tuple(f[begin:end] for f in self._features), labels

    def _open_or_build(self, root: Path) -> str:
        assert self.path is not None
        if self._splits():
            return self._open_or_build_split(root)
        with locked(root / f"{self.path.name}.lock"):
            problem = self._validate()
            if problem is None:
                return "reused"
            existed = self.path.exists()
            if existed:
                log.warning("feature cache %s is unusable (%s); rebuilding it", self.path, problem)
                remove_folder(self.path)
            self._build()
            problem = self._validate()
            if problem is not None:
                raise CacheError(
                    f"the feature cache just built at {self.path} is invalid: {problem}"
                )
            return "rebuilt" if existed else "built"

    def _build(self, batches: Iterable[Any] | None = None) -> None:
        assert self.path is not None
        start = time.perf_counter()
        try:
            with atomic_folder(self.path, replace=False) as tmp:
                writer = ShardWriter(tmp, self._shard_bytes)
                for fields, labels in self._compute() if batches is None else batches:
                    writer.add(fields[0] if self._single else fields, labels)
                writer.close(
                    key=self.key,
                    examples=self.n,
                    copies=self.copies,
                    out_dtypes=self._out_dtypes,
                    cut_point=self.cut_point,
                    seconds=time.perf_counter() - start,
                )
        except FileExistsError:
            # another builder renamed first (possible only without fcntl): keep theirs
            if self._validate() is not None:
                raise
        self.build_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ reading

    def _validate(self) -> str | None:
        """Open the cache folder and check it fully; the reason it is unusable, or None."""
        assert self.path is not None
        self._shards = None
        try:
            store = open_store(self.path, self.key, self.n * self.copies)
        except UnusableStore as exc:
            return str(exc)
        self._shards, self._starts = store.shards, store.starts
        self._labels, self._out_dtypes, self._single = store.labels, store.out_dtypes, store.single
        return None

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are reopened in the receiving process (DataLoader workers) rather
        # than pickled as copies of the whole array
        state = dict(self.__dict__)
        if state.get("_shards") is not None:
            state["_shards"] = [[str(Path(a.filename)) for a in s] for s in state["_shards"]]
        state["_prefix"] = None
        state["_dataset"] = None
        state["_parallel"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._shards is not None:
            self._shards = [[np.load(p, mmap_mode="r") for p in s] for s in self._shards]

    @property
    def key(self) -> str:
        """The hex key of this cache (:func:`cache_key`); computed on first use, since an
        in-memory cache never needs it."""
        if self._key is None:
            if self._prefix is None:
                raise CacheError(
                    "this copy of the cache no longer holds its prefix to compute a key"
                )
            self._key = cache_key(self._prefix, self._dataset, **self._key_args)
        return self._key

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmented copy read from now on: copy ``epoch % augment_copies``."""
        self.epoch = int(epoch)

    def _row(self, index: int) -> int:
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a cache of {self.n} examples")
        return (self.epoch % self.copies) * self.n + index

    def _fields_at(self, rows: slice | int) -> list[torch.Tensor]:
        """Every field at ``rows`` (an index or a slice of rows), in its returned dtype."""
        if self._features is not None:
            fields = [f[rows] for f in self._features]
        elif isinstance(rows, int):
            assert self._shards is not None
            s = bisect_right(self._starts, rows) - 1
            fields = [
                torch.from_numpy(np.array(a[rows - self._starts[s]])) for a in self._shards[s]
            ]
        else:
            picked = [self._fields_at(r) for r in range(rows.start, rows.stop)]
            fields = [torch.stack(f) for f in zip(*picked, strict=True)]
        return [f.to(d) for f, d in zip(fields, self._out_dtypes, strict=True)]

    def _shaped(self, fields: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return fields[0] if self._single else tuple(fields)

    def __getitem__(self, index: int) -> Any:
        row = self._row(index)
        feats = self._shaped(self._fields_at(row))
        if self._labels is None:
            return feats
        return feats, self._labels[row]

    def tensors(self) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor | None]:
        """All features of the current copy (one tensor, or a tuple of fields, in the
        prefix's dtypes) and the labels."""
        start = (self.epoch % self.copies) * self.n
        feats = self._shaped(self._fields_at(slice(start, start + self.n)))
        labels = None if self._labels is None else self._labels[start : start + self.n]
        return feats, labels

    @property
    def feature_shape(self) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
        """The shape of one example's features (a shape per field for structured features)."""
        fields = self._fields_at(self._row(0))
        shapes = tuple(tuple(f.shape) for f in fields)
        return shapes[0] if self._single else shapes

    def describe(self) -> str:
        """One line: where the features live, how many, their shape and what happened."""
        where = "in memory" if self.path is None else str(self.path)
        copies = f" × {self.copies} augmented copies" if self.copies > 1 else ""
        shapes = self.feature_shape if not self._single else (self.feature_shape,)
        shape = ", ".join("×".join(str(d) for d in s) or "scalar" for s in shapes)
        fields = f"{len(shapes)} fields " if not self._single else ""
        return (
            f"{self.n} examples{copies}, features {fields}{shape}"
            f"{' (' + str(self.dtype).removeprefix('torch.') + ')' if self.dtype else ''}"
            f" {where} [{self.status}{'' if self.path is None else ', key ' + self.key[:12]}]"
        )

    def __repr__(self) -> str:
        return f"FeatureCache({self.describe()})"
