"""Training from cached features: where to cut a model so its frozen part runs once.

:func:`plan` is what ``fit``/``fine_tune`` call: it finds where a model's frozen part ends,
cuts it there (:func:`netgraft.cut`) and caches the training data through the frozen
prefix (:class:`netgraft.FeatureCache`), or says why it cannot. The cut is placed at the
last module before the first trainable layer whose output is the only tensor crossing,
with every parameter before it frozen and nothing random, batch-dependent or
train/eval-dependent there (dropout modules, functional dropout, random tensor functions,
reads of ``self.training``), and only where the two halves, run on a few training inputs
with the same random seed, compute what the whole model computes in training and in
evaluation. A cut that fails any of this is never used: an earlier one is tried, or caching
is refused.

Example::

    >>> p = plan(model, train_set, cache=True)
    >>> p.cut_point, p.model  # where the model was cut, and the trainable suffix

This module never changes a model's weights or what is frozen; it only decides and builds
the cache.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from ..adapted import is_peft_model
from ..cache import FeatureCache
from ..cut import cut
from ..data import input_of, to_device
from ..deprecation import legacy
from ..errors import CacheError, SurgeryError
from ..freeze import held_in_inference, is_dropout, norm_policy
from ..layers import Layer, blocks, device_of, layers, trace_order
from .determinism import cached_training_differs, off_the_record, random_operations

__all__ = ["CachePlan", "plan"]

# the plan's messages are about the feature cache: they go where users listen for those
log = logging.getLogger("netgraft.cache")

_MAX_MEMORY_BYTES = 2 << 30
_MAX_CUT_TRIES = 12
# under cache="auto" a prefix this small (a first conv before trainable batch norms) saves
# little compute and its features are often larger than the inputs
_MIN_PREFIX_SHARE = 0.1


class _Refused(Exception):
    """Caching does not apply; the message says why."""


def _stochastic_parts(prefix: nn.Module) -> list[str]:
    """Modules of the prefix whose training-mode output is random or depends on the batch:
    dropout-like modules with a non-zero rate and batch norms not held in eval mode."""
    found = []
    for name, m in prefix.named_modules():
        kind = type(m).__name__
        if is_dropout(m) and not held_in_inference(m):
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


@legacy(dir="cache_dir")
def plan(
    model: nn.Module,
    train_data: Dataset,
    cache: bool | str = "auto",
    *,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    augment_copies: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    val: Dataset | None = None,
    parallel: Any = None,
) -> CachePlan | None:
    """Decide whether training ``model`` on ``train_data`` can run from cached features and
    build the cache: a :class:`CachePlan`, or ``None`` when caching does not apply.

    The cut is placed at the last module before the first trainable layer (in execution
    order) whose output is the only tensor crossing, with every parameter before it frozen
    and nothing random, batch- or mode-dependent there (dropout modules or functions, random
    tensor functions, ``self.training`` reads, batch norm not frozen with ``bn="eval"``),
    and where the halves, run on the first few training inputs with one random seed, give
    what the whole model gives in training and in evaluation. ``cache=False`` returns None; ``"auto"`` returns None (logging why) when
    it does not apply (also when the prefix holds under 10% of the parameters, too little to
    gain); ``True`` raises :class:`CacheError` saying why. ``val`` (a dataset) is cached
    too when its pipeline is deterministic, else left for the full model. Under a
    data-parallel launch fit passes ``parallel``, which splits building the cache between
    the processes (:class:`~netgraft.FeatureCache`).
    """
    if cache is False or cache is None:
        return None
    if cache not in (True, "auto"):
        raise CacheError(f"cache must be 'auto', True or False; found {cache!r}")
    options = {
        "cache_dir": cache_dir,
        "dtype": dtype,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "progress": progress,
        "parallel": parallel,
    }
    try:
        name, prefix, suffix, features = _build(model, train_data, cache, augment_copies, options)
    except _Refused as refused:
        if cache is True:
            raise CacheError(f"cannot train from cached features: {refused}") from None
        log.info("feature cache not used: %s", refused)
        return None
    result = CachePlan(
        suffix, features, prefix, name, model, options, _val_features(prefix, name, val, options)
    )
    # the plan rides on the record so a caller's handler (bench/cache.py) can read its timings
    log.debug("%s", result.describe(), extra={"cache_plan": result})
    return result


def _build(
    model: nn.Module,
    train_data: Dataset,
    cache: bool | str,
    augment_copies: int | None,
    options: dict[str, Any],
) -> tuple[str, nn.Module, nn.Module, FeatureCache]:
    """Where :func:`plan` cuts ``model`` and the cache of the prefix's outputs: the cut's
    name, the prefix, the suffix and the :class:`FeatureCache`; :class:`_Refused` saying
    why it cannot (or, under ``"auto"``, why it is not worth it)."""
    with off_the_record():  # probing runs the forward, which may draw random numbers
        first, order, shapes, example = _first_trainable(model, train_data)
        name, prefix, suffix, reasons = _cut_before(
            model, first, order, example, _probe_batch(model, train_data)
        )
    if cache == "auto":
        _check_worth(model, name, prefix, reasons)
    if options["cache_dir"] is None:
        rows = len(train_data) * (augment_copies or 1)  # type: ignore[arg-type]
        _check_memory(shapes.get(name), name, options["dtype"], rows)
    try:
        features = FeatureCache(
            prefix, train_data, augment_copies=augment_copies, cut_point=name, **options
        )
    except CacheError as exc:
        raise _Refused(str(exc)) from exc
    return name, prefix, suffix, features


def _first_trainable(
    model: nn.Module, train_data: Dataset
) -> tuple[Layer, list[str], dict[str, tuple], Any]:
    """The first trainable layer with the model's execution order and output shapes, traced
    on the first training example (returned as a batch of one); refused when no frozen layer
    runs before it."""
    if len(train_data) == 0:  # type: ignore[arg-type]
        raise _Refused("the training data is empty")
    example = to_device(default_collate([input_of(train_data[0])]), device_of(model))
    order, shapes = trace_order(model, example)
    table = layers(model)
    first = next((row for row in table if row.trainable_params > 0), None)
    if first is None:
        raise _Refused("nothing in the model is trainable")
    if not any(row.params for row in table[: first.index]):
        raise _Refused(
            f"the first trainable layer {first.name!r} comes first: no frozen layer runs before it"
        )
    if first.name not in order:
        raise _Refused(f"the first trainable layer {first.name!r} is never called by the forward")
    return first, order, shapes, example


def _cut_before(
    model: nn.Module, first: Layer, order: list[str], example: Any, probe: Any
) -> tuple[str, nn.Module, nn.Module, list[str]]:
    """The latest cut before ``first`` that gives a frozen, deterministic prefix and trains
    as the whole model does (checked on the ``probe`` batch): ``(cut point, prefix, suffix,
    why later cuts failed)``. Where torch.fx cannot trace the model, it is cut by
    substitution, checked on ``example``."""
    position = order.index(first.name)
    candidates = [
        name
        for name in reversed(order[:position])
        if name and not first.name.startswith(name + ".")
    ]
    reasons: list[str] = []
    for name in _block_boundary_first(model, first.name, candidates)[:_MAX_CUT_TRIES]:
        try:
            prefix, suffix = cut(model, after=name, example_input=example)
        except SurgeryError as exc:
            reasons.append(str(exc))
            continue
        trainable = [n for n, p in prefix.named_parameters() if p.requires_grad]
        if trainable:
            reasons.append(f"cutting at {name!r} leaves trainable {trainable[0]!r} in the prefix")
            continue
        why = _not_the_same_training(model, name, prefix, suffix, probe)
        if why:
            reasons.append(why)
            continue
        return name, prefix, suffix, reasons
    detail = reasons[0] if reasons else "no module runs before it"
    log.debug("cut candidates refused: %s", reasons)
    raise _Refused(
        f"no cut before the first trainable layer {first.name!r} gives a frozen, deterministic "
        f"prefix ({detail})"
    )


def _not_the_same_training(
    model: nn.Module, name: str, prefix: nn.Module, suffix: nn.Module, probe: Any
) -> str | None:
    """Why training from the prefix's cached outputs would differ from training the model:
    random or batch-dependent modules or operations before the cut (named), or a probe
    showing that the halves do not compute what the model computes in training or in
    evaluation (:func:`~netgraft.train.determinism.cached_training_differs`)."""
    parts = _stochastic_parts(prefix) + random_operations(prefix)
    if parts:
        return f"the prefix up to {name!r} is not deterministic in training: {', '.join(parts[:3])}"
    return cached_training_differs(model, name, prefix, suffix, probe)


def _probe_batch(model: nn.Module, train_data: Dataset, size: int = 2) -> Any:
    """The first few training inputs as one batch, on the model's device."""
    n = min(size, len(train_data))  # type: ignore[arg-type]
    return to_device(
        default_collate([input_of(train_data[i]) for i in range(n)]), device_of(model)
    )


def _block_boundary_first(model: nn.Module, first: str, candidates: list[str]) -> list[str]:
    """On a PEFT model, ``candidates`` with the end of the block below the lowest adapter
    first: a cut between blocks is where adapters on the top blocks leave a clean boundary,
    and trying the cuts inside the adapted block first costs a probe pass each."""
    if not is_peft_model(model):
        return candidates
    found = blocks(model)
    index = next(
        (b.index for b in found if any(first.startswith(m + ".") for m in b.modules)), None
    )
    if not index or len(found[index - 1].modules) != 1:
        return candidates
    boundary = found[index - 1].modules[0]
    return (
        [boundary, *(c for c in candidates if c != boundary)]
        if boundary in candidates
        else candidates
    )


def _check_worth(model: nn.Module, name: str, prefix: nn.Module, reasons: list[str]) -> None:
    """Refuse a prefix too small to gain from (under ``cache="auto"``)."""
    frozen = sum(p.numel() for p in prefix.parameters())
    total = sum(p.numel() for p in model.parameters())
    if frozen < _MIN_PREFIX_SHARE * total:
        raise _Refused(
            f"the frozen prefix up to {name!r} holds only {frozen:,} of {total:,} parameters: "
            "too little to gain from caching (RunOptions(cache=True) caches anyway)"
            + (f"; a later cut was not possible: {reasons[0]}" if reasons else "")
        )


def _check_memory(shape: tuple | None, name: str, dtype: torch.dtype | None, rows: int) -> None:
    """Refuse in-memory features of ``rows`` examples that would not fit in memory."""
    if shape is None:
        return
    per_example = int(np.prod(shape[1:])) * (2 if dtype == torch.float16 else 4)
    need = per_example * rows
    if need > _MAX_MEMORY_BYTES:
        raise _Refused(
            f"the features at {name!r} would take {need / 2**30:.1f} GiB of memory; give a "
            "cache folder (RunOptions(cache_dir=...), --cache-dir) or cache_dtype=torch.float16"
        )


def _val_features(
    prefix: nn.Module, name: str, val: Dataset | None, options: dict[str, Any]
) -> FeatureCache | None:
    """The validation data cached through the prefix, or None when it is not a dataset or
    its pipeline is random (the full model evaluates it then)."""
    if not isinstance(val, Dataset) or isinstance(val, DataLoader) or not len(val):  # type: ignore[arg-type]
        return None
    try:
        return FeatureCache(prefix, val, cut_point=name, **options)
    except CacheError as exc:
        log.info("validation data not cached (the full model evaluates it): %s", exc)
        return None
