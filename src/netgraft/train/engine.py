"""The training engine: epochs of batches over a prepared state, and the events callbacks
hear.

It reads as setup -> epochs -> batches -> events: :meth:`Engine.run` wraps the whole run,
each epoch and each batch in :meth:`Engine.with_events`, the one dispatcher that fires
``on_<event>_begin`` / ``on_<event>_end`` on every callback (:func:`fire`). The data order
of epoch ``e`` is a permutation drawn from its own generator seeded with ``(seed, e)``
(:class:`EpochSampler`), so a run resumed within an epoch skips exactly the batches already
seen. ``fit`` (:mod:`netgraft.train.loop`) prepares the state and hands it here. The engine
never changes what is frozen and never saves anything (callbacks do).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import to_device
from ..errors import NetgraftError
from ..optim import group_lrs
from ..options import RunOptions
from .batches import (
    Metric,
    accumulate,
    loss_fn,
    make_loader,
    means,
    metric_fns,
    predictions,
    split_batch,
)
from .checkpoint import checkpoint_payload
from .distributed import Parallel, Share, ShareBatches, evaluate_shared, share_bounds, take_rows
from .history import History
from .report import epoch_line

__all__ = ["EVENTS", "Batches", "Engine", "EpochSampler", "Feed", "TrainState", "fire"]

EVENTS = ("train_begin", "epoch_begin", "batch_begin", "batch_end", "epoch_end", "train_end")


class EpochSampler(Sampler[int]):
    """Indices of a dataset in the order of epoch ``e``: a permutation drawn from a generator
    seeded with ``(seed, e)`` (or ``0..n-1`` without shuffling), minus the first ``skip``."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Read epoch ``epoch``'s order from then on, without its first ``skip`` indices."""
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        """The whole order of the current epoch."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.skip :])

    def __len__(self) -> int:
        return max(self.n - self.skip, 0)


@dataclass
class TrainState:
    """What callbacks see: the model and optimizer being trained, where the loop is
    (``epoch`` is 0-based, ``step`` counts optimizer steps within it), the epoch's ``logs``
    once it ends, and ``stop_training`` which a callback sets to end the run. Under a
    data-parallel launch ``rank``/``world_size`` say which process this is of how many
    (rank 0 writes checkpoints) and ``barrier`` waits for all of them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    history: History
    epochs: int
    seed: int
    callbacks: list[Any]
    report: Callable[[str], None]
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    logs: dict[str, Any] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    stop_training: bool = False
    epoch_done: bool = False
    stage: str | None = None
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, repr=False)
    scaler: Any = field(default=None, repr=False)  # fp16's gradient scaler, checkpointed

    def checkpoint(self) -> dict[str, Any]:
        """The full training state as a plain dict of tensors and numbers (loadable with
        ``torch.load(weights_only=True)``), to continue exactly where the loop is now
        (:func:`netgraft.train.checkpoint.checkpoint_payload`)."""
        return checkpoint_payload(self)


@dataclass
class Feed:
    """Data and the module its batches go through: the whole model, or its trainable suffix
    when the frozen prefix's features are cached; ``set_epoch`` tells cached data which
    epoch starts (augmented copies)."""

    data: Dataset | DataLoader
    module: nn.Module
    set_epoch: Callable[[int], None] | None = None


@dataclass
class Batches:
    """How the training data is read: the loader, its :class:`EpochSampler` (None for a
    caller's DataLoader, read as it is), the batches in a full epoch and the (global) batch
    size; under a launch, which ``rank`` of ``world`` reads its share of every batch."""

    loader: DataLoader
    sampler: EpochSampler | None
    steps_per_epoch: int
    batch_size: int
    rank: int = 0
    world: int = 1

    @classmethod
    def over(
        cls,
        data: Dataset | DataLoader,
        batch_size: int,
        seed: int,
        shuffle: bool,
        parallel: Parallel | None = None,
    ) -> Batches:
        """Batches of ``data`` in the seeded order of each epoch; under a launch, this
        rank's share of each (:class:`~netgraft.train.distributed.ShareBatches`)."""
        rank, world = (0, 1) if parallel is None else (parallel.rank, parallel.world_size)
        if isinstance(data, DataLoader):
            return cls(data, None, len(data), batch_size, rank, world)
        sampler = EpochSampler(len(data), seed, shuffle)  # type: ignore[arg-type]
        steps = math.ceil(len(data) / batch_size)  # type: ignore[arg-type]
        if world == 1:
            return cls(make_loader(data, batch_size, sampler), sampler, steps, batch_size)
        shares = ShareBatches(sampler, batch_size, rank, world)
        loader = DataLoader(data, batch_sampler=shares, generator=torch.Generator().manual_seed(0))
        return cls(loader, sampler, steps, batch_size, rank, world)

    def share(self, step: int, batch: Any) -> tuple[Any, Share | None]:
        """This rank's part of the epoch's batch ``step`` with its :class:`Share` (None in
        one process). A caller's DataLoader is read whole by every rank, which keeps its
        share of each batch."""
        if self.world == 1:
            return batch, None
        if self.sampler is None:
            total = int(split_batch(batch)[1].shape[0])
            start, stop = share_bounds(total, self.rank, self.world)
            part = take_rows(batch, start, stop) if stop > start else take_rows(batch, 0, 1)
            return part, Share(stop - start, total, self.world)
        total = min(self.batch_size, self.sampler.n - step * self.batch_size)
        start, stop = share_bounds(total, self.rank, self.world)
        return batch, Share(stop - start, total, self.world)

    def start_epoch(self, epoch: int, skip_steps: int) -> None:
        """Read ``epoch``'s order from its batch ``skip_steps`` on (a resumed epoch)."""
        if self.sampler is None:
            if skip_steps:
                raise NetgraftError("resuming within an epoch needs a dataset, not a DataLoader")
            return
        self.sampler.set_epoch(epoch, skip_steps * self.batch_size)


def fire(callbacks: Sequence[Any], event: str, state: TrainState) -> None:
    """Call ``on_<event>(state)`` on every callback that has it, in order."""
    for cb in callbacks:
        hook = getattr(cb, f"on_{event}", None)
        if hook is not None:
            hook(state)


class Engine:
    """Runs ``state`` to its last epoch (or until a callback sets ``stop_training``):
    batches of ``train`` through its module, optimizer and scheduler steps, ``val``
    evaluated after every epoch, one history row and one line per epoch."""

    def __init__(
        self,
        state: TrainState,
        train: Feed,
        val: Feed | None,
        batches: Batches,
        *,
        loss: Any,
        metrics: Sequence[Metric],
        device: torch.device,
        max_grad_norm: float | None,
        parallel: Parallel | None = None,
        accumulate: int = 1,
    ):
        self.parallel = parallel if parallel is not None else Parallel(device)
        # wrapped after freezing, so frozen parameters get no gradient bucket
        train = replace(train, module=self.parallel.prepare(train.module, state.optimizer))
        self.state, self.train, self.val, self.batches = state, train, val, batches
        self.metrics, self.device, self.max_grad_norm = metrics, device, max_grad_norm
        self.accumulate = accumulate
        self.fns, self.loss = metric_fns(metrics), loss_fn(loss)
        self.progress: Any = None
        self.task: Any = None
        self.lrs_used: dict[str, float] = {}

    def with_events(self, event: str, body: Callable[..., None], *args: Any) -> None:
        """Fire ``<event>_begin``, run ``body(*args)``, fire ``<event>_end``."""
        fire(self.state.callbacks, f"{event}_begin", self.state)
        body(*args)
        fire(self.state.callbacks, f"{event}_end", self.state)

    def run(self) -> History:
        """Train to the end and return the history."""
        try:
            self.with_events("train", self._epochs)
        finally:
            self.parallel.finish()
        return self.state.history

    def _epochs(self) -> None:
        state = self.state
        with state.report.bar() as self.progress:  # type: ignore[attr-defined]
            while state.epoch < state.epochs and not state.stop_training:
                self._open_epoch()
                self.with_events("epoch", self._epoch)
                self._close_epoch()

    def _open_epoch(self) -> None:
        state = self.state
        self.batches.start_epoch(state.epoch, state.step)
        if self.train.set_epoch is not None:
            self.train.set_epoch(state.epoch)  # augmented caches: pass e % K
        if state.step == 0:
            state.sums = {}
        state.epoch_done = False
        state.logs = {}

    def _epoch(self) -> None:
        state = self.state
        self.task = self.progress.add_task(
            f"{f'{state.stage} · ' if state.stage else ''}epoch {state.epoch + 1}/{state.epochs}",
            total=self.batches.steps_per_epoch,
            completed=state.step,
            info="",
        )
        state.model.train()
        self.train.module.train()
        started = time.perf_counter()
        self.lrs_used = group_lrs(state.optimizer)
        for batch in self.batches.loader:
            self.with_events("batch", self._batch, batch)
        self.progress.remove_task(self.task)
        self._end_epoch(started)

    def _batch(self, batch: Any) -> None:
        state = self.state
        batch, share = self.batches.share(state.step, batch)
        pieces = self._pieces(to_device(batch, self.device, non_blocking=True), share)
        state.optimizer.zero_grad(set_to_none=True)
        mine: dict[str, float] = {}
        for i, (piece, weight) in enumerate(pieces):
            x, y = split_batch(piece)
            # gradients are all-reduced once, with the last piece
            with self.parallel.no_sync(self.train.module, sync=i == len(pieces) - 1):
                out = predictions(self.train.module, x)
                loss = self.loss(out, y)
                self._check(loss)
                self.parallel.backward(loss if weight == 1.0 else loss * weight)
            if share is None or share.rows:
                accumulate(mine, loss, out, y, self.fns)
        self._step()
        self._count(mine, share)
        state.step += 1
        state.global_step += 1
        self.progress.update(
            self.task, advance=1, info=f"loss {state.sums['loss'] / state.sums['n']:.4f}"
        )

    def _pieces(self, batch: Any, share: Share | None) -> list[tuple[Any, float]]:
        """The batch in ``accumulate`` micro-batches, each with the weight of its mean loss:
        its part of this rank's rows, times the rank's share weight (``rows * world /
        global``, so DDP's average of gradients is the global batch's mean)."""
        rows = int(split_batch(batch)[1].shape[0])
        scale = 1.0 if share is None else share.weight
        if self.accumulate == 1:
            return [(batch, scale)]
        bounds = [share_bounds(rows, i, self.accumulate) for i in range(self.accumulate)]
        return [
            (take_rows(batch, start, stop), scale * (stop - start) / rows)
            for start, stop in bounds
            if stop > start
        ]

    def _check(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            state = self.state
            raise NetgraftError(
                f"the loss became {float(loss)} at epoch {state.epoch + 1}, step "
                f"{state.step + 1}; lower the learning rate"
            )

    def _step(self) -> None:
        optimizer, scheduler = self.state.optimizer, self.state.scheduler
        if self.max_grad_norm is not None:
            self.parallel.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], self.max_grad_norm
            )
        # the rates this step uses: the epoch line shows what the last step trained with
        self.lrs_used = group_lrs(optimizer)
        self.parallel.step()
        if scheduler is not None:
            scheduler.step()

    def _count(self, mine: dict[str, float], share: Share | None) -> None:
        """Add the batch's sums to the epoch's running sums; under a launch, the whole
        global batch's (all-reduced), so every rank holds the global means."""
        sums = self.state.sums
        keys = ["n", "loss", *self.fns]
        total = mine if share is None else self.parallel.reduce_sums(mine, keys)
        sums["n"] = sums.get("n", 0) + round(total.pop("n"))
        for name, value in total.items():
            sums[name] = sums.get(name, 0.0) + value

    def _end_epoch(self, started: float) -> None:
        """The epoch's row: training means, validation scores, rates and time; one line."""
        state = self.state
        logs: dict[str, Any] = {"epoch": len(state.history) + 1}
        if state.stage:
            logs["stage"] = state.stage
        logs.update(means(state.sums))
        if self.val is not None:
            scores = evaluate_shared(
                self.parallel,
                self.val.module,
                self.val.data,
                loss=self.loss,
                metrics=self.metrics,
                batch_size=self.batches.batch_size * 2,
                run=RunOptions(device=self.device),
            )
            logs.update({f"val_{k}": v for k, v in scores.items() if k != "n"})
        logs["lr"] = self.lrs_used
        logs["time"] = round(time.perf_counter() - started, 3)
        state.logs = logs
        state.history.append(logs)
        state.report(epoch_line(logs, state.epoch, state.epochs, state.stage))
        state.epoch_done = True

    def _close_epoch(self) -> None:
        state = self.state
        state.history.rows[-1] = dict(state.logs)  # epoch_end callbacks may have changed it
        state.epoch += 1
        state.step = 0
        state.sums = {}
        state.epoch_done = False
