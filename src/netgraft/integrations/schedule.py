"""The fine-tuning schedule driven epoch by epoch inside another trainer's loop.

:class:`FineTuneSchedule` is what the Lightning and Hugging Face callbacks share: it runs
the stages :func:`netgraft.train.finetune.schedule` computes from a
:class:`netgraft.FineTuneConfig` (head first, then every block at once or one block per
epoch from the top), the stages :func:`netgraft.fine_tune` runs, on a model and an
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
builds a fresh optimizer per stage, the optimizer state carries across stages. Schedulers
are changed through their public attributes only (``base_lrs``, ``lr_lambdas``,
``min_lrs``): their ``get_last_lr()`` catches up at their next ``step()``.

This module imports no trainer; it never changes the model's weights.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..adapted import is_peft_model
from ..adapters import check_adapters
from ..deprecation import warn_deprecated
from ..errors import NetgraftError, SelectionError
from ..heads import head_names
from ..layers import blocks
from ..optim import block_rates, group_lrs, param_groups
from ..select import Selector, select
from ..train.finetune import (
    FineTuneConfig,
    Stage,
    hold,
    resolve_config,
    schedule,
    with_batch_norms,
)

__all__ = ["FineTuneSchedule", "target_module"]

# schedulers that keep a per-group copy of the rates they were built with, which the
# stage's rates cannot update consistently
_UNSUPPORTED_SCHEDULERS = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)


def target_module(module: nn.Module) -> nn.Module:
    """The module a schedule acts on: ``module``, or while it owns no parameters itself and
    exactly one child holds parameters, that child (a LightningModule's ``self.model``); a
    PEFT model is kept whole (its wrapper says what of its base trains)."""
    return _target(module)[0]


def _target(module: nn.Module) -> tuple[nn.Module, str]:
    """:func:`target_module` and its dotted name inside ``module`` ("" for itself)."""
    path: list[str] = []
    while not is_peft_model(module) and not any(
        True for _ in module.parameters(recurse=False)
    ):
        holders = [
            (name, c) for name, c in module.named_children() if any(True for _ in c.parameters())
        ]
        if len(holders) != 1:
            break
        path.append(holders[0][0])
        module = holders[0][1]
    return module, ".".join(path)


def inner_selector(model: nn.Module, selector: Selector, prefix: str) -> Selector:
    """``selector`` as names inside ``model``, which the outer module holds as ``prefix``:
    a name or range bound written as the outer module's ``named_modules()`` shows it
    (``net.2`` for ``prefix="net"``) loses ``prefix.`` unless it already matches inside
    (``2`` and ``net.2`` both work). Regex and type items are left as they are."""
    if not prefix or selector is None:
        return selector
    items = selector if isinstance(selector, list) else [selector]
    out = [_inner_item(model, item, prefix) for item in items]
    return out if isinstance(selector, list) else out[0]


def _inner_item(model: nn.Module, item: Any, prefix: str) -> Any:
    if not isinstance(item, str) or item.startswith(("re:", "type:")):
        return item
    negate = item.strip().startswith("~")
    body = item.strip()[1:] if negate else item.strip()
    inner = re.sub(rf"(^|:){re.escape(prefix)}\.", r"\1", body)
    if inner == body:
        return item
    try:
        select(model, body)
        return item
    except SelectionError:
        return f"~{inner}" if negate else inner


def fine_tune_default(name: str) -> Any:
    """Deprecated: the default of the fine-tuning setting ``name``; use
    ``getattr(netgraft.FineTuneConfig(), name)``."""
    warn_deprecated("fine_tune_default(name)", "getattr(netgraft.FineTuneConfig(), name)")
    return getattr(FineTuneConfig(), name)


def default_lr_mult() -> float:
    """Deprecated: the default ``lr_mult``; use ``netgraft.FineTuneConfig().lr_mult``."""
    warn_deprecated("default_lr_mult()", "netgraft.FineTuneConfig().lr_mult")
    return FineTuneConfig().lr_mult


def unwrap(obj: Any, attr: str) -> Any:
    """The torch object inside a trainer's wrapper (Accelerate's ``AcceleratedOptimizer``
    and ``AcceleratedScheduler`` hold it as ``optimizer`` / ``scheduler``)."""
    while obj is not None and hasattr(obj, attr):
        obj = getattr(obj, attr)
    return obj


# the callbacks' keyword arguments before FineTuneConfig, besides the config's own fields
_OLD_RATES = ("lr", "head_lr")


def callback_schedule(
    where: str, config: FineTuneConfig | None, lr_from_optimizer: bool, old: dict[str, Any]
) -> FineTuneSchedule:
    """The :class:`FineTuneSchedule` of a callback ``where`` built with ``config`` and
    ``lr_from_optimizer``, and with its old keyword arguments ``old`` (deprecated: each warns
    once). The old ``head_lr`` / ``lr`` were absolute rates: given, the config's rates are
    used as they are (``lr_from_optimizer=False``), ``lr`` as ``base_lr``."""
    rates = {k: old[k] for k in _OLD_RATES if old.get(k) is not None}
    # None was the old callbacks' spelling of "the default" for every argument
    old = {k: v for k, v in old.items() if k not in _OLD_RATES and v is not None}
    config = resolve_config(config, old, where)
    if rates:
        new = "config=FineTuneConfig(head_lr=..., base_lr=...), lr_from_optimizer=False"
        for k in rates:
            warn_deprecated(f"{where}({k}=...)", f"{where}({new})")
        head_lr = rates.get("head_lr", config.head_lr)
        base_lr = rates.get("lr", head_lr * _body_ratio(config) if head_lr else config.base_lr)
        config, lr_from_optimizer = config.replace(head_lr=head_lr, base_lr=base_lr), False
    return FineTuneSchedule(config, lr_from_optimizer=lr_from_optimizer)


def _body_ratio(config: FineTuneConfig) -> float:
    """How much lower than the head stage's rate ``base_lr`` is (1 without ``head_lr``)."""
    return config.base_lr / config.head_lr if config.head_lr else 1.0


class FineTuneSchedule:
    """The stages of one fine-tuning run inside a trainer; see the module docstring.

    ``config`` (a :class:`netgraft.FineTuneConfig`; None: the defaults) says what to do, as
    for :func:`netgraft.fine_tune`; its ``scheduler`` is not used (the trainer's scheduler
    is). With ``lr_from_optimizer`` (the default) the head stage runs at the rate the
    trainer's optimizer was built with, and the later stages at that rate times the
    config's ``base_lr / head_lr`` (its ratio kept, its scale the trainer's); without, the
    config's rates are used as they are. The old keyword arguments (the config's fields,
    ``lr``, ``head_lr``) are deprecated aliases that warn once.
    """

    def __init__(
        self,
        config: FineTuneConfig | None = None,
        *,
        lr_from_optimizer: bool = True,
        **deprecated: Any,
    ):
        if deprecated:  # the old keyword arguments, as the callbacks take them
            built = callback_schedule("FineTuneSchedule", config, lr_from_optimizer, deprecated)
            config, lr_from_optimizer = built.config, built.lr_from_optimizer
        self.config = resolve_config(config, {}, "FineTuneSchedule")
        self.lr_from_optimizer = lr_from_optimizer
        self.model: nn.Module | None = None
        self.frozen: Selector = self.config.keep_frozen
        self.stages: list[Stage] = []
        self.applied: str | None = None

    def rated(self, optimizer_lr: float) -> FineTuneConfig:
        """The config with the rates the stages use, given the optimizer's rate."""
        config = self.config
        if not self.lr_from_optimizer:
            return config
        return config.replace(head_lr=optimizer_lr, base_lr=optimizer_lr * _body_ratio(config))

    def start(self, module: nn.Module, epochs: int | None, optimizer_lr: float) -> None:
        """Check the config against ``module`` and a run of ``epochs`` epochs (None or a
        negative number: unbounded) and plan the stages; raises :class:`SelectionError` for
        a selector that matches nothing and :class:`NetgraftError` for a schedule longer
        than the run. Selectors name layers of the module the schedule acts on
        (:func:`target_module`) or, with its name first, as ``module.named_modules()`` shows
        them. Changes nothing on the model."""
        model, prefix = _target(module)
        config = self.rated(optimizer_lr).replace(
            head=inner_selector(model, self.config.head, prefix),
            keep_frozen=inner_selector(model, self.config.keep_frozen, prefix),
        )
        check_adapters(model, config.keep_frozen)
        heads = head_names(model, config.head)  # both of a distilled DeiT, as in fine_tune
        select(model, heads)
        if config.keep_frozen is not None:
            select(model, config.keep_frozen)
        bounded = epochs is not None and epochs >= 0
        if bounded and config.head_epochs >= epochs:
            raise NetgraftError(
                f"the fine-tuning schedule trains the head alone for {config.head_epochs} "
                f"epoch(s) and unfreezes after that, but the run has only {epochs} epoch(s); "
                "give the trainer more epochs or a config with fewer head_epochs"
            )
        after = epochs - config.head_epochs if bounded else len(blocks(model))
        self.model = model
        keep = config.keep_frozen
        self.frozen = keep if config.train_bn else with_batch_norms(model, keep, heads)
        self.stages = schedule(model, after, config)

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
            "the same FineTune config"
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
        hold(self.model, stage.trainable, self.config.bn, self.frozen)
        rates = self.rates(stage)
        for i, g in enumerate(optimizer.param_groups):
            rate = rates[g["block"]] if any(p.requires_grad for p in g["params"]) else 0.0
            g["initial_lr"] = rate
            if scheduler is not None and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs[i] = rate
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                rate *= scheduler.lr_lambdas[i](scheduler.last_epoch)
            g["lr"] = rate
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
