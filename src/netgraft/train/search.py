"""Choosing how much of the body to train, on a held-out part of the training data.

No fixed fine-tuning setting holds on every task (``bench/suite.py``: the body's rate that
wins on text loses on small grey images, and training batch norms collapses some sources),
so :func:`netgraft.fine_tune` with ``FineTuneConfig(search=True)`` (the default) tries a
few settings on four fifths of the training data, scores each on the fifth held out, and
then fine-tunes on all the training data with the winner. The user's validation data is
never used to choose. This module splits the data and scores; :mod:`.finetune` runs the
trials.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .batches import evaluate, to_data

__all__ = ["HOLDOUT", "MIN_EXAMPLES", "candidates", "holdout_split", "pick", "score", "size"]

log = logging.getLogger("netgraft")

HOLDOUT = 0.2
# below this many training examples the held-out part is too small to choose anything
MIN_EXAMPLES = 20

HEAD_ONLY = "head only"


def candidates(base_lr: float, lr_mult: float) -> dict[str, dict[str, Any]]:
    """The settings the search compares, by label, as :class:`FineTuneConfig` changes
    (``{}`` for the head alone): the head alone; the config's own body rates; the body at
    0.3 times them; and everything at one rate (``0.6 * base_lr``, i.e. ``0.3 * base_lr``
    for every block after halving) with batch norms trained. At the defaults: the head,
    ``base_lr`` 1e-3 ×10, 3e-4 ×10, and 3e-4 everywhere with norms trained."""
    return {
        HEAD_ONLY: {},
        f"body {base_lr:g} x{lr_mult:g}": {"base_lr": base_lr},
        f"body {0.3 * base_lr:g} x{lr_mult:g}": {"base_lr": 0.3 * base_lr},
        f"all {0.3 * base_lr:g}, norms trained": {
            "base_lr": 0.6 * base_lr, "lr_mult": 1.0, "train_bn": True,
        },
    }  # fmt: skip


def holdout_split(data: Any, seed: int | None) -> tuple[Any, Any] | None:
    """``data`` (anything :func:`netgraft.fit` takes) split at random into four fifths to
    train on and one fifth held out, as datasets (a DataLoader's own dataset, batch size
    and collate function kept). None when it cannot be split: an iterable dataset, a
    loader with its own sampler, or fewer than :data:`MIN_EXAMPLES` examples."""
    data = to_data(data)
    loader = data if isinstance(data, DataLoader) else None
    dataset: Dataset = loader.dataset if loader is not None else data
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return None
    if loader is not None and type(loader.sampler).__name__ not in (
        "SequentialSampler", "RandomSampler",
    ):  # fmt: skip
        return None
    n = len(dataset)
    if n < MIN_EXAMPLES:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed or 0)).tolist()
    held = max(1, round(HOLDOUT * n))
    parts = Subset(dataset, sorted(order[held:])), Subset(dataset, sorted(order[:held]))
    if loader is None:
        return parts
    return tuple(
        DataLoader(p, batch_size=loader.batch_size, shuffle=i == 0, collate_fn=loader.collate_fn)
        for i, p in enumerate(parts)
    )  # type: ignore[return-value]


def size(data: Any) -> int:
    """How many examples ``data`` (a dataset or a DataLoader over one) holds."""
    return len(data.dataset) if isinstance(data, DataLoader) else len(data)


def score(model: nn.Module, held: Any, loss: Any, batch_size: int, run: Any) -> dict[str, float]:
    """``model``'s accuracy and mean loss on the held-out part (the loss alone when
    accuracy has no meaning for the task, a regression say), rounded to 6 digits."""
    try:
        found = evaluate(model, held, loss=loss, batch_size=batch_size, run=run)
    except (RuntimeError, ValueError, IndexError):
        found = evaluate(model, held, loss=loss, metrics=(), batch_size=batch_size, run=run)
    return {
        k: round(float(found[k]), 6)
        for k in ("acc", "loss") if k in found and not math.isnan(found[k])
    }  # fmt: skip


def _rank(found: dict[str, float]) -> tuple[float, float]:
    """Higher is better: the accuracy first, then the lower loss."""
    return found.get("acc", 0.0), -found.get("loss", math.inf)


def pick(trials: dict[str, Callable[[], dict[str, float]]]) -> tuple[str, dict[str, Any]]:
    """Run every trial (label -> a function training a copy and returning its
    :func:`score`) and return the best label (higher accuracy, then lower loss; the first
    listed on a tie) with every score."""
    scores = {label: trial() for label, trial in trials.items()}
    best = max(scores, key=lambda label: _rank(scores[label]))
    log.info("fine_tune search: %s (held-out %s)", best, scores)
    return best, scores
