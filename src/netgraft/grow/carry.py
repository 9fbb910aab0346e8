"""How each parameter after a growth operation derives from the parameters before it.

Growth operations that replace a parameter (``widen``, ``widen_transformer``) describe the
new tensor here, element by element: the old element it copies (``index``, a flat index
into the old tensor) and the factor it was multiplied by (``factor``; a weight divided
among ``k`` copies has ``1/k``, or its random share). Nothing is recorded unless a caller
asked for it with :func:`tracking` (:class:`netgraft.Grow` does, to carry the optimizer's
state across the growth); outside it, :func:`record_growth` costs nothing. Parameters an
operation keeps (``deepen`` and ``expand_blocks`` keep every old one) need no record, and
parameters with no record and no predecessor are new.

This module never changes a model or an optimizer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["ParamGrowth", "is_tracking", "record_growth", "tracking"]


@dataclass(frozen=True)
class ParamGrowth:
    """``new`` replaces ``old``: ``new.flatten()[j] == factor[j] * old.flatten()[index[j]]``.

    ``grad``, when given, is the exact factor between the new element's gradient and the
    old element's gradient right after the growth (an operation that knows it records it);
    without it the factor is derived from the copies (:mod:`netgraft.train.growing`).
    """

    new: torch.Tensor
    old: torch.Tensor
    index: torch.Tensor  # int64, new's shape
    factor: torch.Tensor  # float64, new's shape
    grad: torch.Tensor | None = None  # float64, new's shape


_records: contextvars.ContextVar[list[ParamGrowth] | None] = contextvars.ContextVar(
    "netgraft_growth_records", default=None
)


@contextlib.contextmanager
def tracking() -> Iterator[list[ParamGrowth]]:
    """Collect the :class:`ParamGrowth` records of the growth operations run inside, in order."""
    records: list[ParamGrowth] = []
    token = _records.set(records)
    try:
        yield records
    finally:
        _records.reset(token)


def is_tracking() -> bool:
    """Whether a caller collects growth records (an operation can then skip building them,
    which for a large model saves memory of the grown model's size several times over)."""
    return _records.get() is not None


def record_growth(
    new: torch.Tensor,
    old: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor],
    *,
    factor: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> None:
    """Record that ``new`` is ``select(old)`` times ``factor`` (broadcast to ``new``'s shape;
    1 when None), where ``select`` only picks and arranges elements (indexing, reshaping).
    Does nothing unless inside :func:`tracking`."""
    records = _records.get()
    if records is None:
        return
    index = select(torch.arange(old.numel()).reshape(old.shape))
    shape = tuple(new.shape)
    if tuple(index.shape) != shape:
        raise ValueError(f"select gives shape {tuple(index.shape)}, the new tensor has {shape}")

    def full(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.detach().to("cpu", torch.float64).expand(shape).clone()

    scale = full(factor)
    if scale is None:
        scale = torch.ones(shape, dtype=torch.float64)
    records.append(ParamGrowth(new, old, index, scale, full(grad)))
