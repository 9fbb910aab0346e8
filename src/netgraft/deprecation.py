"""Old spellings kept working: one warning per old spelling and process, naming the new one.

A renamed argument or function stays accepted as an alias; the first use of each warns with
a :class:`DeprecationWarning` that says what to write instead and points at the first line
outside netgraft (the user's call); later uses are silent. :func:`legacy` declares a
function's old keyword spellings and :func:`renamed_function` keeps an old function name;
both list what they keep in :data:`LEGACY`, which ``tests/test_api_conventions.py`` calls
one by one. A function that forwards keywords to another (``fine_tune`` to ``fit``) warns
for the old spellings it forwards with :func:`warn_old_keywords`. This module never changes
what the old spelling does.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["LEGACY", "legacy", "renamed_function", "warn_deprecated", "warn_old_keywords"]

F = TypeVar("F", bound=Callable[..., Any])

LEGACY: dict[str, dict[str, str]] = {}
"""Every old keyword spelling :func:`legacy` keeps: ``{"fit": {"quiet": "run=..."}}``; a
renamed function is listed under ``"<module>"`` as ``{old name: new name}``."""

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


def warn_old_keywords(where: str, spellings: Mapping[str, str], given: Iterable[str]) -> None:
    """Warn (:func:`warn_deprecated`) for each keyword in ``given`` that ``spellings`` (old
    spelling -> new, as :func:`legacy` takes them) lists, as ``where(old=...)``; a function
    forwarding keywords to another passes that one's ``LEGACY`` entry."""
    for old in given:
        if old in spellings:
            new = spellings[old]
            warn_deprecated(f"{where}({old}=...)", new if "=" in new else f"{new}=...")


def legacy(**spellings: str) -> Callable[[F], F]:
    """Let a function accept old keyword spellings: ``@legacy(at="after")`` renames
    ``at=`` to ``after=``; a spelling whose new form is not a parameter of the function
    (``quiet="run=RunOptions(progress=...)"``) reaches its ``**legacy`` catch-all, which
    must fold it in. Each old spelling warns (:func:`warn_deprecated`). When that catch-all is
    named ``legacy_kwargs`` it takes nothing else: a keyword that is neither a parameter nor
    a known old spelling raises ``TypeError``, as Python would (another catch-all, such as
    ``**fit_kwargs``, passes other keywords on)."""

    def wrap(fn: F) -> F:
        params = inspect.signature(fn).parameters
        strict = "legacy_kwargs" in params or not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )
        name = fn.__qualname__.replace(".__init__", "")
        LEGACY[name] = dict(spellings)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            given = [k for k in kwargs if k in spellings and k not in params]
            warn_old_keywords(name, spellings, given)
            for old in given:
                new = spellings[old]
                if new in params:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old}= and {new}=; give {new}=")
                    kwargs[new] = kwargs.pop(old)
            unknown = [k for k in kwargs if k not in params and k not in spellings]
            if unknown and strict:
                raise TypeError(f"{name}() got an unexpected keyword argument {unknown[0]!r}")
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def renamed_function(fn: F, old: str) -> F:
    """``fn`` under its old name ``old``: the same call, warning once that ``old`` is
    deprecated in favour of ``fn``'s own name."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        warn_deprecated(f"{old}()", f"{fn.__name__}()")
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = old
    call.__doc__ = f"Deprecated name of :func:`{fn.__name__}` (same arguments, same result)."
    LEGACY.setdefault("<module>", {})[old] = fn.__name__
    return call  # type: ignore[return-value]
