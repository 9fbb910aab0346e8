"""The exceptions netgraft raises for errors a user can cause.

Every user-facing error is a :class:`NetgraftError`; the CLI prints its message
on one line and exits non-zero. Messages say what was expected and what was found.
"""

from __future__ import annotations


class NetgraftError(Exception):
    """Base class of every error netgraft raises for bad input or impossible requests."""


class SelectionError(NetgraftError, KeyError):
    """A selector (or one item of a selector list) matched nothing or is malformed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SpecError(NetgraftError):
    """A model spec (``torchvision:NAME``, ``timm:NAME``, ``hf:PATH``, ``file.py:fn``, folder) is invalid."""


class WeightsError(NetgraftError):
    """A weights file is missing, corrupt, truncated, unsafe to unpickle or does not fit the model."""


class ShapeMismatchError(NetgraftError):
    """Tensors that should be copied have different shapes under a strict policy."""


class EquivalenceError(NetgraftError):
    """A surgery that claims to preserve the model's function changed its outputs."""


class SurgeryError(NetgraftError):
    """A surgery cannot be applied to this model at this place (and would not be exact)."""


class RecipeError(NetgraftError):
    """A recipe cannot be recorded, saved, read or replayed."""


class DataError(NetgraftError):
    """A dataset or data folder is empty, malformed or unreadable."""


class CacheError(NetgraftError):
    """A feature cache cannot be built or used for this model and data."""
