"""Every attribute netgraft leaves on a user's module, in one place.

netgraft never asks for a base class, so what it must remember about a module (its recipe,
how a frozen norm layer is held, which modules growth added, ...) is stored in that
module's ``__dict__`` under the names listed here. A mark is plain Python state: it is not
a parameter, buffer or submodule, so it never enters ``state_dict``, never changes what the
module computes, and is copied along by ``copy.deepcopy``. Each operation that leaves a mark
documents it below; nothing else in netgraft writes to a module's ``__dict__``.

This module imports nothing from netgraft and never interprets the values it stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "ALL",
    "CUT_AT",
    "GROWN",
    "LAYER_ORDER",
    "NORM_HOOKS",
    "NORM_POLICY",
    "NORM_STATS",
    "INFERENCE",
    "RECIPE",
    "STAY_IN_EVAL",
    "Mark",
]


@dataclass(frozen=True)
class Mark:
    """One attribute netgraft stores in a module's ``__dict__``: its name and what it means."""

    attr: str
    meaning: str

    def get(self, module: nn.Module, default: Any = None) -> Any:
        """The value marked on ``module`` itself (never inherited from a class), or ``default``."""
        return module.__dict__.get(self.attr, default)

    def set(self, module: nn.Module, value: Any) -> None:
        """Mark ``module`` with ``value``, bypassing ``nn.Module.__setattr__`` so a module value
        is never registered as a submodule."""
        module.__dict__[self.attr] = value

    def clear(self, module: nn.Module, default: Any = None) -> Any:
        """Remove the mark from ``module``; return what it held (``default`` if unmarked)."""
        return module.__dict__.pop(self.attr, default)


RECIPE = Mark(
    "_netgraft_recipe",
    "the model's netgraft.recipe.Recipe: its base spec and the surgery applied since "
    "(set by load_model / set_base, appended to by every recorded operation)",
)
NORM_POLICY = Mark(
    "_netgraft_norm_policy",
    'how a frozen norm layer is held: "eval" or "frozen" (set by freeze / train_only, '
    "cleared by unfreeze)",
)
NORM_HOOKS = Mark(
    "_netgraft_norm_hooks",
    'the forward hook handles that restore the statistics of a norm layer held "frozen"',
)
NORM_STATS = Mark(
    "_netgraft_stats",
    'the buffers of a norm layer held "frozen", saved before a training-mode forward and '
    "put back after it (present only during that forward)",
)
STAY_IN_EVAL = Mark(
    "train",
    'a norm layer held "eval" (or a module held in inference mode) gets its own ``train`` method, which '
    "keeps it in inference mode whatever mode is asked for (removed by unfreeze)",
)
INFERENCE = Mark(
    "_netgraft_inference",
    "True on a module whose parameters are all frozen (or a parameter-free module inside "
    "one), held in inference mode so the frozen part computes a deterministic function (set "
    "and cleared by freeze / unfreeze / train_only / load_frozen_state)",
)
LAYER_ORDER = Mark(
    "_netgraft_order",
    "the layer execution order traced on an example input, with a key of the module "
    "structure it was traced on (a changed model no longer uses it)",
)
CUT_AT = Mark(
    "_netgraft_cut_at",
    "on the two halves netgraft.cut returns: the dotted name of the module they were cut at",
)
GROWN = Mark(
    "_netgraft_grown",
    "True on a module a growth operation (deepen, expand_blocks) added, so "
    "grown_modules can list it",
)

ALL = (
    RECIPE,
    NORM_POLICY,
    NORM_HOOKS,
    NORM_STATS,
    STAY_IN_EVAL,
    INFERENCE,
    LAYER_ORDER,
    CUT_AT,
    GROWN,
)
