"""The exceptions netgraft raises for errors a user can cause, and the helpers that phrase
their messages.

Every user-facing error is a :class:`NetgraftError`; the CLI prints its message
on one line and exits non-zero. Messages say what was expected and what was found:
:func:`closest` picks the names to suggest, :func:`key_mismatch` lists the tensors a
weights file lacks or has too many of. This module never raises by itself.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


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


def closest(word: str, candidates: Iterable[str], *, n: int = 3, always: bool = False) -> list[str]:
    """Up to ``n`` of ``candidates`` closest to ``word`` (difflib similarity of at least 0.5),
    best first. With ``always``, when none is that close: the candidates ending in the same
    dotted component, else the ``n`` nearest however far, so there is always something to
    suggest."""
    pool = [c for c in dict.fromkeys(candidates) if c]
    close = difflib.get_close_matches(word, pool, n=n, cutoff=0.5)
    if close or not always:
        return close
    tail = word.split(".")[-1]
    close = [c for c in pool if c.split(".")[-1] == tail][:n]
    return close or difflib.get_close_matches(word, pool, n=n, cutoff=0.0)


def key_mismatch(
    missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str] = ()
) -> str:
    """``"2 missing: a, b; 1 unexpected: c"``: what does not fit between a model and a weights
    file, each list shortened to four names and a count of the rest."""
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mismatched", mismatched),
    ):
        if items:
            shown = ", ".join(items[:4]) + (f" … (+{len(items) - 4})" if len(items) > 4 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    return "; ".join(parts)
