"""netgraft's fine-tuning schedule inside PyTorch Lightning: the :class:`FineTune` callback.

``FineTune`` runs the stages of :func:`netgraft.fine_tune` (head first, then all blocks or
one block per epoch from the top, at rates spread over blocks) on the optimizer a
``LightningModule`` configures. At ``on_fit_start`` it regroups that optimizer into one
group per block over *every* parameter, frozen ones included (their gradient is None, so
the optimizer skips them), which is before Lightning loads the optimizer's state from a
checkpoint: the groups always match, and the callback's own state (the stage applied)
restores the trainable set. A run resumed from a checkpoint taken anywhere in the schedule
therefore continues exactly as the uninterrupted run, which Lightning's ``BaseFinetuning``
does not (Lightning issue 21901). Frozen norm layers are held in eval mode
(:func:`netgraft.freeze`), which survives the ``model.train()`` Lightning calls.

Example::

    >>> from netgraft.integrations.lightning import FineTune
    >>> trainer = lightning.Trainer(max_epochs=4,
    ...                             callbacks=[FineTune(head_epochs=1, unfreeze="gradual")])
    >>> trainer.fit(lit_module, train_loader)   # configure_optimizers: AdamW(self.parameters(), lr=1e-3)

The learning rate of every group is logged as ``lr/<block>`` each step. Needs
``pip install 'netgraft[lightning]'``; this module never changes the model's weights.
"""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel

from ..errors import NetgraftError
from ..select import Selector
from .extras import require
from .schedule import FineTuneSchedule

_pl = require("lightning.pytorch", "lightning", "netgraft.integrations.lightning")

__all__ = ["FineTune"]


class FineTune(_pl.Callback):
    """Fine-tune a LightningModule's model in stages, exactly resumable from checkpoints.

    ``head`` (a selector; the model's head by default) trains alone for ``head_epochs``
    epochs at ``head_lr`` (None: the rate the optimizer was built with); then
    ``unfreeze="all"`` trains everything and ``"gradual"`` adds one block per epoch from
    the top (then everything), at ``lr / 2`` for the top block down to
    ``lr / 2 / lr_mult`` for the first. ``lr`` None is the head rate times ``fine_tune``'s
    ``base_lr / head_lr`` defaults (1/30, measured); ``lr_mult`` None is ``fine_tune``'s.
    ``keep_frozen`` (a selector) stays frozen, and so do batch norms outside the head unless
    ``train_bn``; frozen norm layers follow ``bn`` (see :func:`netgraft.freeze`). The model is the LightningModule, or its only child holding
    parameters (``self.model``); selectors name layers inside it.

    ``configure_optimizers`` returns one optimizer over the module's parameters, with an
    optional scheduler of the ``LambdaLR`` kind or a chainable one (not OneCycleLR or
    CyclicLR, which keep their own per-group rates). A selector that matches nothing or
    ``head_epochs`` not shorter than ``max_epochs`` fails at ``on_fit_start``.
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
        super().__init__()
        self.schedule = FineTuneSchedule(
            head, head_epochs, unfreeze, lr_mult, bn, keep_frozen, lr, head_lr, train_bn
        )
        self._restored: str | None = None

    def _optimizer(self, trainer: Any) -> tuple[Any, Any]:
        """The run's one optimizer and its scheduler (None without one)."""
        if len(trainer.optimizers) != 1:
            raise NetgraftError(
                f"FineTune drives one optimizer; configure_optimizers returned "
                f"{len(trainer.optimizers)}"
            )
        opt = trainer.optimizers[0]
        scheds = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is opt]
        return opt, (scheds[0] if scheds else None)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check the arguments, regroup the optimizer by block and hold the first stage (or,
        resuming, the stage the checkpoint was taken in) before Lightning restores the
        optimizer's state."""
        _check_ddp(trainer)
        opt, sched = self._optimizer(trainer)
        self.schedule.start(pl_module, trainer.max_epochs, opt.defaults["lr"])
        self.schedule.regroup(opt, sched)
        restored, self._restored = self._restored, None
        stage = self.schedule.by_name(restored) if restored else self.schedule.stage(0)
        self.schedule.apply(stage, opt, sched)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Enter the stage of this epoch when it differs from the one held."""
        self.schedule.advance(trainer.current_epoch, *self._optimizer(trainer))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the current learning rate of every group as ``lr/<group name>``."""
        rates = self.schedule.current_rates(trainer.optimizers[0])
        pl_module.log_dict({f"lr/{k}": v for k, v in rates.items()}, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        """The stage held when the checkpoint is taken."""
        return {"applied": self.schedule.applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the checkpoint's stage; ``on_fit_start`` holds it."""
        self._restored = state_dict.get("applied")


def _check_ddp(trainer: Any) -> None:
    """Refuse, before training, a DDP that all-reduces a fixed set of parameters: the
    stages freeze and unfreeze parameters during the run, so DDP must look for unused ones
    (every process then holds the same trainable set, the schedule's)."""
    ddp = getattr(trainer.strategy, "model", None)
    if isinstance(ddp, DistributedDataParallel) and not ddp.find_unused_parameters:
        raise NetgraftError(
            "FineTune freezes and unfreezes parameters during the run, and this DDP expects "
            "every parameter to get a gradient: use strategy='ddp_find_unused_parameters_true' "
            "(or DDPStrategy(find_unused_parameters=True))"
        )
