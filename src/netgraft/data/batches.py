"""Examples and batches: datasets from tensors, (inputs, targets) of a batch, moving to a device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import DataError


def as_dataset(data: Any) -> torch.utils.data.Dataset:
    """A dataset from a dataset (returned as is) or ``(inputs, targets)`` tensors or numpy
    arrays of the same length; floating arrays become float32, integer targets int64."""
    if isinstance(data, torch.utils.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (_as_tensor(v) for v in data)
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"inputs and targets must have the same length; found {x.shape[0]} inputs and "
                f"{y.shape[0]} targets"
            )
        if x.shape[0] == 0:
            raise DataError("the dataset is empty (0 examples)")
        return torch.utils.data.TensorDataset(x, y)
    raise DataError(
        "expected a torch Dataset or (inputs, targets) tensors / numpy arrays; "
        f"found {type(data).__name__}"
    )


def split_example(example: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of an example or batch: a tuple or list ``(inputs, targets,
    ...)``, a dict whose ``labels`` are the targets (Hugging Face style), or inputs alone
    (targets ``None``)."""
    if isinstance(example, dict) and "labels" in example:
        return {k: v for k, v in example.items() if k != "labels"}, example["labels"]
    if isinstance(example, (tuple, list)):
        return example[0], example[1] if len(example) > 1 else None
    return example, None


def input_of(example: Any) -> Any:
    """The input part of an example or batch: the first item of a tuple or list
    ``(inputs, targets, ...)``, a dict without its ``labels``, else the example itself."""
    return split_example(example)[0]


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it, through dicts, lists and tuples
    (their types kept); anything else is returned as it is. The one walk over a batch's
    structure (:func:`to_device`, :func:`take_rows`)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device, *, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor moved to ``device`` (:func:`map_tensors`)."""
    return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), batch)


def take_rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``batch`` (:func:`map_tensors`)."""
    return map_tensors(lambda t: t[start:stop], batch)


def _as_tensor(value: Any) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.is_floating_point() and t.dtype == torch.float64:
        t = t.float()
    elif not t.is_floating_point() and t.dtype != torch.bool:
        t = t.long()
    return t
