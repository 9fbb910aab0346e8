"""Head-only training on cached features, for any trainer.

:func:`cached_head` freezes everything but the head, cuts the model before it
(:func:`netgraft.cut`) and runs the frozen part once over the data
(:class:`netgraft.FeatureCache`), as ``fit`` does for its head stage
(:func:`netgraft.train.cached.plan`). What comes back is a module and datasets a Lightning
``LightningModule`` or a Hugging Face ``Trainer`` can train on: the module's parameters
*are* the model's own head parameters, so training it trains the model.

Example::

    >>> part, train_cached, val_cached = cached_head(model, (x, y), (x_val, y_val))
    >>> trainer.fit(LitClassifier(part), DataLoader(train_cached, batch_size=32))
    >>> model(x_val).argmax(1)  # the whole model uses the trained head

This module never changes the model's weights; it freezes all but the head.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from ..cache import FeatureCache
from ..data import as_dataset
from ..freeze import train_only
from ..heads import head_names
from ..train.cached import plan

__all__ = ["CachedHead", "cached_head"]


class CachedHead(NamedTuple):
    """What :func:`cached_head` returns: the trainable ``model`` (the part after the cut,
    sharing its parameters with the whole model), the cached ``train`` dataset of
    ``(features, label)`` in the original order, the cached ``val`` (None when not given
    or not cacheable) and the ``cut_point``."""

    model: nn.Module
    train: FeatureCache
    val: FeatureCache | None
    cut_point: str


def cached_head(
    model: nn.Module,
    train: Any,
    val: Any = None,
    *,
    head: str | None = None,
    bn: str = "eval",
    **cache_options: Any,
) -> CachedHead:
    """Freeze every layer of ``model`` but ``head`` (its heads by default; frozen norm layers
    follow ``bn``), cut it before the head and cache ``train`` (and ``val``) through the
    frozen part: a :class:`CachedHead`. ``train``/``val`` are datasets or ``(inputs,
    targets)``; ``cache_options`` go to :func:`netgraft.train.cached.plan` (``cache_dir``,
    ``dtype``, ``augment_copies``, ``batch_size``). Raises :class:`CacheError` saying why
    when no frozen, deterministic part can be cut off before the head.
    """
    train_only(model, head_names(model, head), bn=bn)
    val_data = None if val is None else as_dataset(val)
    found = plan(model, as_dataset(train), cache=True, val=val_data, **cache_options)
    assert found is not None  # cache=True raises rather than returning None
    return CachedHead(found.model, found.train, found.val, found.cut_point)
