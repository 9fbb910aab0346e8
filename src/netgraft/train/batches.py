"""What training does with one batch, and :func:`evaluate` / :func:`predict` built from the
same pieces.

A batch is ``(inputs, targets)`` or a Hugging Face style dict with ``labels``; the model's
predictions are its output tensor, or the ``logits`` of an output object or dict, or the
first tensor of a tuple. Losses are named (``"cross_entropy"``, ``"mse"``) or functions;
metrics are ``"acc"``, ``"topK"`` or functions ``(out, y)``. Running sums weight every
batch by its size, so an epoch's mean does not depend on how the data was batched. This
module never steps an optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import as_dataset, split_example, to_device
from ..deprecation import legacy
from ..errors import NetgraftError
from ..layers import evaluating
from ..options import RunOptions, run_options

__all__ = [
    "Metric",
    "accumulate",
    "evaluate",
    "loss_fn",
    "make_loader",
    "means",
    "metric_fns",
    "predict",
    "predictions",
    "resolve_device",
    "split_batch",
    "to_data",
]

Metric = str | Callable[[torch.Tensor, torch.Tensor], Any]


def to_data(data: Any) -> Dataset | DataLoader:
    """A DataLoader as it is; anything else as a dataset (:func:`netgraft.data.as_dataset`)."""
    return data if isinstance(data, DataLoader) else as_dataset(data)


def make_loader(data: Dataset | DataLoader, batch_size: int, sampler: Sampler | None) -> DataLoader:
    """A DataLoader over ``data`` in ``sampler``'s order (a DataLoader is used as it is)."""
    if isinstance(data, DataLoader):
        return data
    # a dedicated generator keeps DataLoader from drawing its worker seed from the global RNG
    return DataLoader(
        data, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(0)
    )


def resolve_device(device: Any) -> torch.device:
    """``device`` as a torch device; CUDA when available if ``None``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of a training batch: :func:`netgraft.data.split_example`, where
    the targets are required: a pair, or a dict whose ``labels`` are the targets."""
    if isinstance(batch, dict) and "labels" not in batch:
        raise NetgraftError("a dict batch needs a 'labels' entry with the targets")
    if isinstance(batch, dict) or (isinstance(batch, (list, tuple)) and len(batch) == 2):
        return split_example(batch)
    raise NetgraftError(
        "expected batches of (inputs, targets) or dicts with 'labels'; "
        f"found {type(batch).__name__}{f' of {len(batch)} items' if isinstance(batch, (list, tuple)) else ''}"
    )


def predictions(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's predictions for ``inputs`` (a dict is passed as keyword arguments)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise NetgraftError(f"cannot find the predictions in the model output ({type(out).__name__})")


def metric_fns(metrics: Iterable[Metric]) -> dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    """Each metric by the name its logs use: ``acc``, ``topK`` or the function's name."""
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {}
    for m in metrics:
        if callable(m):
            fns[getattr(m, "__name__", type(m).__name__)] = m
        elif m in ("acc", "accuracy"):
            fns["acc"] = lambda out, y: (out.argmax(-1) == y).float().mean()
        elif isinstance(m, str) and m.startswith("top") and m[3:].isdigit():
            k = int(m[3:])
            fns[m] = lambda out, y, k=k: (
                (out.topk(min(k, out.shape[-1]), -1).indices == y.unsqueeze(-1))
                .any(-1)
                .float()
                .mean()
            )
        else:
            raise NetgraftError(f"unknown metric {m!r}; use 'acc', 'topK' or a function(out, y)")
    return fns


def loss_fn(loss: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function: cross-entropy by default, ``"mse"``, or ``loss`` itself."""
    if loss is None or loss == "cross_entropy":
        return nn.CrossEntropyLoss()
    if loss == "mse":
        return nn.MSELoss()
    if callable(loss):
        return loss
    raise NetgraftError(f"unknown loss {loss!r}; use 'cross_entropy', 'mse' or a function")


def accumulate(
    sums: dict[str, float],
    loss: torch.Tensor,
    out: torch.Tensor,
    y: torch.Tensor,
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]],
) -> None:
    """Add one batch's loss and metrics, weighted by its size, to the running ``sums``."""
    n = int(y.shape[0]) if y.ndim else 1
    sums["n"] = sums.get("n", 0) + n
    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
    with torch.no_grad():
        for name, fn in fns.items():
            sums[name] = sums.get(name, 0.0) + float(fn(out.detach(), y)) * n


def means(sums: dict[str, float]) -> dict[str, float]:
    """The mean of every running sum (NaN when no example was seen)."""
    n = sums.get("n", 0)
    return {k: (v / n if n else math.nan) for k, v in sums.items() if k != "n"}


@legacy(device="run=RunOptions(device=...)")
def evaluate(
    model: nn.Module,
    data: Any,
    *,
    loss: Any = None,
    metrics: Sequence[Metric] = ("acc",),
    batch_size: int = 64,
    run: RunOptions | None = None,
    **legacy_kwargs: Any,
) -> dict[str, float]:
    """Mean loss and metrics of ``model`` over ``data`` (a dataset, ``(x, y)`` tensors or
    arrays, or a DataLoader) in inference mode; the model's train/eval modes are restored.
    ``run`` (:class:`~netgraft.RunOptions`) gives the device (None: CUDA when available);
    the old ``device=`` still works and warns."""
    loader = make_loader(to_data(data), batch_size, None)
    fns, score = metric_fns(metrics), loss_fn(loss)
    device = resolve_device(run_options(run, legacy_kwargs).device)
    sums: dict[str, float] = {}
    with evaluating(model), torch.no_grad():
        for batch in loader:
            x, y = split_batch(to_device(batch, device, non_blocking=True))
            out = predictions(model, x)
            accumulate(sums, score(out, y), out, y, fns)
    return {**means(sums), "n": sums.get("n", 0)}


@legacy(device="run=RunOptions(device=...)")
def predict(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    k: int = 5,
    run: RunOptions | None = None,
    **legacy_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` softmax probabilities and class indices of ``model`` for a batch of
    inputs, in inference mode (the model's train/eval modes are restored), on ``run``'s
    device (:class:`~netgraft.RunOptions`; the old ``device=`` still works and warns)."""
    device = resolve_device(run_options(run, legacy_kwargs).device)
    with evaluating(model), torch.no_grad():
        probs = predictions(model, to_device(inputs, device, non_blocking=True)).softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return top.values.cpu(), top.indices.cpu()
