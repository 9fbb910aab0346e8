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
    >>> config = netgraft.FineTuneConfig(head_epochs=1, unfreeze="gradual")
    >>> trainer = lightning.Trainer(max_epochs=4, callbacks=[FineTune(config)])
    >>> trainer.fit(lit_module, train_loader)   # configure_optimizers: AdamW(self.parameters(), lr=1e-3)

The learning rate of every group is logged as ``lr/<block>`` each step. Needs
``pip install 'netgraft[lightning]'``; this module never changes the model's weights.
"""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel

from ..errors import NetgraftError
from ..train.finetune import FineTuneConfig
from .extras import require
from .schedule import callback_schedule

_pl = require("lightning.pytorch", "lightning", "netgraft.integrations.lightning")

__all__ = ["FineTune"]


class FineTune(_pl.Callback):
    """Fine-tune a LightningModule's model in stages, exactly resumable from checkpoints.

    ``config`` (a :class:`netgraft.FineTuneConfig`; None: the defaults, the same as
    :func:`netgraft.fine_tune`'s) says what to do: the head trains alone for
    ``config.head_epochs`` epochs, then ``unfreeze="all"`` trains everything and
    ``"gradual"`` adds one block per epoch from the top (then everything), at rates spread
    over blocks by ``lr_mult``; ``keep_frozen`` and (unless ``train_bn``) batch norms outside
    the head stay frozen, frozen norm layers follow ``bn``. With ``lr_from_optimizer`` (the
    default) the head trains at the rate ``configure_optimizers`` built the optimizer with,
    and later stages at that rate times the config's ``base_lr / head_lr``; with False, at
    the config's own rates. ``config.scheduler`` is not used: the module's scheduler is.

    The model is the LightningModule, or its only child holding parameters (``self.net``);
    selectors name layers inside it (``"2"``) or as ``pl_module.named_modules()`` shows them
    (``"net.2"``). ``configure_optimizers`` returns one optimizer over the module's
    parameters, with an optional scheduler of the ``LambdaLR`` kind or a chainable one (not
    OneCycleLR or CyclicLR, which keep their own per-group rates). A selector that matches
    nothing or ``head_epochs`` not shorter than ``max_epochs`` fails at ``on_fit_start``.
    The config's fields (``head_epochs=1``, ...) and the old ``lr`` / ``head_lr`` are also
    accepted as keyword arguments: deprecated spellings that warn once.
    """

    def __init__(
        self,
        config: FineTuneConfig | None = None,
        *,
        lr_from_optimizer: bool = True,
        **deprecated: Any,
    ):
        super().__init__()
        self.schedule = callback_schedule("FineTune", config, lr_from_optimizer, deprecated)
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
