"""The fine-tuning schedule driven epoch by epoch inside another trainer's loop.

:class:`FineTuneSchedule` is what the Lightning and Hugging Face callbacks share: it runs
the stages of :func:`netgraft.fine_tune` (head first, then every block at once or one
block per epoch from the top; :func:`netgraft.train.finetune.schedule`) on a model and an
optimizer the trainer owns. The optimizer holds one group per block (see
:func:`netgraft.param_groups`) with *every* parameter from the start, frozen ones
included: a frozen parameter has no gradient, so the optimizer never touches it, and a
block that is unfrozen later is already in the optimizer and the learning-rate scheduler.
The group structure never changes, so a trainer restoring an optimizer from a checkpoint
finds the same groups in a resumed run as in the uninterrupted one.

A stage sets the trainable layers (:func:`netgraft.train_only`, frozen norm layers held
per ``bn``; batch norms outside the head stay frozen unless ``train_bn``, as in
``fine_tune``) and each group's rate: the stage's rate spread over blocks, 0 for a group whose
parameters are all frozen. A ``LambdaLR`` scheduler (every Hugging Face schedule) keeps
scaling the new rates; other schedulers continue from them. Unlike ``fine_tune``, which
builds a fresh optimizer per stage, the optimizer state carries across stages.

This module imports no trainer; it never changes the model's weights.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import NetgraftError
from ..freeze import NORM_POLICIES
from ..layers import blocks
from ..optim import block_rates, group_lrs, param_groups
from ..select import Selector, select
from ..train.finetune import (
    UNFREEZE_MODES,
    Stage,
    fine_tune,
    head_names,
    hold,
    schedule,
    with_batch_norms,
)

__all__ = ["FineTuneSchedule", "default_lr_mult", "fine_tune_default", "target_module"]

# schedulers that keep a per-group copy of the rates they were built with, which the
# stage's rates cannot update consistently
_UNSUPPORTED_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


def fine_tune_default(name: str) -> Any:
    """The default of ``fine_tune``'s argument ``name``, so the integrations follow it."""
    return inspect.signature(fine_tune).parameters[name].default


def default_lr_mult() -> float:
    """``fine_tune``'s default ``lr_mult``."""
    return fine_tune_default("lr_mult")


def default_body_ratio() -> float:
    """How much lower than the head stage's rate the later stages' ``lr`` is by default:
    ``fine_tune``'s ``base_lr / head_lr`` defaults (1 when ``head_lr`` defaults to None)."""
    head_lr = fine_tune_default("head_lr")
    return fine_tune_default("base_lr") / head_lr if head_lr else 1.0


def target_module(module: nn.Module) -> nn.Module:
    """The module a schedule acts on: ``module``, or while it owns no parameters itself and
    exactly one child holds parameters, that child (a LightningModule's ``self.model``)."""
    while not any(True for _ in module.parameters(recurse=False)):
        holders = [c for c in module.children() if any(True for _ in c.parameters())]
        if len(holders) != 1:
            break
        module = holders[0]
    return module


def unwrap(obj: Any, attr: str) -> Any:
    """The torch object inside a trainer's wrapper (Accelerate's ``AcceleratedOptimizer``
    and ``AcceleratedScheduler`` hold it as ``optimizer`` / ``scheduler``)."""
    while obj is not None and hasattr(obj, attr):
        obj = getattr(obj, attr)
    return obj


class FineTuneSchedule:
    """The stages of one fine-tuning run inside a trainer; see the module docstring.

    ``head`` (a selector; the model's head by default) trains alone for ``head_epochs`` at
    ``head_lr`` (None: the optimizer's own rate); then ``unfreeze="all"`` trains every
    layer, ``"gradual"`` adds one block per epoch from the top, at ``lr / 2`` spread over
    blocks down to ``lr / 2 / lr_mult`` (``lr`` None: the head rate times ``fine_tune``'s
    ``base_lr / head_lr`` defaults, the measured 1/30; ``lr_mult`` None: ``fine_tune``'s).
    ``keep_frozen`` stays frozen throughout, and so do batch norms outside the head unless
    ``train_bn``; frozen norm layers follow ``bn``.
    """

    def __init__(
        self,
        head: str | None = None,
        head_epochs: int = 1,
        unfreeze: str = "all",
        lr_mult: float | None = None,
        bn: str = "eval",
        keep_frozen: Selector = None,
        lr: float | None = None,
        head_lr: float | None = None,
        train_bn: bool = False,
    ):
        if unfreeze not in UNFREEZE_MODES:
            raise NetgraftError(
                f"unfreeze must be one of {', '.join(UNFREEZE_MODES)}; found {unfreeze!r}"
            )
        if bn not in NORM_POLICIES:
            raise NetgraftError(f"bn must be one of {', '.join(NORM_POLICIES)}; found {bn!r}")
        if not isinstance(head_epochs, int) or head_epochs < 0:
            raise NetgraftError(
                f"head_epochs must be a non-negative integer; found {head_epochs!r}"
            )
        self.head, self.head_epochs, self.unfreeze = head, head_epochs, unfreeze
        self.lr_mult = default_lr_mult() if lr_mult is None else lr_mult
        self.bn, self.keep_frozen, self.lr, self.head_lr = bn, keep_frozen, lr, head_lr
        self.train_bn = train_bn
        self.model: nn.Module | None = None
        self.frozen: Selector = keep_frozen
        self.stages: list[Stage] = []
        self.applied: str | None = None

    def start(self, module: nn.Module, epochs: int | None, optimizer_lr: float) -> None:
        """Check the arguments against ``module`` and a run of ``epochs`` epochs (None or a
        negative number: unbounded) and plan the stages; raises :class:`SelectionError` for
        a selector that matches nothing and :class:`NetgraftError` for a schedule longer
        than the run. Changes nothing on the model."""
        model = target_module(module)
        heads = head_names(model, self.head)  # both of a distilled DeiT, as in fine_tune
        select(model, heads)
        if self.keep_frozen is not None:
            select(model, self.keep_frozen)
        bounded = epochs is not None and epochs >= 0
        if bounded and self.head_epochs >= epochs:
            raise NetgraftError(
                f"the fine-tuning schedule trains the head alone for {self.head_epochs} "
                f"epoch(s) and unfreezes after that, but the run has only {epochs} epoch(s); "
                "give the trainer more epochs or lower head_epochs"
            )
        after = epochs - self.head_epochs if bounded else len(blocks(model))
        self.model = model
        keep = self.keep_frozen
        self.frozen = keep if self.train_bn else with_batch_norms(model, keep, heads)
        head_lr = self.head_lr or optimizer_lr
        self.stages = schedule(
            model,
            after,
            head_epochs=self.head_epochs,
            unfreeze=self.unfreeze,
            base_lr=self.lr or head_lr * default_body_ratio(),
            head_lr=head_lr,
            lr_mult=self.lr_mult,
            head=self.head,
        )

    def stage(self, epoch: int) -> Stage:
        """The stage of ``epoch`` (0-based); past the planned epochs, the last stage."""
        return self.stages[min(max(epoch, 0), len(self.stages) - 1)]

    def by_name(self, name: str) -> Stage:
        """The planned stage called ``name`` (a checkpoint's record of the applied stage)."""
        for s in self.stages:
            if s.name == name:
                return s
        raise NetgraftError(
            f"the checkpoint was taken in fine-tuning stage {name!r}, which this schedule does "
            f"not have ({', '.join(dict.fromkeys(s.name for s in self.stages))}); resume with "
            "the same FineTune arguments"
        )

    def groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer groups over every parameter of the model, one per block (two with
        ``weight_decay``: biases and norms get none), each with its ``block`` index; the
        rates are set by :meth:`apply`."""
        assert self.model is not None, "start() first"
        out = param_groups(self.model, 0.0, weight_decay=weight_decay, include_frozen=True)
        index = {b.name: b.index for b in blocks(self.model)}
        for g in out:
            g["block"] = index[g["name"].removesuffix(" (no decay)")]
        return out

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` already holds this schedule's groups over every parameter."""
        assert self.model is not None, "start() first"
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        return all("block" in g for g in optimizer.param_groups) and ids == {
            id(p) for p in self.model.parameters()
        }

    def regroup(self, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        """Replace the groups of a fresh ``optimizer`` with :meth:`groups` (its weight decay
        kept) and fit ``scheduler`` to them; refused for a scheduler with per-group copies of
        the rates (OneCycleLR, CyclicLR)."""
        if isinstance(scheduler, _UNSUPPORTED_SCHEDULERS):
            raise NetgraftError(
                f"{type(scheduler).__name__} keeps its own per-group rates, which the fine-tuning "
                "stages cannot set; use a LambdaLR-style scheduler (LambdaLR, a transformers "
                "get_*_schedule, StepLR, CosineAnnealingLR) or none"
            )
        decay = max((g.get("weight_decay", 0.0) for g in optimizer.param_groups), default=0.0)
        optimizer.param_groups.clear()
        optimizer.state.clear()
        for g in self.groups(decay):
            optimizer.add_param_group(g)
        if scheduler is None:
            return
        n = len(optimizer.param_groups)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None and len(lambdas) != n:
            if len({id(f) for f in lambdas}) != 1:
                raise NetgraftError(
                    f"{type(scheduler).__name__} has {len(lambdas)} different lambdas; FineTune "
                    "needs one lambda for every group"
                )
            scheduler.lr_lambdas = [lambdas[0]] * n
        if hasattr(scheduler, "min_lrs") and len(scheduler.min_lrs) != n:
            scheduler.min_lrs = [scheduler.min_lrs[0]] * n
        scheduler.base_lrs = [0.0] * n
        scheduler._last_lr = [0.0] * n

    def rates(self, stage: Stage) -> list[float]:
        """The rate of every block in ``stage``."""
        assert self.model is not None, "start() first"
        return block_rates(len(blocks(self.model)), stage.lr, lr_mult=stage.lr_mult)

    def apply(
        self,
        stage: Stage,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
    ) -> None:
        """Hold ``stage``'s trainable layers and give each group its rate (0 when all of its
        parameters are frozen), in the scheduler too."""
        assert self.model is not None, "start() first"
        hold(self.model, stage.trainable, self.bn, self.frozen)
        rates = self.rates(stage)
        for i, g in enumerate(optimizer.param_groups):
            rate = rates[g["block"]] if any(p.requires_grad for p in g["params"]) else 0.0
            g["initial_lr"] = rate
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs[i] = rate
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                rate *= scheduler.lr_lambdas[i](scheduler.last_epoch)
            g["lr"] = rate
        if scheduler is not None and hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        for p in self.model.parameters():
            if not p.requires_grad:
                p.grad = None  # a stale gradient would let the optimizer move a frozen one
        self.applied = stage.name

    def advance(self, epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> bool:
        """Apply the stage of ``epoch`` when it is not the one applied; whether it changed."""
        stage = self.stage(epoch)
        if stage.name == self.applied:
            return False
        self.apply(stage, optimizer, scheduler)
        return True

    def current_rates(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The current learning rate of every group, by group name."""
        return group_lrs(optimizer)
