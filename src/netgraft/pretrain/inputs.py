"""The inputs of pretraining data, gathered into tensors: one reading for every pretraining
task, so layer-wise and auxiliary pretraining accept the same forms of data."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DataError

__all__ = ["gather_inputs"]


def gather_inputs(
    data: Any, *, second: str | None, second_required: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, second)`` of ``data``: a tensor of inputs, ``(inputs, second)`` tensors, or
    a dataset of ``inputs`` / ``(inputs, second, ...)`` items, stacked into tensors.

    ``second`` names what the second column means (``"groups"``; ``None`` when it is ignored,
    as labels are by unlabelled pretraining, and then ``None`` is returned for it);
    ``second_required`` makes its absence a :class:`DataError`. Empty data is a
    :class:`DataError` too.
    """
    missing = f"found inputs without {second}; they are needed here"
    if isinstance(data, torch.Tensor):
        if second_required:
            raise DataError(missing)
        return _nonempty(data), None
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        x = torch.as_tensor(data[0])
        if second is None:
            return _nonempty(x), None
        g = torch.as_tensor(data[1])
        if len(x) != len(g):
            raise DataError(f"found {len(x)} inputs but {len(g)} {second}; they must match")
        return _nonempty(x), g
    try:
        items = [data[k] for k in range(len(data))]
    except TypeError as exc:
        raise DataError(
            f"data must be a tensor of inputs, (inputs, {second or 'labels'}) tensors or a "
            f"dataset; found {type(data).__name__}"
        ) from exc
    if not items:
        raise DataError("the data holds no examples; pretraining needs some")
    paired = isinstance(items[0], (tuple, list))
    if second_required and not paired:
        raise DataError(missing)
    x = torch.stack([torch.as_tensor(it[0] if paired else it) for it in items])
    g = torch.as_tensor([int(it[1]) for it in items]) if paired and second is not None else None
    return x, g


def _nonempty(x: torch.Tensor) -> torch.Tensor:
    if len(x) == 0:
        raise DataError("the data holds no examples; pretraining needs some")
    return x
