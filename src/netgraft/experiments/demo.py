"""Deprecated: moved to :mod:`netgraft.demo`; this alias warns once."""

import warnings

from ..demo import *  # noqa: F403
from ..demo import __all__  # noqa: F401

warnings.warn(
    "netgraft.experiments.demo moved to netgraft.demo; import it from there",
    FutureWarning,
    stacklevel=2,
)
