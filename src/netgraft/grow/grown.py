"""Remember which modules growth operations added, so training can start with only them.

Marks live in the module's ``__dict__`` (copied by ``deepcopy``, set again when a recipe
replays); nothing here changes what a model computes.
"""

from __future__ import annotations

from torch import nn

__all__ = ["grown_modules", "mark_grown"]

_GROWN = "_netgraft_grown"


def mark_grown(module: nn.Module) -> nn.Module:
    """Mark ``module`` as added by a growth operation (listed by :func:`grown_modules`)."""
    module.__dict__[_GROWN] = True
    return module


def grown_modules(model: nn.Module) -> list[str]:
    """Names of the modules growth operations added (outermost), so that
    ``netgraft.train_only(model, netgraft.grown_modules(model))`` trains only them."""
    found = [n for n, m in model.named_modules() if m.__dict__.get(_GROWN)]
    return [n for n in found if not any(n != o and n.startswith(o + ".") for o in found)]
