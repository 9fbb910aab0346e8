"""How a run executes, apart from what it computes: :class:`RunOptions`, and the one way
old keyword spellings keep working (:func:`legacy`, :func:`renamed_function`).

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
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import NetgraftError

__all__ = [
    "BACKENDS",
    "LEGACY",
    "RunOptions",
    "deprecated",
    "legacy",
    "renamed_function",
    "run_options",
]

BACKENDS = ("local", "ray")
_CACHE_CHOICES = (True, False, "auto")
_PACKAGE = str(Path(__file__).resolve().parent)

F = TypeVar("F", bound=Callable[..., Any])

LEGACY: dict[str, dict[str, str]] = {}
"""Every deprecated keyword spelling of the public API: ``{"fit": {"quiet": "run=..."}}``,
filled by :func:`legacy`; a renamed function is listed under ``"<module>"`` as
``{old name: new name}``. ``tests/test_api_conventions.py`` calls each one."""


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
    The caller has warned about them already (:func:`legacy`)."""
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


def _caller_stacklevel() -> int:
    """The stack level of the first frame outside netgraft, for a warning to point at the
    user's line (so Python shows it once per calling line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def deprecated(old: str, new: str) -> None:
    """Warn (``FutureWarning``, shown once per calling line) that ``old`` is deprecated in
    favour of ``new``; the warning points at the first line outside netgraft."""
    warnings.warn(
        f"{old} is deprecated; use {new} instead (the old spelling still works for now)",
        FutureWarning,
        stacklevel=_caller_stacklevel(),
    )


def legacy(**spellings: str) -> Callable[[F], F]:
    """Let a function accept old keyword spellings: ``@legacy(at="after")`` renames
    ``at=`` to ``after=``; a spelling whose new form is not a parameter of the function
    (``quiet="run=RunOptions(progress=...)"``) reaches its ``**legacy`` catch-all, which
    must fold it in. Each old spelling warns (:func:`deprecated`). When that catch-all is
    named ``legacy_kwargs`` it takes nothing else: a keyword that is neither a parameter nor
    a known old spelling raises ``TypeError``, as Python would (another catch-all, such as
    ``**fit_kwargs``, passes other keywords on)."""

    def wrap(fn: F) -> F:
        params = inspect.signature(fn).parameters
        strict = "legacy_kwargs" in params or not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )
        name = fn.__qualname__.replace(".__init__", "")
        LEGACY[name] = dict(spellings)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old in [k for k in kwargs if k in spellings and k not in params]:
                new = spellings[old]
                deprecated(f"{name}({old}=...)", new if "=" in new else f"{new}=...")
                if new in params:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old}= and {new}=; give {new}=")
                    kwargs[new] = kwargs.pop(old)
            unknown = [k for k in kwargs if k not in params and k not in spellings]
            if unknown and strict:
                raise TypeError(f"{name}() got an unexpected keyword argument {unknown[0]!r}")
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def renamed_function(fn: F, old: str) -> F:
    """``fn`` under its old name ``old``: the same call, warning once per calling line
    that ``old`` is deprecated in favour of ``fn``'s own name."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        deprecated(f"{old}()", f"{fn.__name__}()")
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = old
    call.__doc__ = f"Deprecated name of :func:`{fn.__name__}` (same arguments, same result)."
    LEGACY.setdefault("<module>", {})[old] = fn.__name__
    return call  # type: ignore[return-value]
