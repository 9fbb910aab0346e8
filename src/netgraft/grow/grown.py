"""Remember which modules growth operations added, so training can start with only them.

The mark (:data:`netgraft.marks.GROWN`) is copied by ``deepcopy`` and set again when a
recipe replays; nothing here changes what a model computes.
"""

from __future__ import annotations

from torch import nn

from .. import marks
from ..select import outermost

__all__ = ["grown_modules", "mark_grown"]


def mark_grown(module: nn.Module) -> nn.Module:
    """Mark ``module`` as added by a growth operation (listed by :func:`grown_modules`)."""
    marks.GROWN.set(module, True)
    return module


def grown_modules(model: nn.Module) -> list[str]:
    """Names of the modules growth operations added (outermost), so that
    ``netgraft.train_only(model, netgraft.grown_modules(model))`` trains only them."""
    return outermost(n for n, m in model.named_modules() if marks.GROWN.get(m))
