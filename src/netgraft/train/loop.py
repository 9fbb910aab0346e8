"""The training loop's entry point: :func:`fit`.

A lean loop for the library and the CLI: supervised batches ``(inputs, targets)`` (or
Hugging Face style dicts with ``labels``), a loss, metrics, optional validation, a
progress bar and one line per epoch with losses, metrics and every group's learning
rate. It is deterministic on CPU for a given ``seed``: the data order of epoch ``e``
is a permutation drawn from its own generator seeded with ``(seed, e)``, so a run can
resume exactly from a checkpoint taken between or within epochs. Frozen parameters
are never handed to the optimizer. The loop never changes what is frozen.

:func:`fit` is a composition of named steps: resolve the device and seed, restore from a
checkpoint, build the data (and the cache plan, :mod:`netgraft.train.cached`), the
optimizer and scheduler, then hand the state to the engine (:mod:`netgraft.train.engine`),
which runs epochs of batches and fires the callbacks' events. :func:`evaluate`,
:func:`predict`, :class:`EpochSampler`, :class:`TrainState` and :func:`format_lrs` are
importable from here too, where they used to live.

Example::

    >>> history = netgraft.fit(model, (x, y), (x_val, y_val), epochs=3, lr=1e-3,
    ...                        callbacks=[netgraft.Checkpoint("runs/a")], seed=0)
    >>> netgraft.fit(model, (x, y), (x_val, y_val), epochs=5, lr=1e-3,
    ...              callbacks=[netgraft.Checkpoint("runs/a")], seed=0, resume="runs/a")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import NetgraftError
from ..rng import seed_everything
from .batches import Metric, evaluate, predict, resolve_device, to_data
from .cached import CachePlan, plan
from .callbacks import Checkpoint
from .checkpoint import load_checkpoint, restore_model, restore_training
from .distributed import Parallel, parallel_for
from .engine import Batches, Engine, EpochSampler, Feed, TrainState
from .history import History
from .optimizers import make_optimizer, make_scheduler
from .report import Reporter, format_lrs

log = logging.getLogger("netgraft.train")

__all__ = ["EpochSampler", "TrainState", "evaluate", "fit", "format_lrs", "predict"]


def fit(
    model: nn.Module,
    train: Any,
    val: Any = None,
    *,
    epochs: int,
    lr: float | None = None,
    optimizer: Any = "adamw",
    scheduler: Any = None,
    loss: Any = None,
    metrics: Sequence[Metric] = ("acc",),
    callbacks: Sequence[Any] = (),
    device: Any = None,
    seed: int | None = None,
    batch_size: int = 32,
    shuffle: bool = True,
    lr_mult: float | None = None,
    layer_decay: float | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    resume: str | Path | None = None,
    cache: bool | str = "auto",
    cache_options: dict[str, Any] | None = None,
    quiet: bool = False,
    stage: str | None = None,
    precision: str | None = None,
    accumulate: int = 1,
) -> History:
    """Train ``model`` in place for ``epochs`` epochs and return the :class:`History`.

    ``train``/``val`` are datasets, ``(x, y)`` tensors or numpy arrays (or DataLoaders,
    used as they are). With ``lr``, the optimizer (``"adamw"``, ``"adam"``, ``"sgd"`` or a
    function of the groups) is built over :func:`netgraft.param_groups` (trainable
    parameters only; ``lr_mult``/``layer_decay`` give discriminative rates); or pass an
    optimizer instance. ``scheduler`` (``"cosine"``, ``"onecycle"`` or a function of
    ``(optimizer, total_steps)``) steps every batch. ``loss`` defaults to cross-entropy.
    ``resume`` (a checkpoint folder or file) continues a run exactly, given the same data
    and arguments; ``resume="auto"`` continues from the :class:`~netgraft.Checkpoint`
    callback's ``last.pt`` when it exists and starts afresh otherwise (the way to survive
    ``torchrun --max-restarts``, which starts the script again: a launch with restarts and
    no checkpoint to continue from is refused before training). ``cache`` lets frozen leading layers be computed once
    (:mod:`netgraft.cache`); ``cache_options`` go to :func:`netgraft.train.cached.plan`
    (``dir`` keeps the features on disk for later runs, ``dtype``, ``augment_copies`` caches
    that many augmented passes, read in turn by epoch). ``quiet`` hides the progress bar and
    the epoch lines (they still go to the ``netgraft.train`` logger).

    ``batch_size`` is the global batch. Started with ``torchrun`` or ``accelerate launch``,
    fit runs data parallel through Accelerate (:mod:`netgraft.train.distributed`): each
    process trains on its share of every global batch, so N processes make the same
    updates as one; rank 0 alone shows progress and writes checkpoints, metrics are over
    all processes, and a checkpoint resumes on any number of processes. ``precision``
    (``"bf16"``, ``"fp16"``) trains in mixed precision, also in one process. ``accumulate``
    runs each process's share of a batch in that many micro-batches, accumulating their
    gradients (all-reduced once) before one optimizer step: the same updates in less memory
    (``loss`` must be a mean over the examples, as the named losses are).
    """
    _check_counts(epochs, accumulate)
    parallel = parallel_for(resolve_device(device), precision)
    device = parallel.device
    callbacks = _firing_order(callbacks)
    resume, saved = _resume_payload(resume, callbacks, parallel)
    seed = _prepare_model(model, device, parallel.same_seed(seed), saved)
    parallel.sync_weights(model)
    report = Reporter(quiet, main=parallel.is_main)
    options = {**(cache_options or {}), "parallel": parallel}
    train_feed, val_feed = _feeds(model, train, val, cache, options, report)
    batches = Batches.over(train_feed.data, batch_size, seed, shuffle, parallel)
    opt = make_optimizer(model, optimizer, lr, lr_mult, layer_decay, weight_decay)
    sched = make_scheduler(scheduler, opt, epochs * batches.steps_per_epoch)
    state = TrainState(model, opt, sched, History(), epochs, seed, callbacks, report, stage=stage)
    state.rank, state.world_size = parallel.rank, parallel.world_size
    state.barrier, state.scaler = parallel.barrier, parallel.scaler
    if saved is not None:
        restore_training(saved, state)
        where = f"epoch {state.epoch + 1}, step {state.step}{_world(saved, parallel)}"
        report(f"resuming from {resume}: {where}")
    engine = Engine(
        state,
        train_feed,
        val_feed,
        batches,
        loss=loss,
        metrics=metrics,
        device=device,
        max_grad_norm=max_grad_norm,
        parallel=parallel,
        accumulate=accumulate,
    )
    return engine.run()


def _resume_payload(
    resume: str | Path | None, callbacks: list[Any], parallel: Parallel
) -> tuple[str | Path | None, dict[str, Any] | None]:
    """Where the run continues from and the checkpoint read there (None: a new run).
    ``"auto"`` is the :class:`Checkpoint` callback's ``last.pt`` when every rank sees it."""
    _check_restartable(resume, callbacks)
    if resume is None:
        return None, None
    if resume != "auto":
        return resume, load_checkpoint(resume)
    saves = [cb for cb in callbacks if isinstance(cb, Checkpoint)]
    if not saves:
        raise NetgraftError(
            "resume='auto' continues from the Checkpoint callback's folder, and fit has none: "
            "add callbacks=[netgraft.Checkpoint(folder)]"
        )
    last = saves[-1].last_path
    found = last.is_file()
    if parallel.any(found) and parallel.any(not found):
        raise NetgraftError(
            f"resume='auto': {str(last)!r} exists for some processes and not others; put the "
            "Checkpoint folder on a filesystem every process sees"
        )
    return (last, load_checkpoint(last)) if found else (None, None)


def _check_restartable(resume: str | Path | None, callbacks: list[Any]) -> None:
    """Refuse, before training, a launch that restarts its processes (``torchrun
    --max-restarts``) when a restarted process could not continue where the run was."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) < 1:
        return
    if not any(isinstance(cb, Checkpoint) for cb in callbacks):
        raise NetgraftError(
            "torchrun --max-restarts starts the script again after a failure, and this fit "
            "writes no checkpoint to continue from: add callbacks=[netgraft.Checkpoint(folder)] "
            "and resume='auto' (or launch without --max-restarts)"
        )
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # restarted ranks can read the dead ones' addresses from the rendezvous store
        # torchrun shares between attempts, and fail to connect (pytorch/pytorch#167288)
        log.warning(
            "torchrun --max-restarts: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun, "
            "or a restarted group may fail to connect"
        )
    if resume is None:
        raise NetgraftError(
            "torchrun --max-restarts starts the script again after a failure, and this fit "
            "would start from scratch each time: pass resume='auto' to continue from the "
            "Checkpoint folder"
        )


def _world(saved: dict[str, Any], parallel: Parallel) -> str:
    """What a resumed run should know about the processes that wrote its checkpoint."""
    wrote = int(saved.get("world_size", 1))
    if wrote == parallel.world_size:
        return ""
    # batches are global and every process holds the whole state: any world size continues it
    return f" (written by {wrote} process(es), continued on {parallel.world_size})"


def _check_counts(epochs: int, accumulate: int) -> None:
    if not isinstance(epochs, int) or epochs < 0:
        raise NetgraftError(f"epochs must be a non-negative integer; found {epochs!r}")
    if not isinstance(accumulate, int) or accumulate < 1:
        raise NetgraftError(f"accumulate must be a positive integer; found {accumulate!r}")


def _firing_order(callbacks: Sequence[Any]) -> list[Any]:
    """The callbacks with checkpoints last, so they save what the others changed (a
    reduced learning rate, a stop)."""
    return sorted(callbacks, key=lambda cb: isinstance(cb, Checkpoint))


def _prepare_model(
    model: nn.Module, device: torch.device, seed: int | None, saved: dict[str, Any] | None
) -> int:
    """Give the model the checkpoint's frozen state and weights (or seed every random
    stream for a new run), move it to ``device``; return the run's seed."""
    if saved is not None:
        restore_model(saved, model)
        seed = saved["seed"]
    else:
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        seed_everything(seed)
    model.to(device)
    for p in model.parameters():
        if not p.requires_grad:
            p.grad = None  # a stale gradient would let the optimizer move a frozen parameter
    return seed


def _feeds(
    model: nn.Module,
    train: Any,
    val: Any,
    cache: bool | str,
    cache_options: dict[str, Any] | None,
    report: Reporter,
) -> tuple[Feed, Feed | None]:
    """The training and validation data with the module each goes through: the model, or
    its trainable suffix over cached features when the cache plan applies."""
    train_data = to_data(train)
    val_data = to_data(val) if val is not None else None
    cached: CachePlan | None = None
    if cache is not False and not isinstance(train_data, DataLoader):
        cached = plan(model, train_data, cache=cache, val=val_data, **(cache_options or {}))
    if cached is None:
        return Feed(train_data, model), None if val_data is None else Feed(val_data, model)
    report(cached.describe())
    if cached.val is not None:
        val_feed: Feed | None = Feed(cached.val, cached.model)
    else:
        val_feed = None if val_data is None else Feed(val_data, model)
    return Feed(cached.train, cached.model, cached.set_epoch), val_feed
