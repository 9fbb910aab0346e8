"""Pretraining a model's body before it is reused, when no model trained on a similar task
exists: greedy layer-wise autoencoders (:mod:`~netgraft.pretrain.layerwise`) and auxiliary
tasks whose labels are cheap (:mod:`~netgraft.pretrain.auxiliary`: pairs, corruption).
Both read their data the same way (:mod:`~netgraft.pretrain.inputs`)."""

from .auxiliary import (
    AuxiliaryResult,
    AuxiliaryTask,
    make_pairs,
    patch_shuffle,
    pretrain_auxiliary,
    replace_word,
)
from .layerwise import LayerwiseResult, pretrain_layerwise

__all__ = [
    "AuxiliaryResult",
    "AuxiliaryTask",
    "LayerwiseResult",
    "make_pairs",
    "patch_shuffle",
    "pretrain_auxiliary",
    "pretrain_layerwise",
    "replace_word",
]
