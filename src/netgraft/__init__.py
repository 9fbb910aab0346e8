"""netgraft: reuse trained neural networks without breaking them.

The public API, re-exported from the modules that own each idea.
"""

import importlib.metadata

from .adapter_growth import adapt_new_blocks, expand_adapted
from .adapters import add_adapters
from .cache import FeatureCache
from .choose import AutoRGN, Suggestion, suggest, suggest_adapters
from .cut import cut
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
from .grow import (
    deepen,
    expand_blocks,
    grown_modules,
    stack_blocks,
    verify_equivalence,
    widen,
    widen_transformer,
)
from .heads import attach, find_head, find_heads, replace_head, truncate
from .layers import Block, Layer, LayerTable, blocks, layers, summary
from .optim import param_groups
from .options import RunOptions
from .pretrain import (
    AuxiliaryResult,
    AuxiliaryTask,
    LayerwiseResult,
    pretrain_auxiliary,
    pretrain_layerwise,
)
from .recipe import get_recipe, recipe_of
from .reinit import reinit
from .saved import load, save
from .select import select
from .study import StudyResult, study
from .tokenizer import load_tokenizer
from .train import (
    Callback,
    Checkpoint,
    EarlyStopping,
    FineTuneConfig,
    Grow,
    History,
    Optimization,
    ReduceLROnPlateau,
    evaluate,
    fine_tune,
    fit,
    predict,
)
from .transfer import TransferReport, transfer
from .zoo import load_model, load_weights

__version__ = importlib.metadata.version("netgraft")

__all__ = [
    "adapt_new_blocks",
    "add_adapters",
    "expand_adapted",
    "AutoRGN",
    "AuxiliaryResult",
    "AuxiliaryTask",
    "LayerwiseResult",
    "Suggestion",
    "pretrain_auxiliary",
    "suggest",
    "suggest_adapters",
    "Block",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "FineTuneConfig",
    "Grow",
    "History",
    "ReduceLROnPlateau",
    "attach",
    "evaluate",
    "find_head",
    "find_heads",
    "fine_tune",
    "fit",
    "load",
    "Optimization",
    "param_groups",
    "predict",
    "RunOptions",
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
    "StudyResult",
    "SurgeryError",
    "TransferReport",
    "WeightsError",
    "blocks",
    "cut",
    "deepen",
    "expand_blocks",
    "freeze",
    "frozen_state",
    "get_recipe",
    "recipe_of",
    "grown_modules",
    "layers",
    "load_frozen_state",
    "load_model",
    "load_tokenizer",
    "load_weights",
    "pretrain_layerwise",
    "reinit",
    "replace_head",
    "save",
    "select",
    "stack_blocks",
    "study",
    "summary",
    "train_only",
    "transfer",
    "trainable_report",
    "truncate",
    "unfreeze",
    "verify_equivalence",
    "widen",
    "widen_transformer",
]
