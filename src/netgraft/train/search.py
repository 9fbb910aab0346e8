"""Choosing how much of the body to train, on a held-out part of the training data.

No fixed fine-tuning setting holds on every task (``bench/suite.py``: the body's rate that
wins on text loses on small grey images, and training batch norms collapses some sources),
so :func:`netgraft.fine_tune` with ``FineTuneConfig(search=True)`` (the default) tries a
few settings on four fifths of the training data, scores each on the fifth held out, and
then fine-tunes on all the training data with the config's own setting unless another one
is clearly better there (:func:`pick`). A fifth of under :data:`MIN_SCORED` examples is
too few to tell settings apart, so further fifths are held out in turn until that many
are scored (five-fold cross-validation under 100 examples: each example scored once).
The user's validation data is never used to choose. This module splits the data and
scores; :mod:`.finetune` runs the trials.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    default_collate,
)

from ..layers import device_of
from ..options import RunOptions
from .batches import evaluate, split_batch, to_data

__all__ = [
    "FOLDS",
    "HOLDOUT",
    "MIN_EXAMPLES",
    "MIN_SCORED",
    "apply",
    "candidates",
    "folds",
    "holdout_split",
    "pick",
    "pool",
    "score",
    "size",
]

log = logging.getLogger("netgraft")

HOLDOUT = 0.2
# below this many training examples the held-out part is too small to choose anything
MIN_EXAMPLES = 20
# held-out examples the search wants scored: one standard error of an accuracy on 100 is
# at most 0.05; a held-out fifth of fewer (under 500 examples) is followed by the next
# fifths in turn, each a fold of its own, until this many are scored or all five ran
MIN_SCORED = 100
FOLDS = 5

HEAD_ONLY = "head only"


def candidates(
    base_lr: float, lr_mult: float, keep: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """The settings the search compares, by label, as :class:`FineTuneConfig` changes
    (``{}`` for the head alone): the head alone; the body at ``base_lr`` after the head
    stage; and everything from the start at one rate (``0.6 * base_lr``, i.e. ``0.3 *
    base_lr`` for every block after halving) with batch norms trained, for every epoch
    (``head_epochs`` 0: no head stage; :func:`apply`). ``keep`` (field -> value) holds the
    fields the caller chose, which no candidate changes; the labels say the rates that
    run. At the defaults: the head, ``base_lr`` 1e-3 ×10, and 3e-4 everywhere from the
    start with norms trained.

    The body at ``0.3 * base_lr`` was a candidate too until the suite showed it never
    chosen (0 of 39 searched runs: it never beat the config's own setting by the margin of
    :func:`pick`), so it cost a quarter of the search for nothing; since :func:`pick` only
    replaces the config's setting with the best one, removing a setting never chosen
    leaves every one of those choices as it was."""
    keep = dict(keep or {})
    options = {
        "body": {"base_lr": base_lr},
        "all": {"base_lr": 0.6 * base_lr, "lr_mult": 1.0, "train_bn": True, "head_epochs": 0},
    }
    out: dict[str, dict[str, Any]] = {HEAD_ONLY: {}}
    for changes in options.values():
        changes = {k: v for k, v in changes.items() if k not in keep}
        ran = {"lr_mult": lr_mult, "train_bn": False, **keep, **changes}
        scope = "all" if ran["lr_mult"] == 1 and ran["train_bn"] else "body"
        label = f"{scope} {changes['base_lr']:g} x{ran['lr_mult']:g}"
        label += " from the start" if changes.get("head_epochs") == 0 else ""
        out[label + (", norms trained" if ran["train_bn"] else "")] = changes
    return out


def apply(config: Any, epochs: int, changes: Mapping[str, Any]) -> tuple[Any, int]:
    """The :class:`FineTuneConfig` (``search`` off) and epochs that run candidate
    ``changes`` of :func:`candidates` with ``config``'s ``head_epochs + epochs`` epochs in
    all: the head alone for every epoch (``{}``); no head stage and every epoch a body
    epoch (``head_epochs`` 0 among the changes); else the head stage, then ``epochs``."""
    config = config.replace(search=False)
    if not changes:
        return config.replace(head_epochs=config.head_epochs + epochs), 0
    if changes.get("head_epochs") == 0:
        return config.replace(**changes), config.head_epochs + epochs
    return config.replace(**changes), epochs


def holdout_split(data: Any, seed: int | None) -> tuple[Any, Any] | None:
    """``data`` (anything :func:`netgraft.fit` takes) split at random into four fifths to
    train on and one fifth held out (the same transforms as the training data: augmented
    data is scored augmented), as datasets, or as DataLoaders with the loader's own
    settings. None when it cannot be split: an iterable dataset, a loader with its own
    sampler or batch sampler, or fewer than :data:`MIN_EXAMPLES` examples."""
    found = _splits(data, seed, count=1)
    return None if found is None else found[0]


def folds(data: Any, seed: int | None) -> list[tuple[Any, Any]] | None:
    """The (train, held-out) pairs the search scores on: a seeded order cut into five
    parts, the first held out as in :func:`holdout_split`, then the next ones in turn
    while fewer than :data:`MIN_SCORED` examples are held out in all (one pair from 500
    examples, three at 200, all five, every example scored once, under 100). None when
    ``data`` cannot be split (see :func:`holdout_split`)."""
    return _splits(data, seed, count=None)


def _splits(data: Any, seed: int | None, count: int | None) -> list[tuple[Any, Any]] | None:
    """``count`` (train, held-out) pairs of :func:`folds`' parts (None: as many as
    :func:`folds` holds out), or None when ``data`` cannot be split."""
    data = to_data(data)
    loader = data if isinstance(data, DataLoader) else None
    dataset: Dataset = loader.dataset if loader is not None else data
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return None
    if loader is not None and (
        loader.batch_size is None
        or type(loader.sampler) not in (SequentialSampler, RandomSampler)
        or type(loader.batch_sampler) is not BatchSampler
    ):
        return None
    n = len(dataset)
    if n < MIN_EXAMPLES:
        return None
    held = max(1, round(HOLDOUT * n))
    if count is None:
        count = min(FOLDS, math.ceil(MIN_SCORED / held))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed or 0)).tolist()
    # part i held out: order[bounds[i]:bounds[i + 1]]; part 0 is the single holdout's fifth
    bounds = [0, held] + [held + round(i * (n - held) / (FOLDS - 1)) for i in range(1, FOLDS)]
    out = []
    for i in range(count):
        out_of = set(order[bounds[i] : bounds[i + 1]])
        parts = (
            Subset(dataset, [j for j in range(n) if j not in out_of]),
            Subset(dataset, sorted(out_of)),
        )
        out.append(parts if loader is None else _as_loaders(loader, parts))
    return out


def _as_loaders(loader: DataLoader, parts: tuple[Subset, Subset]) -> tuple[Any, Any]:
    """The two parts as DataLoaders with ``loader``'s settings (the held-out part in order)."""
    settings = {
        "batch_size": loader.batch_size,
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "worker_init_fn": loader.worker_init_fn,
    }
    return (
        DataLoader(parts[0], shuffle=True, drop_last=loader.drop_last, **settings),
        DataLoader(parts[1], shuffle=False, **settings),
    )


def size(data: Any) -> int:
    """How many examples ``data`` (a dataset or a DataLoader over one) holds."""
    return len(data.dataset) if isinstance(data, DataLoader) else len(data)


def score(model: nn.Module, held: Any, loss: Any, batch_size: int) -> dict[str, float]:
    """``model``'s mean loss on the held-out part and, for class targets (integers), its
    accuracy, rounded to 6 digits; evaluated on the device the model's parameters are on."""
    run = RunOptions(device=device_of(model), progress=False)
    metrics = ("acc",) if _class_targets(held) else ()
    found = evaluate(model, held, loss=loss, metrics=metrics, batch_size=batch_size, run=run)
    return {
        k: round(float(found[k]), 6)
        for k in ("acc", "loss") if k in found and not math.isnan(found[k])
    }  # fmt: skip


def _class_targets(held: Any) -> bool:
    """Whether the held-out targets are class indices (integers) rather than values."""
    data = held.dataset if isinstance(held, DataLoader) else held
    _, target = split_batch(default_collate([data[0]]))
    return isinstance(target, torch.Tensor) and not target.is_floating_point()


def _rank(found: dict[str, float]) -> tuple[float, float]:
    """Higher is better: the accuracy first, then the lower loss."""
    return found.get("acc", 0.0), -found.get("loss", math.inf)


def pool(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """One score from the :func:`score` of each held-out part and its size: every metric
    averaged over the examples (rounded to 6 digits), as if scored in one pass."""
    total = sum(n for _, n in parts)
    keys = set.intersection(*(set(found) for found, _ in parts))
    return {k: round(sum(found[k] * n for found, n in parts) / total, 6) for k in sorted(keys)}


def pick(
    scores: Mapping[str, dict[str, float]], prior: str, held_out: int
) -> tuple[str, dict[str, Any]]:
    """The label to train with, given every setting's held-out :func:`score` (label ->
    score) over ``held_out`` examples in all.

    The config's own setting (``prior``) stands unless the held-out data clearly says
    otherwise: the best setting (higher accuracy, then lower loss) replaces it only when its
    accuracy is higher by more than one standard error of a held-out accuracy at its
    widest, ``sqrt(0.25 / held_out)`` (0.11 on 20 examples, 0.05 on 100). Choosing among
    a few settings on a few held-out examples otherwise picks noise: on the suite's 10
    examples per class, taking the best trial outright on one fifth did worse than the
    fixed setting (mean regret 0.048 against 0.039). Without accuracy (a regression) the
    lowest loss."""
    scores = dict(scores)
    best = max(scores, key=lambda label: _rank(scores[label]))
    if "acc" in scores[prior]:
        margin = math.sqrt(0.25 / max(held_out, 1))
        if scores[best]["acc"] - scores[prior]["acc"] <= margin:
            best = prior
    log.info("fine_tune search: %s (held-out %s)", best, scores)
    return best, scores
