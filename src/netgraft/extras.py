"""Optional dependencies (trainers, PEFT, GGUF, ...): one clear error naming the extra to install.

This module never imports a trainer unless asked to.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import NetgraftError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(NetgraftError, ImportError):
    """An integration was imported without the optional dependency it wraps."""


def require(module: str, extra: str, integration: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` saying which netgraft extra
    installs it (``pip install 'netgraft[EXTRA]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{integration} needs {module.split('.')[0]}, which is not installed; "
            f"install it with pip install 'netgraft[{extra}]'"
        ) from exc
