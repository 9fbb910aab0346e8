"""netgraft: reuse trained neural networks without breaking them.

The public API, re-exported from the modules that own each idea.
"""

from .cache import FeatureCache
from .errors import (
    CacheError,
    DataError,
    EquivalenceError,
    NetgraftError,
    RecipeError,
    SelectionError,
    ShapeMismatchError,
    SpecError,
    SurgeryError,
    WeightsError,
)
from .freeze import freeze, frozen_state, load_frozen_state, train_only, trainable_report, unfreeze
from .grow import deepen, expand_blocks, grown_modules, verify_equivalence, widen
from .layers import Block, Layer, LayerTable, blocks, layers, summary
from .recipe import get_recipe
from .reinit import reinit
from .select import select
from .zoo import load_model, load_weights

__version__ = "0.1.0"

__all__ = [
    "Block",
    "CacheError",
    "DataError",
    "EquivalenceError",
    "FeatureCache",
    "Layer",
    "LayerTable",
    "NetgraftError",
    "RecipeError",
    "SelectionError",
    "ShapeMismatchError",
    "SpecError",
    "SurgeryError",
    "WeightsError",
    "blocks",
    "deepen",
    "expand_blocks",
    "freeze",
    "frozen_state",
    "get_recipe",
    "grown_modules",
    "layers",
    "load_frozen_state",
    "load_model",
    "load_weights",
    "reinit",
    "select",
    "summary",
    "train_only",
    "trainable_report",
    "unfreeze",
    "verify_equivalence",
    "widen",
]
