"""Named shape adapters for ``transfer(..., on_mismatch="adapt")``.

Each adapter turns a source tensor into the destination's shape by one documented rule,
tried in this order:

- ``pos_embed_2d``: a ``(1, N, D)`` position embedding whose tokens (after 0-2 prefix
  tokens such as ``cls``) form a square grid, resized bicubically on the grid;
- ``pos_embed_1d``: an ``(L, D)`` position table, resized linearly along positions;
- ``in_channels_sum``: the first convolution to 1 input channel (sum over input channels,
  so a grey image equal to each colour channel gives the same response);
- ``in_channels_repeat``: the first convolution to C input channels (source channels
  repeated cyclically, rescaled by ``source C / C`` to keep the activation scale);
- ``classifier_rows``: the head's rows for a subset of classes (``classes=[...]``);
- ``copy_into_larger`` / ``slice_from_larger`` / ``copy_overlap``: same rank, the shared
  leading block is copied and the rest of the destination keeps its initialisation.

An adapter never guesses across ranks; a pair no rule fits stays a mismatch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ADAPTERS", "adapt_tensor"]

ADAPTERS = (
    "pos_embed_2d",
    "pos_embed_1d",
    "in_channels_sum",
    "in_channels_repeat",
    "classifier_rows",
    "copy_into_larger",
    "slice_from_larger",
    "copy_overlap",
)


def _grid(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side >= 2 and side * side == n else None


def _pos_embed_2d(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor | None:
    if (
        dst.ndim != 3
        or src.ndim != 3
        or dst.shape[0] != src.shape[0]
        or dst.shape[2] != src.shape[2]
    ):
        return None
    for prefix in (0, 1, 2):
        a, b = _grid(src.shape[1] - prefix), _grid(dst.shape[1] - prefix)
        if a is None or b is None:
            continue
        head, body = src[:, :prefix], src[:, prefix:]
        dim = src.shape[2]
        grid = body.reshape(src.shape[0], a, a, dim).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(b, b), mode="bicubic", align_corners=False)
        body = grid.permute(0, 2, 3, 1).reshape(src.shape[0], b * b, dim).to(src.dtype)
        return torch.cat([head, body], dim=1)
    return None


def _pos_embed_1d(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor | None:
    if dst.ndim != 2 or src.ndim != 2 or dst.shape[1] != src.shape[1]:
        return None
    table = src.t().unsqueeze(0).float()  # (1, D, L)
    table = F.interpolate(table, size=dst.shape[0], mode="linear", align_corners=True)
    return table.squeeze(0).t().to(src.dtype)


def _in_channels(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    if dst.ndim < 3 or dst.ndim != src.ndim:
        return None
    if dst.shape[0] != src.shape[0] or dst.shape[2:] != src.shape[2:]:
        return None
    want, have = dst.shape[1], src.shape[1]
    if want == 1:
        return src.sum(dim=1, keepdim=True), "in_channels_sum"
    reps = math.ceil(want / have)
    repeated = src.repeat(1, reps, *([1] * (src.ndim - 2)))[:, :want]
    return repeated * (have / want), "in_channels_repeat"


def _overlap(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    if dst.ndim != src.ndim or dst.ndim == 0:
        return None
    out = dst.detach().clone()
    region = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape, strict=True))
    out[region] = src[region].to(out.dtype)
    if all(a >= b for a, b in zip(dst.shape, src.shape, strict=True)):
        return out, "copy_into_larger"
    if all(a <= b for a, b in zip(dst.shape, src.shape, strict=True)):
        return out, "slice_from_larger"
    return out, "copy_overlap"


def adapt_tensor(
    name: str,
    dst: torch.Tensor,
    src: torch.Tensor,
    *,
    first_conv: bool = False,
    head: bool = False,
    classes: Sequence[int] | None = None,
) -> tuple[torch.Tensor, str] | None:
    """``(tensor in dst's shape, rule name)`` for the first adapter that fits, else ``None``.

    ``first_conv`` marks the destination's first convolution, ``head`` its classifier;
    ``classes`` are the source rows the classifier keeps, in order.
    """
    local = name.rsplit(".", 1)[-1].lower()
    if "pos" in name.lower() and local not in ("running_mean", "running_var"):
        out = _pos_embed_2d(dst, src)
        if out is not None:
            return out, "pos_embed_2d"
        out = _pos_embed_1d(dst, src)
        if out is not None:
            return out, "pos_embed_1d"
    if first_conv and local == "weight":
        found = _in_channels(dst, src)
        if found is not None:
            return found
    if head and classes is not None:
        idx = torch.as_tensor(list(classes), dtype=torch.long)
        if (
            dst.shape[0] == len(idx)
            and src.shape[1:] == dst.shape[1:]
            and len(idx) > 0
            and int(idx.max()) < src.shape[0]
            and int(idx.min()) >= -src.shape[0]
        ):
            return src[idx], "classifier_rows"
    return _overlap(dst, src)
