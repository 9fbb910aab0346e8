"""Fine-tuning schedules: train the head first, then unfreeze with discriminative rates.

:func:`fine_tune` is fastai's one-line happy path built from pieces a user can also call
one by one (:func:`netgraft.train_only`, :func:`netgraft.fit`, :func:`netgraft.unfreeze`,
:func:`netgraft.param_groups`). Frozen norm layers follow the ``bn`` policy at every
stage; parameters outside the current stage are never handed to the optimizer, so they
get no momentum or weight-decay update. This module never changes the architecture.

Example::

    >>> netgraft.replace_head(model, num_classes=10)
    >>> history = netgraft.fine_tune(model, train, val, head_epochs=1, epochs=3,
    ...                              base_lr=1e-3, unfreeze="gradual")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import NetgraftError
from ..freeze import freeze, train_only
from ..freeze import unfreeze as unfreeze_layers
from ..layers import blocks, ordered_layer_modules
from ..select import Selector
from .history import History
from .loop import fit

__all__ = ["fine_tune", "head_name"]

log = logging.getLogger("netgraft.train")
UNFREEZE_MODES = ("all", "gradual")


def head_name(model: nn.Module) -> str:
    """The dotted name of the model's head (see :func:`netgraft.find_head`)."""
    try:
        from ..heads import find_head
    except ImportError:
        find_head = None
    if find_head is not None:
        found = find_head(model)
        if isinstance(found, str):
            return found
        if isinstance(found, tuple) and found and isinstance(found[0], str):
            return found[0]
        name = getattr(found, "name", None)
        if isinstance(name, str):
            return name
    linears = [n for n, m in ordered_layer_modules(model) if isinstance(m, nn.Linear)]
    if not linears:
        raise NetgraftError(
            f"cannot find the head of {type(model).__name__}: it has no Linear layer; "
            "pass head='NAME'"
        )
    return linears[-1]


def _block_selectors(model: nn.Module) -> list[list[str]]:
    return [[n for n in b.layer_names if n] for b in blocks(model)]


def _head_block(selectors: list[list[str]], head: str) -> int:
    for i, names in enumerate(selectors):
        if any(head == n or head.startswith(n + ".") or n.startswith(head + ".") for n in names):
            return i
    return len(selectors) - 1


def fine_tune(
    model: nn.Module,
    train: Any,
    val: Any = None,
    *,
    epochs: int,
    head_epochs: int = 1,
    base_lr: float = 1e-3,
    head_lr: float | None = None,
    lr_mult: float = 100,
    unfreeze: str = "all",
    bn: str = "eval",
    head: str | None = None,
    keep_frozen: Selector = None,
    scheduler: Any = "onecycle",
    callbacks: Sequence[Any] = (),
    seed: int | None = None,
    **fit_kwargs: Any,
) -> History:
    """Fine-tune ``model`` in place: train only its head for ``head_epochs`` at ``head_lr``
    (default ``base_lr``), then ``epochs`` more with lower rates spread over blocks from
    ``base_lr / 2 / lr_mult`` (first block) to ``base_lr / 2`` (top).

    ``unfreeze="all"`` unfreezes everything at once; ``"gradual"`` adds one block per
    epoch from the top (ULMFiT), then trains all of it for the epochs left. ``keep_frozen``
    (a selector) stays frozen throughout; frozen norm layers follow ``bn``. Other keyword
    arguments go to :func:`netgraft.fit` (``optimizer``, ``batch_size``, ``cache``, ...).
    Returns one :class:`History` whose rows carry their ``stage``.
    """
    if unfreeze not in UNFREEZE_MODES:
        raise NetgraftError(
            f"unfreeze must be one of {', '.join(UNFREEZE_MODES)}; found {unfreeze!r}"
        )
    if "resume" in fit_kwargs:
        raise NetgraftError("fine_tune cannot resume; resume a stage with fit(..., resume=folder)")
    head = head or head_name(model)
    history = History()
    stage_index = 0

    def stage(name: str, n_epochs: int, **kwargs: Any) -> None:
        nonlocal stage_index
        if n_epochs <= 0:
            return
        options = dict(fit_kwargs)
        if options.get("cache") is True and name != "head":
            # cache=True insists for the head stage; later stages may have nothing frozen
            options["cache"] = "auto"
        part = fit(
            model,
            train,
            val,
            epochs=n_epochs,
            scheduler=scheduler,
            callbacks=callbacks,
            seed=None if seed is None else seed + stage_index,
            stage=name,
            **kwargs,
            **options,
        )
        history.extend(part, stage=name)
        stage_index += 1

    def hold(trainable: Selector | None) -> None:
        if trainable is None:
            unfreeze_layers(model)
        else:
            train_only(model, trainable, bn=bn)
        if keep_frozen is not None:
            freeze(model, keep_frozen, bn=bn)

    hold(head)
    stage("head", head_epochs, lr=head_lr or base_lr)
    lr = base_lr / 2
    if unfreeze == "all":
        hold(None)
        stage("all", epochs, lr=lr, lr_mult=lr_mult)
        return history
    selectors = _block_selectors(model)
    top = _head_block(selectors, head)
    done = 0
    while done < epochs and top - done - 1 >= 0:
        first = top - done - 1
        hold([n for names in selectors[first:] for n in names] + [head])
        stage(f"unfreeze {blocks(model)[first].name}", 1, lr=lr, lr_mult=lr_mult)
        done += 1
    if done < epochs:
        hold(None)
        stage("all", epochs - done, lr=lr, lr_mult=lr_mult)
    return history
