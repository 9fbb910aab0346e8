"""The optional-dependency check, which lives in :mod:`netgraft.extras` (adapters need it
too, below the integrations); re-exported here where the integrations import it."""

from __future__ import annotations

from ..extras import MissingExtraError, require

__all__ = ["MissingExtraError", "require"]
