"""Random-transform detection: is a dataset's pipeline random, so that caching what a
network computes from it would freeze one augmentation forever?

:func:`random_transforms` finds augmentations by name (torchvision, timm and
albumentations style: ``Random*``, ``ColorJitter``, ``RandAugment``, ...) anywhere inside a
dataset's transforms, subsets and concatenated parts; :func:`reads_differ` catches the
random pipelines this module does not know by name by reading one example under several
seeds. This module never changes a dataset and never leaves the global random streams
changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..data import input_of
from ..rng import forked, seed_everything

__all__ = ["random_transforms", "reads_differ"]

# torchvision / timm / albumentations-style transforms whose output changes from call to
# call; every class whose name starts with "Random" (RandomApply, RandomErasing, ...) too
_RANDOM_TRANSFORMS = frozenset(
    {
        "ColorJitter",
        "RandAugment",
        "AutoAugment",
        "TrivialAugmentWide",
        "AugMix",
        "GaussianBlur",
        "GaussianNoise",
        "ElasticTransform",
        "ScaleJitter",
        "MixUp",
        "CutMix",
        "JPEG",
    }
)
_LEAVES = (str, bytes, int, float, bool, type(None), torch.Tensor, np.ndarray, Path)


def _is_random_transform(obj: Any) -> bool:
    name = type(obj).__name__
    return name.startswith("Random") or name in _RANDOM_TRANSFORMS


def _children(obj: Any) -> list[Any]:
    """Objects a transform or dataset holds that may themselves be transforms or datasets."""
    if isinstance(obj, (list, tuple)):
        return list(obj) if len(obj) <= 64 else []  # long lists are samples, not transforms
    if isinstance(obj, dict):
        return list(obj.values()) if len(obj) <= 64 else []
    if isinstance(obj, nn.Module):  # torchvision.transforms.v2 composes are modules
        return (
            list(obj._modules.values())
            + [v for k, v in vars(obj).items() if not k.startswith("_") and not callable(v)]
            + [getattr(obj, "transforms", None)]
        )
    try:
        attrs = vars(obj)
    except TypeError:
        return []
    return list(attrs.values())


def random_transforms(dataset: Any) -> list[str]:
    """Names of the random transforms (torchvision/timm augmentations: ``Random*``,
    ``ColorJitter``, ``RandAugment``, ...) anywhere inside ``dataset``'s transforms, its
    subsets and concatenated parts; empty when the pipeline looks deterministic."""
    found: list[str] = []
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if depth > 8 or isinstance(obj, _LEAVES) or id(obj) in seen:
            return
        seen.add(id(obj))
        if _is_random_transform(obj):
            found.append(type(obj).__name__)
        for child in _children(obj):
            walk(child, depth + 1)

    walk(dataset, 0)
    return list(dict.fromkeys(found))


def reads_differ(dataset: Dataset) -> bool:
    """Whether reading the first example under different seeds gives different inputs (a
    random pipeline this module does not know by name)."""
    if isinstance(dataset, TensorDataset) or len(dataset) == 0:  # type: ignore[arg-type]
        return False
    reads = []
    with forked():
        for seed in (1, 2, 3):
            seed_everything(seed)
            reads.append(input_of(dataset[0]))
    first = reads[0]
    return any(not _same(first, other) for other in reads[1:])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    return a == b
