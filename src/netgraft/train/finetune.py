"""Fine-tuning schedules: train the head first, then unfreeze with discriminative rates.

:func:`fine_tune` is fastai's one-line happy path built from pieces a user can also call
one by one (:func:`netgraft.train_only`, :func:`netgraft.fit`, :func:`netgraft.unfreeze`,
:func:`netgraft.param_groups`). Frozen norm layers follow the ``bn`` policy at every
stage; parameters outside the current stage are never handed to the optimizer, so they
get no momentum or weight-decay update. This module never changes the architecture.

Example::

    >>> netgraft.replace_head(model, num_classes=10)
    >>> history = netgraft.fine_tune(model, train, val, head_epochs=1, epochs=3,
    ...                              unfreeze="gradual")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import nn

from ..errors import NetgraftError
from ..freeze import freeze, train_only
from ..freeze import unfreeze as unfreeze_layers
from ..heads import find_head, find_heads
from ..layers import blocks, head_block_index, is_norm
from ..select import Selector, select
from .history import History
from .loop import fit

__all__ = ["Stage", "fine_tune", "head_name", "hold", "schedule", "with_batch_norms"]

UNFREEZE_MODES = ("all", "gradual")


def head_name(model: nn.Module) -> str:
    """The dotted name of the model's head (see :func:`netgraft.find_head`)."""
    return find_head(model)[0]


def head_names(model: nn.Module, head: str | None = None) -> list[str]:
    """``[head]`` when given, else every head of the model (:func:`netgraft.find_heads`: both
    of a distilled DeiT, which the head stage must train together)."""
    return [head] if head else [name for name, _ in find_heads(model)]


def _top_block(selectors: list[list[str]], heads: list[str]) -> int:
    """The index of the first block holding a head."""
    return min(head_block_index(selectors, h) for h in heads)


class Stage(NamedTuple):
    """One stage of a fine-tuning schedule: its ``name`` (``"head"``, ``"unfreeze BLOCK"``,
    ``"all"``), the layer names it trains (``trainable``; None: every layer), and the rate
    ``lr`` spread over blocks by ``lr_mult`` (None: ``lr`` for every block)."""

    name: str
    trainable: list[str] | None
    lr: float
    lr_mult: float | None


def schedule(
    model: nn.Module,
    epochs: int,
    *,
    head_epochs: int,
    unfreeze: str,
    base_lr: float,
    lr_mult: float,
    head_lr: float | None = None,
    head: str | None = None,
) -> list[Stage]:
    """The :class:`Stage` of every epoch of ``fine_tune(model, epochs=epochs, ...)`` with
    these arguments (``head_epochs + epochs`` entries), for trainers that run the schedule
    epoch by epoch (:mod:`netgraft.integrations`)."""
    if unfreeze not in UNFREEZE_MODES:
        raise NetgraftError(
            f"unfreeze must be one of {', '.join(UNFREEZE_MODES)}; found {unfreeze!r}"
        )
    heads = head_names(model, head)
    out = [Stage("head", heads, head_lr or base_lr, None)] * head_epochs
    lr = base_lr / 2
    if unfreeze == "gradual":
        found = blocks(model)
        selectors = [[n for n in b.layer_names if n] for b in found]
        top = _top_block(selectors, heads)
        for first in range(top - 1, max(top - 1 - epochs, -1), -1):
            names = [n for names in selectors[first:] for n in names] + heads
            out.append(Stage(f"unfreeze {found[first].name}", names, lr, lr_mult))
    return out + [Stage("all", None, lr, lr_mult)] * (head_epochs + epochs - len(out))


def hold(model: nn.Module, trainable: Selector | None, bn: str, keep_frozen: Selector) -> None:
    """Train only ``trainable`` (every layer when None), ``keep_frozen`` kept frozen; frozen
    norm layers follow ``bn`` (see :func:`netgraft.freeze`)."""
    if trainable is None:
        unfreeze_layers(model)
    else:
        train_only(model, trainable, bn=bn)
    if keep_frozen is not None:
        freeze(model, keep_frozen, bn=bn)


class _Stages:
    """Runs the stages of one fine-tuning: each holds the trainable part, then calls
    :func:`fit` with the shared arguments; the rows go into one history."""

    def __init__(
        self,
        model: nn.Module,
        data: tuple[Any, Any],
        bn: str,
        keep_frozen: Selector,
        seed: int | None,
        fit_kwargs: dict[str, Any],
    ):
        self.model, self.data, self.bn, self.keep_frozen = model, data, bn, keep_frozen
        self.seed, self.fit_kwargs = seed, fit_kwargs
        self.history = History()
        self.index = 0

    def hold(self, trainable: Selector | None) -> None:
        """Train only ``trainable`` (everything when None), ``keep_frozen`` kept frozen."""
        hold(self.model, trainable, self.bn, self.keep_frozen)

    def run(self, name: str, n_epochs: int, **kwargs: Any) -> None:
        """Fit ``n_epochs`` epochs as stage ``name`` (nothing when ``n_epochs <= 0``)."""
        if n_epochs <= 0:
            return
        options = dict(self.fit_kwargs)
        if options.get("cache") is True and name != "head":
            # cache=True insists for the head stage; later stages may have nothing frozen
            options["cache"] = "auto"
        part = fit(
            self.model,
            *self.data,
            epochs=n_epochs,
            seed=None if self.seed is None else self.seed + self.index,
            stage=name,
            **kwargs,
            **options,
        )
        self.history.extend(part, stage=name)
        self.index += 1


def with_batch_norms(model: nn.Module, keep_frozen: Selector, head: Selector = None) -> Selector:
    """``keep_frozen`` plus every norm layer with running statistics (BatchNorm, tracked
    InstanceNorm) outside ``head``: what :func:`fine_tune` keeps frozen unless ``train_bn``."""
    in_head = set(select(model, head)) if head is not None else set()
    found = [
        name
        for name, m in model.named_modules()
        if is_norm(m) and getattr(m, "running_mean", None) is not None
        and name not in in_head and not any(name.startswith(h + ".") for h in in_head)
    ]  # fmt: skip
    if not found:
        return keep_frozen
    if keep_frozen is None:
        return found
    return [*keep_frozen, *found] if isinstance(keep_frozen, list) else [keep_frozen, *found]


def fine_tune(
    model: nn.Module,
    train: Any,
    val: Any = None,
    *,
    epochs: int,
    head_epochs: int = 1,
    base_lr: float = 1e-4,
    head_lr: float | None = 3e-3,
    lr_mult: float = 10,
    unfreeze: str = "all",
    bn: str = "eval",
    train_bn: bool = False,
    head: str | None = None,
    keep_frozen: Selector = None,
    scheduler: Any = "onecycle",
    callbacks: Sequence[Any] = (),
    seed: int | None = None,
    **fit_kwargs: Any,
) -> History:
    """Fine-tune ``model`` in place: train only its head for ``head_epochs`` at ``head_lr``
    (None: ``base_lr``), then ``epochs`` more with lower rates spread over blocks from
    ``base_lr / 2 / lr_mult`` (first block) to ``base_lr / 2`` (top).

    ``unfreeze="all"`` unfreezes everything at once; ``"gradual"`` adds one block per
    epoch from the top (ULMFiT), then trains all of it for the epochs left. ``keep_frozen``
    (a selector) stays frozen throughout; frozen norm layers follow ``bn``. Batch norms
    (norm layers with running statistics) outside the head stay frozen too, in every stage,
    unless ``train_bn`` (:func:`with_batch_norms`); LayerNorm and GroupNorm unfreeze with
    the rest. Other keyword arguments go to :func:`netgraft.fit` (``optimizer``,
    ``batch_size``, ``cache``, ...). Returns one :class:`History` whose rows carry their
    ``stage``.

    The defaults (AdamW, ``head_lr=3e-3``, ``base_lr=1e-4``, ``lr_mult=10``, onecycle,
    batch norms frozen) were chosen by measurement (``bench/finetune_defaults.py``: ImageNet
    MobileNetV2 on 200 digit images, the demo's MNIST CNN on 150 digits, MiniLM on 256
    speech passages; 3 seeds): with them unfreezing kept what the head stage had learnt
    (MobileNetV2 0.81 after the head, 0.84 at the end; the CNN 0.89, 0.90; MiniLM 0.68,
    0.68), while the previous ones (1e-3 throughout, ``lr_mult=100``, batch norms
    training) took MobileNetV2 from 0.68 to 0.21. Training batch norms on a few small
    batches undoes the head most (0.29 at ``base_lr=3e-4``, against 0.76 with them frozen);
    ``base_lr`` 3e-4 or more costs too.
    """
    if unfreeze not in UNFREEZE_MODES:
        raise NetgraftError(
            f"unfreeze must be one of {', '.join(UNFREEZE_MODES)}; found {unfreeze!r}"
        )
    if "resume" in fit_kwargs:
        raise NetgraftError("fine_tune cannot resume; resume a stage with fit(..., resume=folder)")
    heads = head_names(model, head)
    if not train_bn:
        keep_frozen = with_batch_norms(model, keep_frozen, heads)
    shared = {"scheduler": scheduler, "callbacks": callbacks, **fit_kwargs}
    stages = _Stages(model, (train, val), bn, keep_frozen, seed, shared)
    stages.hold(heads)
    stages.run("head", head_epochs, lr=head_lr or base_lr)
    lr = base_lr / 2
    done = _unfreeze_gradually(stages, heads, epochs, lr, lr_mult) if unfreeze == "gradual" else 0
    if unfreeze == "all" or done < epochs:
        stages.hold(None)
        stages.run("all", epochs - done, lr=lr, lr_mult=lr_mult)
    return stages.history


def _unfreeze_gradually(
    stages: _Stages, heads: list[str], epochs: int, lr: float, lr_mult: float
) -> int:
    """One epoch per block below the head, adding a block each time from the top; returns
    the epochs run."""
    model = stages.model
    selectors = [[n for n in b.layer_names if n] for b in blocks(model)]
    top = _top_block(selectors, heads)
    done = 0
    while done < epochs and top - done - 1 >= 0:
        first = top - done - 1
        stages.hold([n for names in selectors[first:] for n in names] + heads)
        stages.run(f"unfreeze {blocks(model)[first].name}", 1, lr=lr, lr_mult=lr_mult)
        done += 1
    return done
