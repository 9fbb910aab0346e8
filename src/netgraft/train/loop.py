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
    ...              callbacks=[netgraft.Checkpoint("runs/a")], seed=0,
    ...              run=netgraft.RunOptions(resume="runs/a"))
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

from ..adapters import prepare as prepare_adapters
from ..deprecation import legacy
from ..errors import NetgraftError
from ..options import RunOptions, run_options
from ..rng import seed_everything
from .batches import Metric, evaluate, predict, resolve_device, to_data
from .cached import CachePlan, plan
from .callbacks import Checkpoint
from .checkpoint import load_checkpoint, restore_model, restore_training
from .distributed import Parallel, parallel_for
from .engine import Batches, Engine, EpochSampler, Feed, TrainState
from .history import History
from .optimizers import (
    OPTIMIZATION_FIELDS,
    Optimization,
    make_optimizer,
    make_scheduler,
    optimization,
)
from .report import Reporter, format_lrs

log = logging.getLogger("netgraft.train")

__all__ = ["EpochSampler", "TrainState", "evaluate", "fit", "fit_flat", "format_lrs", "predict"]


_RUN = "run=RunOptions({}=...)"
_OPT = "optimizer=Optimization({}=...)"


@legacy(
    device=_RUN.format("device"),
    precision=_RUN.format("precision"),
    accumulate=_RUN.format("accumulate"),
    resume=_RUN.format("resume"),
    cache=_RUN.format("cache"),
    cache_options="run=RunOptions(cache_dir=..., cache_dtype=..., augment_copies=...)",
    quiet="run=RunOptions(progress=not quiet)",
    stage=_RUN.format("stage"),
    **{name: _OPT.format(name) for name in OPTIMIZATION_FIELDS},
)
def fit(
    model: nn.Module,
    train: Any,
    val: Any = None,
    *,
    epochs: int,
    lr: float | None = None,
    optimizer: Any = "adamw",
    loss: Any = None,
    metrics: Sequence[Metric] = ("acc",),
    callbacks: Sequence[Any] = (),
    seed: int | None = 0,
    batch_size: int = 32,
    run: RunOptions | None = None,
    **legacy_kwargs: Any,
) -> History:
    """Train ``model`` in place for ``epochs`` epochs and return the :class:`History`.

    ``train``/``val`` are datasets, ``(x, y)`` tensors or numpy arrays (or DataLoaders,
    used as they are). With ``lr`` (the rate of the top block), the optimizer is built over
    :func:`netgraft.param_groups` (trainable parameters only): ``optimizer`` is
    ``"adamw"``, ``"adam"``, ``"sgd"``, a function of the groups, or an
    :class:`~netgraft.Optimization` that adds the schedule, weight decay, discriminative
    rates, gradient clipping and data order; or pass an optimizer instance (then no
    ``lr``). ``loss`` defaults to cross-entropy. ``seed`` (default 0; None draws one from
    torch's global generator) seeds every random stream and the data order of each epoch.
    ``batch_size`` is the global batch.

    ``run`` (:class:`~netgraft.RunOptions`) says how to run without changing what is
    computed: ``device``, ``precision`` (``"bf16"``, ``"fp16"``: mixed precision, also in
    one process), ``accumulate`` (micro-batches per step; ``loss`` must be a mean over the
    examples, as the named losses are), ``progress``, ``resume`` (a checkpoint folder or
    file: continue exactly, given the same data and arguments) and ``cache`` with its
    options (frozen leading layers computed once, :mod:`netgraft.cache`). Started with
    ``torchrun`` or ``accelerate launch``, fit runs data parallel through Accelerate
    (:mod:`netgraft.train.distributed`): each process trains on its share of every global
    batch, so N processes make the same updates as one; rank 0 alone shows progress and
    writes checkpoints, metrics are over all processes, and a checkpoint resumes on any
    number of processes.

    The old keywords for the fields of ``run`` and ``optimizer`` (``device=``, ``quiet=``,
    ``cache=``, ``scheduler=``, ``lr_mult=``, ...) still work and warn.
    """
    opt_fields = {k: legacy_kwargs.pop(k) for k in OPTIMIZATION_FIELDS if k in legacy_kwargs}
    how = optimization(optimizer, **opt_fields)
    run = run_options(run, legacy_kwargs)
    _check_epochs(epochs)
    return _train(model, (train, val), epochs, lr, how, run, loss=loss,
                  metrics=metrics, callbacks=callbacks, seed=seed, batch_size=batch_size)  # fmt: skip


def _train(
    model: nn.Module,
    data: tuple[Any, Any],
    epochs: int,
    lr: float | None,
    how: Optimization,
    run: RunOptions,
    **what: Any,
) -> History:
    """fit's steps, its arguments checked: the device and seed, the checkpoint, the data
    (and cache plan), the optimizer and scheduler, then the engine."""
    train, val = data
    parallel = parallel_for(resolve_device(run.device), run.precision)
    callbacks = _firing_order(what["callbacks"])
    resume, saved = _resume_payload(run.resume, callbacks, parallel)
    seed = _prepare_model(model, parallel.device, parallel.same_seed(what["seed"]), saved)
    parallel.sync_weights(model)
    report = Reporter(not run.progress, main=parallel.is_main)
    train_feed, val_feed = _feeds(model, train, val, run, parallel, report)
    batches = Batches.over(train_feed.data, what["batch_size"], seed, how.shuffle, parallel)
    opt = make_optimizer(model, how.name, lr, how.lr_mult, how.layer_decay,
                         how.weight_decay)  # fmt: skip
    sched = make_scheduler(how.scheduler, opt, epochs * batches.steps_per_epoch)
    state = TrainState(model, opt, sched, History(), epochs, seed, callbacks, report,
                       stage=run.stage)  # fmt: skip
    state.rank, state.world_size = parallel.rank, parallel.world_size
    state.barrier, state.scaler = parallel.barrier, parallel.scaler
    if saved is not None:
        restore_training(saved, state)
        where = f"epoch {state.epoch + 1}, step {state.step}{_world(saved, parallel)}"
        report(f"resuming from {resume}: {where}")
    engine = Engine(state, train_feed, val_feed, batches, loss=what["loss"],
                    metrics=what["metrics"], device=parallel.device,
                    max_grad_norm=how.max_grad_norm, parallel=parallel,
                    accumulate=run.accumulate)  # fmt: skip
    return engine.run()


_FIT_OWN = ("epochs", "lr", "optimizer", "loss", "metrics", "callbacks", "seed", "batch_size")


def fit_flat(model: nn.Module, train: Any, val: Any = None, **kwargs: Any) -> History:
    """:func:`fit` with every option as one flat keyword, without deprecation warnings:
    fit's own arguments, :class:`~netgraft.RunOptions` fields (and ``quiet``,
    ``cache_options``) and :class:`~netgraft.Optimization` fields, with ``run`` and
    ``optimizer`` as the base they apply over. For netgraft's own callers that forward a
    flat dict (a study's ``budget``, fine-tuning stages)."""
    own = {k: kwargs.pop(k) for k in _FIT_OWN if k in kwargs}
    opt_fields = {k: kwargs.pop(k) for k in OPTIMIZATION_FIELDS if k in kwargs}
    how = optimization(own.pop("optimizer", "adamw"), **opt_fields)
    run = run_options(kwargs.pop("run", None), kwargs)
    return fit(model, train, val, optimizer=how, run=run, **own)


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
            "RunOptions(resume='auto') continues from the Checkpoint callback's folder, and "
            "fit has none: add callbacks=[netgraft.Checkpoint(out_dir)]"
        )
    last = saves[-1].last_path
    found = last.is_file()
    if parallel.any(found) and parallel.any(not found):
        raise NetgraftError(
            f"RunOptions(resume='auto'): {str(last)!r} exists for some processes and not "
            "others; put the Checkpoint folder on a filesystem every process sees"
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
            "and run=RunOptions(resume='auto') (or launch without --max-restarts)"
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
            "would start from scratch each time: pass run=RunOptions(resume='auto') to continue "
            "from the Checkpoint folder"
        )


def _world(saved: dict[str, Any], parallel: Parallel) -> str:
    """What a resumed run should know about the processes that wrote its checkpoint."""
    wrote = int(saved.get("world_size", 1))
    if wrote == parallel.world_size:
        return ""
    # batches are global and every process holds the whole state: any world size continues it
    return f" (written by {wrote} process(es), continued on {parallel.world_size})"


def _check_epochs(epochs: int) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise NetgraftError(f"epochs must be a non-negative integer; found {epochs!r}")


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
    prepare_adapters(model)  # a PEFT model's frozen base held as netgraft holds frozen modules
    model.to(device)
    for p in model.parameters():
        if not p.requires_grad:
            p.grad = None  # a stale gradient would let the optimizer move a frozen parameter
    return seed


def _feeds(
    model: nn.Module, train: Any, val: Any, run: RunOptions, parallel: Parallel, report: Reporter
) -> tuple[Feed, Feed | None]:
    """The training and validation data with the module each goes through: the model, or
    its trainable suffix over cached features when the cache plan applies."""
    train_data = to_data(train)
    val_data = to_data(val) if val is not None else None
    cached: CachePlan | None = None
    if run.cache is not False and not isinstance(train_data, DataLoader):
        options = {**run.cache_options(), "parallel": parallel}
        cached = plan(model, train_data, cache=run.cache, val=val_data, **options)
    if cached is None:
        return Feed(train_data, model), None if val_data is None else Feed(val_data, model)
    report(cached.describe())
    if cached.val is not None:
        val_feed: Feed | None = Feed(cached.val, cached.model)
    else:
        val_feed = None if val_data is None else Feed(val_data, model)
    return Feed(cached.train, cached.model, cached.set_epoch), val_feed
