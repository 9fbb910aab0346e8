"""Old spellings kept working: one warning per old spelling and process, naming the new one.

A renamed argument or function stays accepted as an alias; the first use of each warns with
a :class:`DeprecationWarning` that says what to write instead, later uses are silent. This
module never changes what the old spelling does.
"""

from __future__ import annotations

import warnings

__all__ = ["warn_deprecated"]

_warned: set[str] = set()


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn once per process that ``old`` is deprecated and ``new`` is the spelling to use;
    ``stacklevel`` points the warning at the caller's caller (the user's line) by default."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)
