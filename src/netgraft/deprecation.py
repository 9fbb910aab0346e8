"""Old spellings kept working: one warning per old spelling and process, naming the new one.

A renamed argument or function stays accepted as an alias; the first use of each warns with
a :class:`DeprecationWarning` that says what to write instead and points at the first line
outside netgraft (the user's call); later uses are silent. This module never changes what
the old spelling does.
"""

from __future__ import annotations

import inspect
import os
import warnings

__all__ = ["warn_deprecated"]

_warned: set[str] = set()
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside netgraft, for ``warnings.warn`` called
    by :func:`warn_deprecated` (level 1: warn_deprecated itself)."""
    frame, level = inspect.currentframe(), 0
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return max(level, 1)


def warn_deprecated(old: str, new: str) -> None:
    """Warn once per process that ``old`` is deprecated and ``new`` is the spelling to use,
    pointing at the first line outside netgraft."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(
        f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=_outside_stacklevel()
    )
