"""Cache what frozen layers compute, so training runs only the layers above them.

When the lower layers of a model are frozen their outputs never change, so computing them
again every epoch is waste. :class:`FeatureCache` runs a frozen *prefix* once over a
dataset (eval mode, no gradients) and is itself a dataset of ``(features, label)`` pairs,
in memory or on disk in memory-mapped ``.npy`` shards. An on-disk cache lives in a folder
named after its *key*, a hash of everything its contents depend on: the prefix's weights
and buffers, its structure and cut point, the data (tensor contents, or file paths, sizes
and modification times) and the transforms. A valid cache is reused; one built for other
weights or data has another key and is never read; a corrupt one (shard checksums in its
manifest) is rebuilt. Builders write into a temporary folder and rename it into place
under a file lock, so two processes building the same cache end with one valid cache.

A random data pipeline (``RandomResizedCrop``, ``ColorJitter``, ...) would be frozen into
one augmentation, so it is refused unless ``augment_copies=K``, which caches K augmented
passes (epoch ``e`` reads pass ``e % K``; call :meth:`FeatureCache.set_epoch`).

:func:`plan` is what ``fit``/``fine_tune`` call: it finds where a model's frozen part ends,
cuts it there (:func:`netgraft.cut`) and caches the training data, or says why it cannot.

Example::

    >>> prefix, head = netgraft.cut(model, at="avgpool")
    >>> feats = netgraft.FeatureCache(prefix, train_set, dir="~/.cache/netgraft")
    >>> loader = torch.utils.data.DataLoader(feats, batch_size=64, shuffle=True)

This module never changes a model's weights, never leaves its train/eval modes changed,
and never reads a cache whose key differs from the one it computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from bisect import bisect_right
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from .data import as_dataset
from .errors import CacheError
from .layers import call_model, evaluating

__all__ = ["CachePlan", "FeatureCache", "cache_key", "plan", "random_transforms"]

log = logging.getLogger(__name__)

_FORMAT = 1
_MANIFEST = "manifest.json"
_LABELS = "labels.npy"
_SHARD_BYTES = 256 << 20
# augmented copies are drawn from fixed seeds so every builder of one cache writes the same
_AUGMENT_SEED = 20240607
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# torchvision / timm / albumentations-style transforms whose output changes from call to
# call; every class whose name starts with "Random" (RandomApply, RandomErasing, ...) too
_RANDOM_TRANSFORMS = frozenset(
    {
        "ColorJitter",
        "RandAugment",
        "AutoAugment",
        "TrivialAugmentWide",
        "AugMix",
        "GaussianBlur",
        "GaussianNoise",
        "ElasticTransform",
        "ScaleJitter",
        "MixUp",
        "CutMix",
        "JPEG",
    }
)


# ----------------------------------------------------------------------------- randomness


def _is_random_transform(obj: Any) -> bool:
    name = type(obj).__name__
    return name.startswith("Random") or name in _RANDOM_TRANSFORMS


def _children(obj: Any) -> list[Any]:
    """Objects a transform or dataset holds that may themselves be transforms or datasets."""
    if isinstance(obj, (list, tuple)):
        return list(obj) if len(obj) <= 64 else []  # long lists are samples, not transforms
    if isinstance(obj, dict):
        return list(obj.values()) if len(obj) <= 64 else []
    if isinstance(obj, nn.Module):  # torchvision.transforms.v2 composes are modules
        return (
            list(obj._modules.values())
            + [v for k, v in vars(obj).items() if not k.startswith("_") and not callable(v)]
            + [getattr(obj, "transforms", None)]
        )
    try:
        attrs = vars(obj)
    except TypeError:
        return []
    return list(attrs.values())


_LEAVES = (str, bytes, int, float, bool, type(None), torch.Tensor, np.ndarray, Path)


def random_transforms(dataset: Any) -> list[str]:
    """Names of the random transforms (torchvision/timm augmentations: ``Random*``,
    ``ColorJitter``, ``RandAugment``, ...) anywhere inside ``dataset``'s transforms, its
    subsets and concatenated parts; empty when the pipeline looks deterministic."""
    found: list[str] = []
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if depth > 8 or isinstance(obj, _LEAVES) or id(obj) in seen:
            return
        seen.add(id(obj))
        if _is_random_transform(obj):
            found.append(type(obj).__name__)
        for child in _children(obj):
            walk(child, depth + 1)

    walk(dataset, 0)
    return list(dict.fromkeys(found))


def _reads_differ(dataset: Dataset) -> bool:
    """Whether reading the first example under different seeds gives different inputs (a
    random pipeline this module does not know by name)."""
    if isinstance(dataset, TensorDataset) or len(dataset) == 0:  # type: ignore[arg-type]
        return False
    reads = []
    with _rng_forked():
        for seed in (1, 2, 3):
            _seed_all(seed)
            reads.append(_input_of(dataset[0]))
    first = reads[0]
    return any(not _same(first, other) for other in reads[1:])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    return a == b


@contextlib.contextmanager
def _rng_forked() -> Iterator[None]:
    """Leave torch's, numpy's and Python's global random streams exactly as they were, so a
    training run draws the same numbers whether or not a cache was built inside it."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


# ----------------------------------------------------------------------------- keys


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
    elif isinstance(dataset, FeatureCache):
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
    h.update(
        f"netgraft-cache-v{_FORMAT};cut={cut_point};dtype={dtype};K={augment_copies};".encode()
    )
    h.update(_model_fingerprint(prefix).encode())
    if data_key is not None:
        h.update(f"data_key={data_key}".encode())
    else:
        _data_fingerprint(dataset, h)
    return h.hexdigest()


# ----------------------------------------------------------------------------- storage


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (fcntl), so concurrent builders of one cache
    wait for each other instead of both computing it; where fcntl is missing the atomic
    rename alone keeps the cache whole."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _input_of(item: Any) -> Any:
    return item[0] if isinstance(item, (tuple, list)) else item


def _remove_tree(path: Path) -> None:
    """Remove a folder without a window in which a half-deleted cache sits under its name."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


class FeatureCache(Dataset):
    """The outputs of a frozen ``prefix`` over ``dataset`` (a dataset or ``(inputs, targets)``
    tensors), computed once: a dataset of
    ``(features, label)`` in the same order (``features`` alone for unlabelled data).

    ``dir=None`` keeps the features in memory; otherwise they are stored under
    ``dir/<key>/`` in ``.npy`` shards read with memory mapping and reused by later runs while
    the key (weights, cut point, data, transforms, dtype) matches and every shard's checksum
    holds. ``dtype`` is the storage dtype (``torch.float16`` halves the size); features are
    returned in the prefix's own dtype. ``augment_copies=K`` allows random transforms by
    caching K passes; otherwise a random pipeline raises :class:`CacheError`.
    ``status`` says what happened: ``"memory"``, ``"built"``, ``"reused"`` or ``"rebuilt"``.
    """

    def __init__(
        self,
        prefix: nn.Module,
        dataset: Dataset | tuple[Any, Any],
        *,
        dir: str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
        augment_copies: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        cut_point: str = "",
        data_key: str | None = None,
        shard_bytes: int = _SHARD_BYTES,
        progress: bool = False,
    ) -> None:
        if not isinstance(dataset, Dataset):  # (inputs, targets) tensors, as fit takes them
            dataset = as_dataset(dataset)
        if augment_copies is not None and (
            not isinstance(augment_copies, int) or augment_copies < 1
        ):
            raise CacheError(f"augment_copies must be a positive integer; found {augment_copies!r}")
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise CacheError("cannot cache features of an empty dataset")
        random_found = random_transforms(dataset)
        if not random_found and augment_copies is None and _reads_differ(dataset):
            random_found = ["an unnamed random transform (the first example differs between reads)"]
        if random_found and augment_copies is None:
            raise CacheError(
                f"the data pipeline is random ({', '.join(random_found)}): a cache would keep one "
                "augmentation forever; pass augment_copies=K to cache K augmented passes, make "
                "the transforms deterministic, or train without the cache"
            )
        self.copies = augment_copies or 1
        self.random = bool(random_found)
        self.epoch = 0
        self.n = len(dataset)  # type: ignore[arg-type]
        self.dtype = dtype
        self.cut_point = cut_point
        self._prefix = prefix
        self._dataset = dataset
        self._batch_size = batch_size
        self._num_workers = num_workers
        self._shard_bytes = shard_bytes
        self._progress = progress
        self._key_args = {
            "cut_point": cut_point,
            "dtype": dtype,
            "augment_copies": augment_copies,
            "data_key": data_key,
        }
        self._key: str | None = None
        self.path: Path | None = None
        self._features: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._shards: list[np.ndarray] | None = None
        self.build_seconds = 0.0
        if dir is None:
            start = time.perf_counter()
            feats, labels = [], []
            for f, y in self._compute():
                feats.append(f)
                labels.append(y)
            self._features = torch.cat(feats)
            self._labels = torch.cat(labels) if labels[0] is not None else None
            self._out_dtype = self._compute_dtype
            self.build_seconds = time.perf_counter() - start
            self.status = "memory"
        else:
            root = Path(dir).expanduser()
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

    def _compute(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(features, labels)`` batches in storage dtype on the CPU, copy after copy,
        with the prefix in eval mode and the global random streams untouched."""
        prefix = self._prefix
        device = next((p.device for p in prefix.parameters()), torch.device("cpu"))
        with evaluating(prefix), _rng_forked():
            for copy in range(self.copies):
                _seed_all(_AUGMENT_SEED + copy)
                loader = DataLoader(
                    self._dataset,
                    batch_size=self._batch_size,
                    shuffle=False,
                    num_workers=self._num_workers,
                    generator=torch.Generator().manual_seed(copy),
                )
                batches: Any = loader
                if self._progress:
                    from rich.progress import track

                    batches = track(
                        loader, description=f"caching features ({copy + 1}/{self.copies})"
                    )
                for batch in batches:
                    x = _input_of(batch)
                    y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
                    out = call_model(prefix, _to(x, device))
                    if not isinstance(out, torch.Tensor):
                        raise CacheError(
                            f"the prefix must return one tensor to be cached; it returns "
                            f"{type(out).__name__}"
                        )
                    self._compute_dtype = out.dtype
                    out = out.detach().cpu()
                    if self.dtype is not None:
                        out = out.to(self.dtype)
                    yield out.contiguous(), None if y is None else torch.as_tensor(y)

    def _open_or_build(self, root: Path) -> str:
        assert self.path is not None
        with _locked(root / f"{self.path.name}.lock"):
            problem = self._validate()
            if problem is None:
                return "reused"
            existed = self.path.exists()
            if existed:
                log.warning("feature cache %s is unusable (%s); rebuilding it", self.path, problem)
                _remove_tree(self.path)
            self._build(root)
            problem = self._validate()
            if problem is not None:
                raise CacheError(
                    f"the feature cache just built at {self.path} is invalid: {problem}"
                )
            return "rebuilt" if existed else "built"

    def _build(self, root: Path) -> None:
        assert self.path is not None
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.path.name}-", dir=root))
        try:
            shards: list[dict[str, Any]] = []
            buffer: list[torch.Tensor] = []
            labels: list[torch.Tensor] = []
            buffered = 0

            def flush() -> None:
                nonlocal buffer, buffered
                if not buffer:
                    return
                array = torch.cat(buffer).numpy()
                name = f"shard-{len(shards):05d}.npy"
                np.save(tmp / name, array)
                shards.append(
                    {"file": name, "rows": int(array.shape[0]), "sha256": _sha256_file(tmp / name)}
                )
                buffer, buffered = [], 0

            shape: list[int] = []
            for feats, y in self._compute():
                shape = list(feats.shape[1:])
                buffer.append(feats)
                buffered += feats.numel() * feats.element_size()
                if y is not None:
                    labels.append(y)
                if buffered >= self._shard_bytes:
                    flush()
            flush()
            manifest: dict[str, Any] = {
                "format": _FORMAT,
                "key": self.key,
                "rows": self.n * self.copies,
                "examples": self.n,
                "copies": self.copies,
                "shape": shape,
                "dtype": str(_np_dtype(self.dtype or self._compute_dtype)),
                "out_dtype": str(self._compute_dtype).removeprefix("torch."),
                "cut_point": self.cut_point,
                "shards": shards,
                "labels": None,
                "seconds": round(time.perf_counter() - start, 3),
            }
            if labels:
                np.save(tmp / _LABELS, torch.cat(labels).numpy())
                manifest["labels"] = {"file": _LABELS, "sha256": _sha256_file(tmp / _LABELS)}
            with open(tmp / _MANIFEST, "w") as fh:  # the folder is renamed whole, atomically
                json.dump(manifest, fh, indent=1)
            try:
                os.rename(tmp, self.path)
            except OSError:
                # another builder renamed first (possible only without fcntl): keep theirs
                if self._validate() is not None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.build_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ reading

    def _validate(self) -> str | None:
        """Open the cache folder and check it fully; the reason it is unusable, or None."""
        assert self.path is not None
        self._shards = None
        manifest_path = self.path / _MANIFEST
        if not manifest_path.is_file():
            return "no manifest" if self.path.exists() else "missing"
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != _FORMAT or manifest.get("key") != self.key:
                return "its manifest was written for another key or format"
            if manifest["rows"] != self.n * self.copies:
                return f"it holds {manifest['rows']} rows, {self.n * self.copies} expected"
            shards, total = [], 0
            for shard in manifest["shards"]:
                path = self.path / shard["file"]
                if not path.is_file():
                    return f"{shard['file']} is missing"
                if _sha256_file(path) != shard["sha256"]:
                    return f"{shard['file']} fails its checksum"
                array = np.load(path, mmap_mode="r")
                if array.shape[0] != shard["rows"] or list(array.shape[1:]) != manifest["shape"]:
                    return f"{shard['file']} has shape {array.shape}"
                shards.append(array)
                total += array.shape[0]
            if total != manifest["rows"]:
                return f"its shards hold {total} rows, {manifest['rows']} expected"
            labels = None
            if manifest["labels"] is not None:
                path = self.path / manifest["labels"]["file"]
                if not path.is_file() or _sha256_file(path) != manifest["labels"]["sha256"]:
                    return "its labels file is missing or fails its checksum"
                labels = torch.from_numpy(np.load(path))
                if labels.shape[0] != total:
                    return f"it holds {labels.shape[0]} labels for {total} rows"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"unreadable: {type(exc).__name__}: {exc}"
        self._shards = shards
        self._starts = np.cumsum([0] + [a.shape[0] for a in shards[:-1]]).tolist()
        self._labels = labels
        self._out_dtype = getattr(torch, manifest["out_dtype"])
        return None

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are reopened in the receiving process (DataLoader workers) rather
        # than pickled as copies of the whole array
        state = dict(self.__dict__)
        if state.get("_shards") is not None:
            state["_shards"] = [str(Path(a.filename)) for a in state["_shards"]]
        state["_prefix"] = None
        state["_dataset"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._shards is not None:
            self._shards = [np.load(p, mmap_mode="r") for p in self._shards]

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

    def __getitem__(self, index: int) -> Any:
        row = self._row(index)
        if self._features is not None:
            feats = self._features[row].to(self._out_dtype)
        else:
            assert self._shards is not None
            s = bisect_right(self._starts, row) - 1
            feats = torch.from_numpy(np.array(self._shards[s][row - self._starts[s]])).to(
                self._out_dtype
            )
        if self._labels is None:
            return feats
        return feats, self._labels[row]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All features of the current copy as one tensor (in the prefix's dtype), and the labels."""
        start = (self.epoch % self.copies) * self.n
        if self._features is not None:
            feats = self._features[start : start + self.n].to(self._out_dtype)
        else:
            feats = torch.stack(
                [self[i][0] if self._labels is not None else self[i] for i in range(self.n)]
            )
        labels = None if self._labels is None else self._labels[start : start + self.n]
        return feats, labels

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one example's features."""
        first = self[0]
        return tuple((first[0] if self._labels is not None else first).shape)

    def describe(self) -> str:
        """One line: where the features live, how many, their shape and what happened."""
        where = "in memory" if self.path is None else str(self.path)
        copies = f" × {self.copies} augmented copies" if self.copies > 1 else ""
        shape = "×".join(str(d) for d in self.feature_shape)
        return (
            f"{self.n} examples{copies}, features {shape}"
            f"{' (' + str(self.dtype).removeprefix('torch.') + ')' if self.dtype else ''}"
            f" {where} [{self.status}{'' if self.path is None else ', key ' + self.key[:12]}]"
        )

    def __repr__(self) -> str:
        return f"FeatureCache({self.describe()})"


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


# ----------------------------------------------------------------------------- plan

_MAX_MEMORY_BYTES = 2 << 30
_MAX_CUT_TRIES = 12
# under cache="auto" a prefix this small (a first conv before trainable batch norms) saves
# little compute and its features are often larger than the inputs
_MIN_PREFIX_SHARE = 0.1


def _stochastic_parts(prefix: nn.Module) -> list[str]:
    """Modules of the prefix whose training-mode output is random or depends on the batch:
    dropout-like modules with a non-zero rate and batch norms not held in eval mode."""
    from .freeze import norm_policy

    found = []
    for name, m in prefix.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.modules.dropout._DropoutNd) or "Drop" in kind:
            rate = getattr(m, "p", getattr(m, "drop_prob", getattr(m, "drop_rate", 1.0)))
            if rate:
                found.append(f"{name} ({kind})")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and norm_policy(m) != "eval":
            if m.training or not m.track_running_stats or m.running_mean is None:
                found.append(f"{name} ({kind} in training mode, frozen with bn={norm_policy(m)!r})")
            else:
                found.append(f"{name} ({kind} not held in eval mode by netgraft.freeze)")
    return found


class CachePlan:
    """Training from cached features: ``model`` is the trainable suffix (sharing parameters
    with the whole model), ``train`` the cached dataset (same labels and order), ``val`` the
    cached validation data (or None), ``prefix`` the frozen part that was run once and
    ``cut_point`` where the model was split."""

    def __init__(
        self,
        model: nn.Module,
        train: FeatureCache,
        prefix: nn.Module,
        cut_point: str,
        full_model: nn.Module,
        options: dict[str, Any],
        val: FeatureCache | None = None,
    ):
        self.model = model
        self.train = train
        self.val = val
        self.prefix = prefix
        self.cut_point = cut_point
        self.full_model = full_model
        self._options = options

    def set_epoch(self, epoch: int) -> None:
        """Tell the cached dataset which epoch starts (chooses the augmented copy)."""
        self.train.set_epoch(epoch)

    def features(self, dataset: Dataset) -> FeatureCache:
        """Cache ``dataset`` (validation data, say) through the same prefix and settings."""
        return FeatureCache(self.prefix, dataset, cut_point=self.cut_point, **self._options)

    def describe(self) -> str:
        """One line for the training log: where the model was cut and what was cached."""
        frozen = sum(p.numel() for p in self.prefix.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        took = f" in {self.train.build_seconds:.1f}s" if self.train.status != "reused" else ""
        val = f"; validation: {self.val.n} examples cached" if self.val is not None else ""
        return (
            f"feature cache: frozen prefix up to {self.cut_point!r} ({frozen:,} parameters) runs "
            f"once{took}; training {trainable:,} parameters on {self.train.describe()}{val}"
        )

    def __repr__(self) -> str:
        return f"CachePlan({self.describe()})"


def plan(
    model: nn.Module,
    train_data: Dataset,
    cache: bool | str = "auto",
    *,
    dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    augment_copies: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    val: Dataset | None = None,
) -> CachePlan | None:
    """Decide whether training ``model`` on ``train_data`` can run from cached features and
    build the cache: a :class:`CachePlan`, or ``None`` when caching does not apply.

    The cut is placed at the last module before the first trainable layer (in execution
    order) whose output is the only tensor crossing, with every parameter before it frozen
    and nothing random or batch-dependent there (dropout, batch norm not frozen with
    ``bn="eval"``). ``cache=False`` returns None; ``"auto"`` returns None (logging why) when
    it does not apply (also when the prefix holds under 10% of the parameters, too little to
    gain); ``True`` raises :class:`CacheError` saying why. ``val`` (a dataset) is cached
    too when its pipeline is deterministic, else left for the full model.
    """
    if cache is False or cache is None:
        return None
    if cache not in (True, "auto"):
        raise CacheError(f"cache must be 'auto', True or False; found {cache!r}")

    def refuse(reason: str) -> None:
        if cache is True:
            raise CacheError(f"cannot train from cached features: {reason}")
        log.info("feature cache not used: %s", reason)
        return None

    from torch.utils.data import default_collate

    from .cut import cut
    from .errors import SurgeryError
    from .layers import layers, trace_order

    if len(train_data) == 0:  # type: ignore[arg-type]
        return refuse("the training data is empty")
    example = default_collate([_input_of(train_data[0])])
    order, shapes = trace_order(model, example)
    table = layers(model)
    first = next((row for row in table if row.trainable_params > 0), None)
    if first is None:
        return refuse("nothing in the model is trainable")
    before = table[: first.index]
    if not any(row.params for row in before):
        return refuse(
            f"the first trainable layer {first.name!r} comes first: no frozen layer runs before it"
        )
    if first.name not in order:
        return refuse(f"the first trainable layer {first.name!r} is never called by the forward")
    position = order.index(first.name)
    candidates = [
        name
        for name in reversed(order[:position])
        if name and not first.name.startswith(name + ".")
    ]
    reasons: list[str] = []
    chosen = None
    for name in candidates[:_MAX_CUT_TRIES]:
        try:
            prefix, suffix = cut(model, at=name)
        except SurgeryError as exc:
            reasons.append(str(exc))
            continue
        trainable = [n for n, p in prefix.named_parameters() if p.requires_grad]
        if trainable:
            reasons.append(f"cutting at {name!r} leaves trainable {trainable[0]!r} in the prefix")
            continue
        random_parts = _stochastic_parts(prefix)
        if random_parts:
            reasons.append(
                f"the prefix up to {name!r} is not deterministic in training: "
                f"{', '.join(random_parts[:3])}"
            )
            continue
        chosen = (name, prefix, suffix)
        break
    if chosen is None:
        detail = reasons[0] if reasons else "no module runs before it"
        return refuse(
            f"no cut before the first trainable layer {first.name!r} gives a frozen, deterministic "
            f"prefix ({detail})"
        )
    name, prefix, suffix = chosen
    frozen = sum(p.numel() for p in prefix.parameters())
    total = sum(p.numel() for p in model.parameters())
    if cache == "auto" and frozen < _MIN_PREFIX_SHARE * total:
        return refuse(
            f"the frozen prefix up to {name!r} holds only {frozen:,} of {total:,} parameters: "
            "too little to gain from caching (pass cache=True to cache anyway)"
            + (f"; a later cut was not possible: {reasons[0]}" if reasons else "")
        )
    shape = shapes.get(name)
    if dir is None and shape is not None:
        per_example = int(np.prod(shape[1:])) * (2 if dtype == torch.float16 else 4)
        need = per_example * len(train_data) * (augment_copies or 1)  # type: ignore[arg-type]
        if need > _MAX_MEMORY_BYTES:
            return refuse(
                f"the features at {name!r} would take {need / 2**30:.1f} GiB of memory; give a "
                "cache folder (dir=..., --cache-dir) or dtype=torch.float16"
            )
    options = {
        "dir": dir,
        "dtype": dtype,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "progress": progress,
    }
    try:
        features = FeatureCache(
            prefix, train_data, augment_copies=augment_copies, cut_point=name, **options
        )
    except CacheError as exc:
        return refuse(str(exc))
    val_features = None
    if isinstance(val, Dataset) and not isinstance(val, DataLoader) and len(val):  # type: ignore[arg-type]
        try:
            val_features = FeatureCache(prefix, val, cut_point=name, **options)
        except CacheError as exc:
            log.info("validation data not cached (the full model evaluates it): %s", exc)
    result = CachePlan(suffix, features, prefix, name, model, options, val_features)
    # the plan rides on the record so a caller's handler (bench/cache.py) can read its timings
    log.debug("%s", result.describe(), extra={"cache_plan": result})
    return result
