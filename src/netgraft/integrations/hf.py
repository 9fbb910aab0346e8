"""netgraft's fine-tuning schedule inside the Hugging Face ``Trainer``.

:class:`FineTuneCallback` runs the stages of :func:`netgraft.fine_tune` (head first, then
all blocks or one block per epoch from the top, at rates spread over blocks) through
``Trainer.train()``, fixing what the Trainer gets wrong on its own:

- frozen norm layers stay in eval mode although the Trainer calls ``model.train()`` every
  step (transformers issue 24479): :func:`netgraft.freeze` gives them a ``train`` that
  keeps inference mode;
- parameters unfrozen mid-run reach the optimizer and the scheduler (transformers 20029):
  the optimizer holds one group per block over every parameter from the start, frozen ones
  included (no gradient, so never updated), and the scheduler scales every group;
- layer-wise rates need no subclass (transformers 10140), and every group's rate is added to
  the Trainer's logs as ``lr/<block>``.

Example::

    >>> from netgraft.integrations.hf import FineTuneCallback
    >>> ft = FineTuneCallback(netgraft.FineTuneConfig(head_epochs=1, unfreeze="gradual"))
    >>> trainer = Trainer(model, args, train_dataset=train, callbacks=[ft],
    ...                   optimizers=ft.optimizers(model, args))
    >>> trainer.train()

Without ``optimizers=``, the callback regroups the Trainer's own optimizer when training
begins (fine for a fresh run; resuming from a Trainer checkpoint needs the factory, since
the Trainer loads the optimizer's state before any callback runs). Needs
``pip install 'netgraft[hf]'``; this module never changes the model's weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..train.finetune import FineTuneConfig
from .cached import cached_head
from .extras import require
from .schedule import callback_schedule, unwrap

_transformers = require("transformers", "hf", "netgraft.integrations.hf")

__all__ = ["CachedHeadModel", "FineTuneCallback", "cached_head_for_trainer"]


class FineTuneCallback(_transformers.TrainerCallback):
    """Fine-tune the Trainer's model in stages, with the same arguments as
    :class:`netgraft.integrations.lightning.FineTune`.

    ``config`` (a :class:`netgraft.FineTuneConfig`; None: the defaults, the same as
    :func:`netgraft.fine_tune`'s) says what to do: the head trains alone for
    ``config.head_epochs`` epochs, then ``unfreeze="all"`` trains everything and
    ``"gradual"`` adds one block per epoch from the top (then everything), at rates spread
    over blocks by ``lr_mult``; ``keep_frozen`` and (unless ``train_bn``) batch norms outside
    the head stay frozen, frozen norm layers follow ``bn``. With ``lr_from_optimizer`` (the
    default) the head trains at ``TrainingArguments.learning_rate`` and later stages at that
    rate times the config's ``base_lr / head_lr``; with False, at the config's own rates.
    ``config.scheduler`` is not used: the Trainer's ``lr_scheduler_type`` is. A selector
    that matches nothing or ``head_epochs`` not shorter than the run fails at
    ``on_train_begin``. The config's fields and the old ``lr`` / ``head_lr`` are also
    accepted as keyword arguments: deprecated spellings that warn once.
    """

    def __init__(
        self,
        config: FineTuneConfig | None = None,
        *,
        lr_from_optimizer: bool = True,
        **deprecated: Any,
    ):
        self.schedule = callback_schedule("FineTuneCallback", config, lr_from_optimizer, deprecated)

    def optimizers(
        self, model: nn.Module, args_or_lr: Any, *, optimizer: Any = torch.optim.AdamW
    ) -> tuple[torch.optim.Optimizer, None]:
        """``(optimizer, None)`` for ``Trainer(optimizers=...)``: ``optimizer`` (a class taking
        ``params, lr, **kwargs``; AdamW by default) over one group per block of ``model``,
        every parameter included, configured from ``TrainingArguments`` (rate, weight decay,
        Adam betas and epsilon) or a plain rate. The Trainer builds its scheduler
        (``lr_scheduler_type``) over these groups; the callback sets their rates."""
        if isinstance(args_or_lr, (int, float)):
            lr, options = float(args_or_lr), {}
        else:
            args = args_or_lr
            lr, options = args.learning_rate, {"weight_decay": args.weight_decay}
            if issubclass(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                options.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        self.schedule.start(model, None, lr)
        groups = self.schedule.groups(options.get("weight_decay", 0.0))
        return optimizer(groups, lr=lr, **options), None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check the arguments against the model and the run, regroup the optimizer if the
        factory did not build it, and hold the stage of the current epoch."""
        model = kwargs["model"]
        opt, sched = (
            unwrap(kwargs["optimizer"], "optimizer"),
            unwrap(kwargs["lr_scheduler"], "scheduler"),
        )
        self.schedule.start(model, int(state.num_train_epochs), args.learning_rate)
        if not self.schedule.owns(opt):
            self.schedule.regroup(opt, sched)
        self.schedule.applied = None
        self.schedule.advance(_epoch(state), opt, sched)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Enter the stage of this epoch when it differs from the one held."""
        opt, sched = (
            unwrap(kwargs["optimizer"], "optimizer"),
            unwrap(kwargs["lr_scheduler"], "scheduler"),
        )
        self.schedule.advance(_epoch(state), opt, sched)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Add the current rate of every group to the logs and the Trainer's log history."""
        opt = unwrap(kwargs.get("optimizer"), "optimizer")
        if opt is None or logs is None:
            return
        rates = {f"lr/{k}": v for k, v in self.schedule.current_rates(opt).items()}
        logs.update(rates)
        # the Trainer appends a copy of the logs to its history before calling back
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(rates)


def _epoch(state: Any) -> int:
    """The 0-based epoch the Trainer is in or about to start (``state.epoch`` counts
    fractions of epochs done)."""
    # the end of an epoch is stored as ``epoch + steps / steps``, which can fall a hair short
    return int((state.epoch or 0) + 1e-6)


class CachedHeadModel(nn.Module):
    """The trainable part of :func:`netgraft.integrations.cached_head` as a Trainer model:
    ``forward(features, labels=None)`` returns ``{"logits", "loss"}`` (cross-entropy)."""

    def __init__(self, part: nn.Module):
        super().__init__()
        self.part = part

    def forward(self, features: Any, labels: torch.Tensor | None = None) -> dict[str, Any]:
        """Logits of the cached features, and their loss when ``labels`` are given."""
        logits = self.part(features)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class _AsRecords(torch.utils.data.Dataset):
    """A dataset of ``(features, label)`` as the Trainer's ``{"features", "labels"}``."""

    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        features, label = self.data[index]
        return {"features": features, "labels": label}


def cached_head_for_trainer(
    model: nn.Module, train: Any, val: Any = None, **options: Any
) -> tuple[CachedHeadModel, Any, Any]:
    """:func:`netgraft.integrations.cached_head` ready for ``Trainer(model, args,
    train_dataset, eval_dataset)``: ``(CachedHeadModel, cached train, cached val or None)``
    whose parameters are ``model``'s own head. ``options`` go to ``cached_head``."""
    found = cached_head(model, train, val, **options)
    cached_val = None if found.val is None else _AsRecords(found.val)
    return CachedHeadModel(found.model), _AsRecords(found.train), cached_val
