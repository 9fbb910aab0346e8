"""How a run executes, apart from what it computes: :class:`RunOptions`.

The split follows Lightning's ``Trainer`` against the ``LightningModule`` and Hugging
Face's ``TrainingArguments``: a function takes its own arguments (the model, the data,
what to train and for how long) and one ``run=RunOptions(...)`` saying where and how to
run it (device, precision, processes, progress, cache, checkpoint to resume). Changing
only the run options never changes what is computed, up to floating-point rounding: a
cached run makes the updates an uncached one makes, N processes the updates of one, a
resumed run the updates of an uninterrupted one.

Example::

    >>> run = netgraft.RunOptions(device="cuda", precision="bf16", progress=False)
    >>> netgraft.fit(model, train, val, epochs=3, lr=1e-3, run=run)
    >>> netgraft.study(model, train, val, run=run.replace(workers=4))

This module never imports the rest of netgraft (it sits with the low-level modules) and
never trains anything.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import NetgraftError

__all__ = ["BACKENDS", "RunOptions", "run_options"]

BACKENDS = ("local", "ray")
_CACHE_CHOICES = (True, False, "auto")


@dataclass(kw_only=True)
class RunOptions:
    """How a run executes: where, in what precision, with what progress, cache, processes
    and checkpoint. Taken as ``run=`` by :func:`netgraft.fit`, :func:`netgraft.fine_tune`,
    :func:`netgraft.study`, :func:`netgraft.pretrain_auxiliary`,
    :func:`netgraft.pretrain_layerwise` and :func:`netgraft.evaluate`; a function uses the
    fields that apply to it and ignores the others. Changing only these never changes what
    is computed (up to floating-point rounding).

    - ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``; None: CUDA
      when available. Under ``torchrun``/``accelerate launch`` each process takes its own.
    - ``precision``: None (full), ``"bf16"`` or ``"fp16"`` mixed precision.
    - ``accumulate``: run each batch as that many micro-batches, accumulating their
      gradients before one optimizer step (the same updates in less memory).
    - ``progress``: show progress bars and one line per epoch or row on stderr. The
      lines also go to the ``netgraft.*`` loggers either way.
    - ``stage``: a label put on the run's lines and :class:`netgraft.History` rows
      (:func:`netgraft.fine_tune` names its stages with it).
    - ``resume``: a checkpoint folder or file (:class:`netgraft.Checkpoint`) to continue
      from, exactly, given the same data and arguments.
    - ``cache``: compute frozen leading layers once and train the rest from the stored
      features (:mod:`netgraft.cache`): ``"auto"`` where it applies, ``True`` (raise when
      it cannot), ``False``.
    - ``cache_dir``: keep the features on disk there so later runs reuse them (a study's
      shared frozen pass too); None: in memory (a study: under ``out_dir`` or a temporary
      folder). ``cache_dtype`` stores them in that dtype (e.g. ``torch.float16``);
      ``augment_copies`` caches that many augmented passes, read in turn by epoch;
      ``cache_batch_size`` and ``cache_workers`` are the batch size and DataLoader workers
      of the pass that fills the cache.
    - ``workers``: a study's trials in that many local processes (with
      ``backend="ray"``: at most that many Ray tasks at once). ``backend``: ``"local"`` or
      ``"ray"`` (the cluster at ``ray_address``, else ``RAY_ADDRESS``, else a local Ray).
      ``threads``: torch's CPU threads in every trial (with the same threads every backend
      gives the same rows). ``shared_pass``: frozen trials share one forward pass over the
      data.

    Example::

        >>> run = RunOptions(device="cpu", progress=False, cache_dir="~/.cache/netgraft")
        >>> netgraft.fit(model, train, epochs=3, lr=1e-3, run=run)
    """

    device: Any = None
    precision: str | None = None
    accumulate: int = 1
    progress: bool = True
    stage: str | None = None
    resume: str | os.PathLike | None = None
    cache: bool | str = "auto"
    cache_dir: str | os.PathLike | None = None
    cache_dtype: Any = None
    augment_copies: int | None = None
    cache_batch_size: int = 64
    cache_workers: int = 0
    workers: int | None = None
    backend: str = "local"
    ray_address: str | None = None
    threads: int | None = None
    shared_pass: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int):
            raise NetgraftError(f"accumulate must be a positive integer; found {self.accumulate!r}")
        if self.accumulate < 1:
            raise NetgraftError(f"accumulate must be a positive integer; found {self.accumulate!r}")
        if not any(self.cache is c for c in _CACHE_CHOICES):
            raise NetgraftError(f"cache must be 'auto', True or False; found {self.cache!r}")
        if self.backend not in BACKENDS:
            raise NetgraftError(
                f"backend must be one of {', '.join(BACKENDS)}; found {self.backend!r}"
            )
        for name in ("workers", "threads"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise NetgraftError(f"{name} must be a positive integer or None; found {value!r}")

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with ``changes`` applied (the fields are checked again)."""
        return dataclasses.replace(self, **changes)

    def cache_options(self) -> dict[str, Any]:
        """The feature cache's own options, as :func:`netgraft.train.cached.plan` takes
        them."""
        return {
            "cache_dir": self.cache_dir,
            "dtype": self.cache_dtype,
            "augment_copies": self.augment_copies,
            "batch_size": self.cache_batch_size,
            "num_workers": self.cache_workers,
        }


_RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunOptions))
# the keys fit's old cache_options dict took, as RunOptions fields
_CACHE_KEYS = {
    "dir": "cache_dir",
    "dtype": "cache_dtype",
    "augment_copies": "augment_copies",
    "batch_size": "cache_batch_size",
    "num_workers": "cache_workers",
}


def run_options(run: RunOptions | None, old: Mapping[str, Any] | None = None) -> RunOptions:
    """``run`` (None: the defaults) with the old spellings in ``old`` folded in: any
    RunOptions field by name, ``quiet`` (``progress=not quiet``) and ``cache_options`` (a
    dict of ``dir``, ``dtype``, ``augment_copies``, ``batch_size``, ``num_workers``).
    The caller has warned about them already (:func:`netgraft.deprecation.legacy`)."""
    if run is None:
        run = RunOptions()
    elif not isinstance(run, RunOptions):
        raise NetgraftError(f"run must be a netgraft.RunOptions; found {type(run).__name__}")
    if not old:
        return run
    changes: dict[str, Any] = {}
    for name, value in old.items():
        if name == "quiet":
            changes["progress"] = not value
        elif name == "cache_options":
            unknown = sorted(set(value or {}) - set(_CACHE_KEYS))
            if unknown:
                raise NetgraftError(
                    f"unknown cache option(s) {unknown}; known: {', '.join(_CACHE_KEYS)}"
                )
            changes.update({_CACHE_KEYS[k]: v for k, v in (value or {}).items()})
        elif name in _RUN_FIELDS:
            changes[name] = value
        else:
            raise TypeError(f"unexpected keyword argument {name!r}")
    return run.replace(**changes)
