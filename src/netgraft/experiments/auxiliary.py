"""Deprecated: the small reference models moved to :mod:`netgraft.models` and the
experiments to ``bench/reuse_experiments.py``; this alias keeps the models and warns once."""

import warnings

from ..models import digits_cnn, mnist_cnn, text_cnn, tokenize

__all__ = ["digits_cnn", "mnist_cnn", "text_cnn", "tokenize"]

warnings.warn(
    "netgraft.experiments.auxiliary moved: the models to netgraft.models, the experiments "
    "to bench/reuse_experiments.py",
    FutureWarning,
    stacklevel=2,
)
