"""Callbacks for :func:`netgraft.fit`: checkpoints, learning-rate reduction, early stopping.

A callback is any object with some of the hooks ``on_train_begin``, ``on_epoch_begin``,
``on_batch_begin``, ``on_batch_end``, ``on_epoch_end``, ``on_train_end``; each gets the
loop's :class:`~netgraft.train.TrainState` (model, optimizer, epoch, logs, ...).
Callbacks with state give ``state_dict``/``load_state_dict`` so a resumed run continues
exactly. Callbacks never print; they log through ``logging`` and the loop's reporter.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..atomic import remove_stale_tmp
from ..deprecation import legacy
from ..errors import NetgraftError
from .checkpoint import checkpoint_payload, save_checkpoint

__all__ = [
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "Monitored",
    "ReduceLROnPlateau",
    "monitored_value",
]

log = logging.getLogger("netgraft.train")


class Callback:
    """Base class with empty hooks; subclass and override the ones you need.

    Every hook gets the loop's :class:`~netgraft.train.TrainState` (model, optimizer,
    scheduler, history, epoch, step, the epoch's logs); setting ``state.stop_training = True``
    ends the run after the current epoch.
    """

    def on_train_begin(self, state: Any) -> None:
        """Called once before the first epoch (also when resuming)."""

    def on_epoch_begin(self, state: Any) -> None:
        """Called before each epoch's first batch."""

    def on_batch_begin(self, state: Any) -> None:
        """Called before each optimizer step."""

    def on_batch_end(self, state: Any) -> None:
        """Called after each optimizer step."""

    def on_epoch_end(self, state: Any) -> None:
        """Called after each epoch, once its metrics (and validation) are in the history."""

    def on_train_end(self, state: Any) -> None:
        """Called once after the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        """Plain data saved in checkpoints so a resumed run continues this callback exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        return None


def monitored_value(logs: dict[str, Any], monitor: str) -> tuple[str, float]:
    """The value of ``monitor`` in an epoch's logs; a ``val_`` metric falls back to its
    training counterpart when the run has no validation data."""
    for key in (monitor, monitor.removeprefix("val_")):
        value = logs.get(key)
        if isinstance(value, (int, float)):
            return key, float(value)
    raise NetgraftError(
        f"cannot monitor {monitor!r}: the epoch recorded "
        f"{', '.join(k for k, v in logs.items() if isinstance(v, (int, float)))}"
    )


def _wait(state: Any) -> None:
    """Let every rank of a data-parallel run wait until rank 0 has written a checkpoint."""
    barrier = getattr(state, "barrier", None)
    if barrier is not None:
        barrier()


class Monitored(Callback):
    """A callback that watches one logged value (the one helper behind
    :class:`Checkpoint`, :class:`ReduceLROnPlateau` and :class:`EarlyStopping`): ``best``
    so far and ``wait``, the epochs since it last improved by more than ``min_delta`` in
    ``mode`` (``"min"`` or ``"max"``). Both are in :meth:`state_dict`, so a resumed run
    keeps counting where it stopped."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise NetgraftError(f"mode must be 'min' or 'max'; found {mode!r}")
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.best: float | None = None
        self.wait = 0

    def observe(self, logs: dict[str, Any]) -> tuple[str, float, bool]:
        """Read the monitored value from an epoch's logs: ``(key, value, improved)``; an
        improvement becomes ``best`` and resets ``wait``, which the caller advances."""
        key, value = monitored_value(logs, self.monitor)
        if self.best is None or math.isnan(self.best):
            improved = not math.isnan(value)
        elif self.mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved:
            self.best, self.wait = value, 0
        return key, value, improved

    def state_dict(self) -> dict[str, Any]:
        """``best`` and ``wait``, for a resumed run."""
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.best = state.get("best")
        self.wait = int(state.get("wait", 0))


class Checkpoint(Monitored):
    """Save the full training state into ``out_dir``, atomically.

    ``last.pt`` is rewritten at the end of every epoch (and every ``every_steps``
    optimizer steps when given) and is what ``fit(..., run=RunOptions(resume=out_dir))``
    continues from.
    ``best.pt`` is written when ``monitor`` improves (``mode`` ``"max"`` or ``"min"``);
    with ``save_best_only=False`` every epoch is also kept as ``epoch_NNN.pt``. A
    checkpoint holds the model, optimizer, scheduler, epoch and step, the RNG states,
    the data order, the frozen state, the history and the callbacks' states
    (:mod:`netgraft.train.checkpoint` builds, writes and reads it).
    """

    @legacy(folder="out_dir")
    def __init__(
        self,
        out_dir: str | Path,
        monitor: str = "val_acc",
        mode: str = "max",
        save_best_only: bool = True,
        every_steps: int | None = None,
    ):
        super().__init__(monitor, mode)
        if every_steps is not None and every_steps < 1:
            raise NetgraftError(f"every_steps must be a positive integer; found {every_steps}")
        self.out_dir = Path(out_dir)
        self.save_best_only = save_best_only
        self.every_steps = every_steps

    @property
    def folder(self) -> Path:
        """The checkpoint folder (``out_dir``; the older name)."""
        return self.out_dir

    @property
    def last_path(self) -> Path:
        """``out_dir/last.pt``, rewritten every epoch."""
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        """``out_dir/best.pt``, written when the monitored value improves."""
        return self.out_dir / "best.pt"

    def on_train_begin(self, state: Any) -> None:
        if getattr(state, "rank", 0) == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(self.out_dir)

    def on_batch_end(self, state: Any) -> None:
        if self.every_steps and state.global_step % self.every_steps == 0 and not state.epoch_done:
            if getattr(state, "rank", 0) == 0:
                save_checkpoint(self.last_path, checkpoint_payload(state))
            _wait(state)

    def on_epoch_end(self, state: Any) -> None:
        key, value, is_best = self.observe(state.logs)
        # under a launch every rank holds the same state; rank 0 alone writes it
        if getattr(state, "rank", 0) == 0:
            self._save(state, key, value, is_best)
        _wait(state)

    def _save(self, state: Any, key: str, value: float, is_best: bool) -> None:
        # the payload is taken after best is updated so a resumed run knows the best so far
        payload = checkpoint_payload(state)
        save_checkpoint(self.last_path, payload)
        if is_best:
            save_checkpoint(self.best_path, payload)
            log.info("checkpoint: %s improved to %.4g, saved %s", key, value, self.best_path)
        if not self.save_best_only:
            save_checkpoint(self.out_dir / f"epoch_{state.logs['epoch']:03d}.pt", payload)


class ReduceLROnPlateau(Monitored):
    """Multiply every group's learning rate by ``factor`` (not below ``min_lr``) once
    ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs,
    then wait ``cooldown`` epochs before counting again."""

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 2,
        min_lr: float = 0.0,
        min_delta: float = 1e-4,
        cooldown: int = 0,
    ):
        super().__init__(monitor, mode, min_delta)
        if not 0 < factor < 1:
            raise NetgraftError(f"factor must be in (0, 1); found {factor}")
        self.factor, self.patience, self.min_lr, self.cooldown = factor, patience, min_lr, cooldown
        self.cooling = 0
        self.reductions = 0

    def on_epoch_end(self, state: Any) -> None:
        key, _, improved = self.observe(state.logs)
        if improved:
            return
        if self.cooling > 0:
            self.cooling -= 1
            return
        self.wait += 1
        if self.wait < self.patience:
            return
        self.wait, self.cooling = 0, self.cooldown
        changed = False
        for group in state.optimizer.param_groups:
            new = max(group["lr"] * self.factor, self.min_lr)
            if new < group["lr"]:
                group["lr"] = new
                changed = True
        if changed:
            self.reductions += 1
            state.report(
                f"ReduceLROnPlateau: {key} has not improved for {self.patience} epoch(s); "
                f"learning rates multiplied by {self.factor:g}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, the cooldown left and the reductions made."""
        return {**super().state_dict(), "cooling": self.cooling, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self.cooling = int(state.get("cooling", 0))
        self.reductions = int(state.get("reductions", 0))


class EarlyStopping(Monitored):
    """Stop training once ``monitor`` has not improved by more than ``min_delta`` for
    ``patience`` epochs; with ``restore_best_weights`` the model gets back the weights of
    its best epoch when training stops. Those weights (kept in memory, on the CPU) are part
    of :meth:`state_dict`, so a run resumed from a checkpoint still restores them."""

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
    ):
        super().__init__(monitor, mode, min_delta)
        self.patience, self.restore_best_weights = patience, restore_best_weights
        self.stopped_epoch: int | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, state: Any) -> None:
        key, _, improved = self.observe(state.logs)
        if improved:
            if self.restore_best_weights:
                self._best_weights = {
                    k: v.detach().to("cpu", copy=True) for k, v in state.model.state_dict().items()
                }
            return
        self.wait += 1
        if self.wait >= self.patience:
            state.stop_training = True
            self.stopped_epoch = state.logs["epoch"]
            state.report(
                f"EarlyStopping: {key} has not improved for {self.patience} epoch(s); stopping"
            )

    def on_train_end(self, state: Any) -> None:
        if self.stopped_epoch is not None and self._best_weights is not None:
            state.model.load_state_dict(self._best_weights)
            state.report(f"EarlyStopping: restored the weights of the best epoch ({self.best:.4g})")

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, the epoch it stopped at and the best epoch's weights (with
        ``restore_best_weights``)."""
        return {
            **super().state_dict(),
            "stopped_epoch": self.stopped_epoch,
            "best_weights": self._best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self.stopped_epoch = state.get("stopped_epoch")
        self._best_weights = state.get("best_weights")
