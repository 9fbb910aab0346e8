"""Callbacks for :func:`netgraft.fit`: checkpoints, learning-rate reduction, early stopping.

A callback is any object with some of the hooks ``on_train_begin``, ``on_epoch_begin``,
``on_batch_begin``, ``on_batch_end``, ``on_epoch_end``, ``on_train_end``; each gets the
loop's :class:`~netgraft.train.TrainState` (model, optimizer, epoch, logs, ...).
Callbacks with state give ``state_dict``/``load_state_dict`` so a resumed run continues
exactly. Callbacks never print; they log through ``logging`` and the loop's reporter.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..atomic import remove_stale_tmp
from ..errors import NetgraftError
from .checkpoint import checkpoint_payload, save_checkpoint

__all__ = [
    "Callback",
    "Checkpoint",
    "EarlyStopping",
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


def _check_mode(mode: str) -> None:
    if mode not in ("min", "max"):
        raise NetgraftError(f"mode must be 'min' or 'max'; found {mode!r}")


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


def _improved(value: float, best: float | None, mode: str, delta: float = 0.0) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best - delta if mode == "min" else value > best + delta


class Checkpoint(Callback):
    """Save the full training state into ``folder``, atomically.

    ``last.pt`` is rewritten at the end of every epoch (and every ``every_steps``
    optimizer steps when given) and is what ``fit(..., resume=folder)`` continues from.
    ``best.pt`` is written when ``monitor`` improves (``mode`` ``"max"`` or ``"min"``);
    with ``save_best_only=False`` every epoch is also kept as ``epoch_NNN.pt``. A
    checkpoint holds the model, optimizer, scheduler, epoch and step, the RNG states,
    the data order, the frozen state, the history and the callbacks' states
    (:mod:`netgraft.train.checkpoint` builds, writes and reads it).
    """

    def __init__(
        self,
        folder: str | Path,
        monitor: str = "val_acc",
        mode: str = "max",
        save_best_only: bool = True,
        every_steps: int | None = None,
    ):
        _check_mode(mode)
        if every_steps is not None and every_steps < 1:
            raise NetgraftError(f"every_steps must be a positive integer; found {every_steps}")
        self.folder = Path(folder)
        self.monitor = monitor
        self.mode = mode
        self.save_best_only = save_best_only
        self.every_steps = every_steps
        self.best: float | None = None

    @property
    def last_path(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pt"

    def on_train_begin(self, state: Any) -> None:
        if getattr(state, "rank", 0) == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(self.folder)

    def on_batch_end(self, state: Any) -> None:
        if self.every_steps and state.global_step % self.every_steps == 0 and not state.epoch_done:
            if getattr(state, "rank", 0) == 0:
                save_checkpoint(self.last_path, checkpoint_payload(state))
            _wait(state)

    def on_epoch_end(self, state: Any) -> None:
        key, value = monitored_value(state.logs, self.monitor)
        is_best = _improved(value, self.best, self.mode)
        if is_best:
            self.best = value
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
            save_checkpoint(self.folder / f"epoch_{state.logs['epoch']:03d}.pt", payload)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")


class ReduceLROnPlateau(Callback):
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
        _check_mode(mode)
        if not 0 < factor < 1:
            raise NetgraftError(f"factor must be in (0, 1); found {factor}")
        self.monitor, self.mode, self.factor = monitor, mode, factor
        self.patience, self.min_lr, self.min_delta, self.cooldown = (
            patience,
            min_lr,
            min_delta,
            cooldown,
        )
        self.best: float | None = None
        self.wait = 0
        self.cooling = 0
        self.reductions = 0

    def on_epoch_end(self, state: Any) -> None:
        key, value = monitored_value(state.logs, self.monitor)
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
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
        return {
            "best": self.best,
            "wait": self.wait,
            "cooling": self.cooling,
            "reductions": self.reductions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.wait = int(state.get("wait", 0))
        self.cooling = int(state.get("cooling", 0))
        self.reductions = int(state.get("reductions", 0))


class EarlyStopping(Callback):
    """Stop training once ``monitor`` has not improved by more than ``min_delta`` for
    ``patience`` epochs; with ``restore_best_weights`` the model gets back the weights of
    its best epoch (kept in memory) when training stops."""

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
    ):
        _check_mode(mode)
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.restore_best_weights = min_delta, restore_best_weights
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, state: Any) -> None:
        key, value = monitored_value(state.logs, self.monitor)
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            if self.restore_best_weights:
                self._best_weights = copy.deepcopy(state.model.state_dict())
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
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.wait = int(state.get("wait", 0))
        self.stopped_epoch = state.get("stopped_epoch")
