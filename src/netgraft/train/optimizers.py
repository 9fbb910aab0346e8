"""The optimizer and learning-rate scheduler ``fit`` builds from their names.

The optimizer is built over :func:`netgraft.param_groups` (trainable parameters only, one
group per block, no weight decay on norms and biases), so frozen parameters never get a
momentum or weight-decay update. Schedulers step once per batch. This module never
trains anything.

:class:`Optimization` groups how the weights are updated beyond the rate itself (which
optimizer, the schedule, weight decay, discriminative rates, gradient clipping, data
order): ``fit(..., lr=1e-3, optimizer=Optimization("sgd", scheduler="cosine"))``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import NetgraftError
from ..optim import param_groups

__all__ = ["SCHEDULERS", "Optimization", "make_optimizer", "make_scheduler"]


@dataclass
class Optimization:
    """How :func:`netgraft.fit` updates the weights, beside ``lr`` (the rate of the top
    block): pass it as ``fit(..., optimizer=Optimization(...))``. Unlike
    :class:`netgraft.RunOptions` these change what is computed.

    - ``name``: ``"adamw"``, ``"adam"``, ``"sgd"`` (momentum 0.9), a function of the
      parameter groups returning an optimizer (the groups come from
      :func:`netgraft.param_groups`, trainable parameters only), or an optimizer instance
      (then fit takes no ``lr``).
    - ``scheduler``: None or ``"constant"``, ``"cosine"`` (annealing to zero),
      ``"onecycle"``, or a function ``(optimizer, total_steps) -> scheduler``; it steps
      every batch.
    - ``weight_decay``: decoupled for AdamW, L2 for SGD; never on norms and biases.
    - ``lr_mult``: discriminative rates, geometric from ``lr / lr_mult`` (first block) to
      ``lr`` (top); ``layer_decay``: ``lr * layer_decay ** depth below the top`` (give one
      of the two).
    - ``max_grad_norm``: clip the gradients' global norm to this before each step.
    - ``shuffle``: a new order of the examples every epoch, drawn from the run's seed
      (False: the order given).
    """

    name: str | Callable[..., Any] | torch.optim.Optimizer = "adamw"
    scheduler: Any = None
    weight_decay: float = 0.0
    lr_mult: float | None = None
    layer_decay: float | None = None
    max_grad_norm: float | None = None
    shuffle: bool = True


OPTIMIZATION_FIELDS = tuple(f.name for f in dataclasses.fields(Optimization) if f.name != "name")


def optimization(optimizer: Any, **fields: Any) -> Optimization:
    """``fit``'s ``optimizer`` argument as an :class:`Optimization` (a name, factory or
    instance becomes its ``name``), with ``fields`` (Optimization fields given the old way,
    as fit's own keywords) applied over it."""
    if isinstance(optimizer, Optimization):
        return dataclasses.replace(optimizer, **fields)
    return Optimization(name=optimizer, **fields)


def make_optimizer(
    model: nn.Module,
    optimizer: Any,
    lr: float | None,
    lr_mult: float | None,
    layer_decay: float | None,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """An optimizer instance as it is (then ``lr`` must be None); else ``"adamw"``,
    ``"adam"``, ``"sgd"`` (momentum 0.9) or a function of the parameter groups, over
    :func:`netgraft.param_groups` at ``lr`` with ``lr_mult``/``layer_decay``."""
    if isinstance(optimizer, torch.optim.Optimizer):
        if lr is not None:
            raise NetgraftError("give lr or an optimizer instance, not both")
        return optimizer
    if lr is None:
        raise NetgraftError("fit needs lr= (or an optimizer instance)")
    groups = param_groups(
        model, lr, lr_mult=lr_mult, layer_decay=layer_decay, weight_decay=weight_decay
    )
    if callable(optimizer):
        return optimizer(groups)
    name = str(optimizer).lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise NetgraftError(
        f"unknown optimizer {optimizer!r}; use 'adamw', 'adam', 'sgd', an optimizer or a "
        "function(param_groups) -> optimizer"
    )


SCHEDULERS = ("constant", "cosine", "onecycle")


def make_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """None for ``None``/``"constant"``; ``"cosine"`` annealing to zero over
    ``total_steps``; ``"onecycle"`` (None when under four steps); or
    ``scheduler(optimizer, total_steps)``."""
    if scheduler is None or scheduler == "constant":
        return None
    total_steps = max(total_steps, 1)
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
    if scheduler == "onecycle":
        if total_steps < 4:  # too short for a warm-up and an annealing phase: keep the rate
            return None
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            # at least two warm-up steps: OneCycleLR divides by the warm-up length minus one
            pct_start=min(0.5, max(0.25, 2 / total_steps)),
        )
    if callable(scheduler):
        return scheduler(optimizer, total_steps)
    raise NetgraftError(
        f"unknown scheduler {scheduler!r}; use 'constant', 'cosine', 'onecycle' or a "
        "function(optimizer, total_steps) -> scheduler"
    )
