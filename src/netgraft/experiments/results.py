"""Deprecated: moved to :mod:`netgraft.results`; this alias warns once."""

import warnings

from ..results import *  # noqa: F403
from ..results import __all__  # noqa: F401

warnings.warn(
    "netgraft.experiments.results moved to netgraft.results; import it from there",
    FutureWarning,
    stacklevel=2,
)
