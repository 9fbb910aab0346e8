"""Checkpoints: the one place a training state is built, written, read and restored.

A checkpoint is a plain dict of tensors and numbers, loadable with
``torch.load(weights_only=True)``: the model's weights, the optimizer's and scheduler's
states, where the loop is (epoch, step within it, the epoch's running sums), the seed and
every global random stream, what is frozen (:func:`netgraft.frozen_state`), the history,
each callback's ``state_dict()`` and, under fp16, the gradient scaler's state (loss scale
and growth count). :func:`checkpoint_payload` builds it from the loop's
state, :func:`save_checkpoint` writes it atomically, :func:`load_checkpoint` reads it and
:func:`restore_model` / :func:`restore_training` put it back, so a resumed run continues
exactly where the saved one was. This module never decides when to save (the
:class:`~netgraft.Checkpoint` callback does) and never unpickles code.

Example::

    >>> save_checkpoint("runs/a/last.pt", checkpoint_payload(state))
    >>> payload = load_checkpoint("runs/a")
    >>> restore_model(payload, model)
    >>> restore_training(payload, state)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import NetgraftError
from ..freeze import frozen_state, load_frozen_state
from ..recipe import recipe_of, replay
from ..rng import rng_state, set_rng_state
from .history import History

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_payload",
    "load_checkpoint",
    "restore_model",
    "restore_training",
    "save_checkpoint",
]

log = logging.getLogger("netgraft.train")
CHECKPOINT_FORMAT = "netgraft-checkpoint/1"
_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "step",
    "global_step",
    "sums",
    "seed",
    "rng",
    "frozen",
    "history",
)


def checkpoint_payload(state: Any) -> dict[str, Any]:
    """The full training state of the loop's ``state`` (a
    :class:`~netgraft.train.TrainState`) as a plain dict of tensors and numbers. Taken at
    the end of an epoch (``state.epoch_done``) it points at the start of the next one."""
    done = state.epoch_done
    return {
        "format": CHECKPOINT_FORMAT,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "epoch": state.epoch + 1 if done else state.epoch,
        "step": 0 if done else state.step,
        "global_step": state.global_step,
        "sums": {} if done else dict(state.sums),
        "seed": state.seed,
        "rng": rng_state(),
        "frozen": frozen_state(state.model),
        "history": state.history.to_dict(),
        "recipe": _recipe_operations(state.model),
        # batches are global, so any number of processes can continue it; kept for the record
        "world_size": getattr(state, "world_size", 1),
        # fp16's loss scale and its growth count: a resumed run scales as the saved one did
        "scaler": _scaler_state(state),
        "callbacks": [
            {"type": type(cb).__name__, "state": cb.state_dict()}
            for cb in state.callbacks
            if hasattr(cb, "state_dict")
        ],
    }


def _scaler_state(state: Any) -> dict[str, Any] | None:
    scaler = getattr(state, "scaler", None)
    return scaler.state_dict() if scaler is not None else None


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: the file appears whole or not at all."""
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a netgraft checkpoint (a file, or a folder holding ``last.pt``) without
    unpickling code. Raises :class:`NetgraftError` when it is missing, unreadable (corrupt
    or truncated) or not a complete checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise NetgraftError(
            f"no checkpoint to resume from: {str(path)!r} does not exist "
            "(fit writes it with callbacks=[Checkpoint(folder)])"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NetgraftError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise NetgraftError(f"{str(path)!r} is not a netgraft checkpoint ({CHECKPOINT_FORMAT})")
    missing = [key for key in _KEYS if key not in payload]
    if missing:
        raise NetgraftError(
            f"checkpoint {str(path)!r} is incomplete: it lacks {', '.join(missing)}"
        )
    return payload


def _recipe_operations(model: nn.Module) -> list[dict[str, Any]] | None:
    """The surgery recorded on ``model`` as plain data (None when it cannot be replayed)."""
    recipe = recipe_of(model)
    return None if recipe.not_replayable else recipe.to_dict()["operations"]


def _replay_growth(payload: dict[str, Any], model: nn.Module) -> None:
    """Replay on ``model`` the recorded operations the checkpointed model had on top of
    ``model``'s own (a growth during the run, :class:`netgraft.Grow`), so the weights fit."""
    saved, done = payload.get("recipe") or [], recipe_of(model).operations
    if len(saved) <= len(done) or saved[: len(done)] != done:
        return
    rest = saved[len(done) :]
    if replay(model, rest) is not model:
        raise NetgraftError(
            f"cannot resume: the checkpoint's model was changed by {rest[0]['op']}, which "
            f"builds a new module, so the model given to fit cannot become it in place"
        )
    done.extend(rest)
    log.info("resume: replayed %s on the model", ", ".join(op["op"] for op in rest))


def _check_same_model(saved: dict[str, Any], model: nn.Module) -> None:
    """Refuse a checkpoint written for another model, naming what does not fit."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    shapes = [
        f"{k} {tuple(saved[k].shape)} in the checkpoint, {tuple(mine[k].shape)} here"
        for k in mine
        if k in saved and tuple(saved[k].shape) != tuple(mine[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    found = [
        f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if items
    ]
    raise NetgraftError(
        f"the checkpoint was written for another model ({'; '.join(found)}): resume with the "
        "model that wrote it, or give this run a new Checkpoint folder (or resume=None)"
    )


def restore_model(payload: dict[str, Any], model: nn.Module) -> None:
    """Give ``model`` the surgery the checkpointed model had on top of its own (recorded
    growth during the run is replayed), its frozen state (which parameters train, norm
    policies) and weights."""
    _replay_growth(payload, model)
    _check_same_model(payload["model"], model)
    load_frozen_state(model, payload["frozen"])
    model.load_state_dict(payload["model"])


def restore_training(payload: dict[str, Any], state: Any) -> None:
    """Put everything but the model back into the loop's ``state``: the optimizer's and
    scheduler's states, the history, the position (epoch, step, running sums), each
    callback's state and, last, every global random stream."""
    _align_groups(state.optimizer, payload["optimizer"])
    state.optimizer.load_state_dict(payload["optimizer"])
    if state.scheduler is not None and payload.get("scheduler") is not None:
        state.scheduler.load_state_dict(payload["scheduler"])
    state.history.rows[:] = History.from_dict(payload["history"]).rows
    state.epoch, state.step = payload["epoch"], payload["step"]
    state.global_step, state.sums = payload["global_step"], dict(payload["sums"])
    _restore_callbacks(state.callbacks, payload.get("callbacks", []))
    _restore_scaler(getattr(state, "scaler", None), payload.get("scaler"))
    set_rng_state(payload["rng"])


def _restore_scaler(scaler: Any, saved: dict[str, Any] | None) -> None:
    """Give the run's gradient scaler (fp16) the saved scale and growth count."""
    if scaler is None:
        if saved:
            log.info("resume: the checkpoint's loss scale is not used (this run does not scale)")
        return
    if not saved:
        log.warning("resume: the checkpoint holds no loss scale; fp16 scaling starts afresh")
        return
    scaler.load_state_dict(saved)


def _align_groups(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Group ``optimizer``'s parameters, by name, as the saved optimizer grouped them when
    that differs (:class:`netgraft.Grow` puts a new block's parameters into existing groups,
    which a fresh optimizer over the grown model would not)."""
    groups, current = saved.get("param_groups") or [], optimizer.param_groups
    if not all("param_names" in g for g in [*groups, *current]):
        return
    if [g["param_names"] for g in groups] == [g["param_names"] for g in current]:
        return
    by_name = {n: p for g in current for n, p in zip(g["param_names"], g["params"], strict=True)}
    if sorted(by_name) != sorted(n for g in groups for n in g["param_names"]):
        return  # another model: load_state_dict says what does not fit
    optimizer.param_groups[:] = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [by_name[n] for n in g["param_names"]],
        }
        for g in groups
    ]


def _restore_callbacks(callbacks: list[Any], saved: list[dict[str, Any]]) -> None:
    """Give each callback the saved state of the next unused saved callback of its type."""
    remaining = list(saved)
    for cb in callbacks:
        if not hasattr(cb, "load_state_dict"):
            continue
        match = next((e for e in remaining if e.get("type") == type(cb).__name__), None)
        if match is None:
            log.warning("resume: the checkpoint holds no state for %s", type(cb).__name__)
            continue
        remaining.remove(match)
        cb.load_state_dict(match.get("state") or {})
