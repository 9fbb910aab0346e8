"""The training loop: :func:`fit`, :func:`evaluate` and :func:`predict`.

A lean loop for the library and the CLI: supervised batches ``(inputs, targets)`` (or
Hugging Face style dicts with ``labels``), a loss, metrics, optional validation, a
progress bar and one line per epoch with losses, metrics and every group's learning
rate. It is deterministic on CPU for a given ``seed``: the data order of epoch ``e``
is a permutation drawn from its own generator seeded with ``(seed, e)``, so a run can
resume exactly from a checkpoint taken between or within epochs. Frozen parameters
are never handed to the optimizer. The loop never changes what is frozen.

Example::

    >>> history = netgraft.fit(model, (x, y), (x_val, y_val), epochs=3, lr=1e-3,
    ...                        callbacks=[netgraft.Checkpoint("runs/a")], seed=0)
    >>> netgraft.fit(model, (x, y), (x_val, y_val), epochs=5, lr=1e-3,
    ...              callbacks=[netgraft.Checkpoint("runs/a")], seed=0, resume="runs/a")
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import NetgraftError
from ..freeze import frozen_state, load_frozen_state
from ..optim import group_lrs, param_groups
from .callbacks import CHECKPOINT_FORMAT, Checkpoint, load_checkpoint
from .history import History

__all__ = ["EpochSampler", "TrainState", "evaluate", "fit", "format_lrs", "predict"]

log = logging.getLogger("netgraft.train")

Metric = str | Callable[[torch.Tensor, torch.Tensor], Any]


class EpochSampler(Sampler[int]):
    """Indices of a dataset in the order of epoch ``e``: a permutation drawn from a generator
    seeded with ``(seed, e)`` (or ``0..n-1`` without shuffling), minus the first ``skip``."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.skip :])

    def __len__(self) -> int:
        return max(self.n - self.skip, 0)


def _as_dataset(data: Any) -> Dataset | DataLoader:
    from ..data import as_dataset

    return data if isinstance(data, DataLoader) else as_dataset(data)


def _loader(data: Dataset | DataLoader, batch_size: int, sampler: Sampler | None) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    # a dedicated generator keeps DataLoader from drawing its worker seed from the global RNG
    return DataLoader(
        data, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(0)
    )


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _split(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise NetgraftError("a dict batch needs a 'labels' entry with the targets")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise NetgraftError(
        "expected batches of (inputs, targets) or dicts with 'labels'; "
        f"found {type(batch).__name__}{f' of {len(batch)} items' if isinstance(batch, (list, tuple)) else ''}"
    )


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise NetgraftError(f"cannot find the predictions in the model output ({type(out).__name__})")


def _metric_fns(
    metrics: Iterable[Metric],
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {}
    for m in metrics:
        if callable(m):
            fns[getattr(m, "__name__", type(m).__name__)] = m
        elif m in ("acc", "accuracy"):
            fns["acc"] = lambda out, y: (out.argmax(-1) == y).float().mean()
        elif isinstance(m, str) and m.startswith("top") and m[3:].isdigit():
            k = int(m[3:])
            fns[m] = lambda out, y, k=k: (
                (out.topk(min(k, out.shape[-1]), -1).indices == y.unsqueeze(-1))
                .any(-1)
                .float()
                .mean()
            )
        else:
            raise NetgraftError(f"unknown metric {m!r}; use 'acc', 'topK' or a function(out, y)")
    return fns


def _loss_fn(loss: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss is None or loss == "cross_entropy":
        return nn.CrossEntropyLoss()
    if loss == "mse":
        return nn.MSELoss()
    if callable(loss):
        return loss
    raise NetgraftError(f"unknown loss {loss!r}; use 'cross_entropy', 'mse' or a function")


def _update(
    sums: dict[str, float], loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, fns
) -> None:
    n = int(y.shape[0]) if y.ndim else 1
    sums["n"] = sums.get("n", 0) + n
    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
    with torch.no_grad():
        for name, fn in fns.items():
            sums[name] = sums.get(name, 0.0) + float(fn(out.detach(), y)) * n


def _means(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    n = sums.get("n", 0)
    return {f"{prefix}{k}": (v / n if n else math.nan) for k, v in sums.items() if k != "n"}


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    loss: Any = None,
    metrics: Sequence[Metric] = ("acc",),
    batch_size: int = 64,
    device: Any = None,
) -> dict[str, float]:
    """Mean loss and metrics of ``model`` over ``data`` (a dataset, ``(x, y)`` tensors or
    arrays, or a DataLoader) in inference mode; the model's train/eval modes are restored."""
    dataset = _as_dataset(data)
    loader = _loader(dataset, batch_size, None)
    fns, loss_fn = _metric_fns(metrics), _loss_fn(loss)
    device = _resolve_device(device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    sums: dict[str, float] = {}
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = _split(_to(batch, device))
                out = _forward(model, x)
                _update(sums, loss_fn(out, y), out, y, fns)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {**_means(sums), "n": sums.get("n", 0)}


def predict(
    model: nn.Module, inputs: torch.Tensor, *, k: int = 5, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` softmax probabilities and class indices of ``model`` for a batch of inputs."""
    device = _resolve_device(device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            probs = _forward(model, _to(inputs, device)).softmax(-1)
    finally:
        for m, mode in modes.items():
            m.training = mode
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return top.values.cpu(), top.indices.cpu()


def format_lrs(lrs: dict[str, float]) -> str:
    """Learning rates by group for a log line; neighbouring groups with the same rate are
    shown as one range (``lr features.0…features.3=1e-05, classifier=0.001``)."""
    parts: list[str] = []
    suffix = " (no decay)"
    # a block's no-decay group at the block's own rate says nothing new: show the block once
    items = [
        (name, rate)
        for name, rate in lrs.items()
        if not (name.endswith(suffix) and lrs.get(name[: -len(suffix)]) == rate)
    ]
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1][1] == items[i][1]:
            j += 1
        names = items[i][0] if i == j else f"{items[i][0]}…{items[j][0]}"
        parts.append(f"{names}={items[i][1]:.3g}")
        i = j + 1
    return "lr " + ", ".join(parts)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _Reporter:
    """One line per event to the ``netgraft.train`` logger and, unless quiet, to a rich
    console on stderr (above the progress bar)."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False)
        self.progress: Any = None

    def __call__(self, line: str) -> None:
        log.info(line)
        if not self.quiet:
            target = self.progress.console if self.progress is not None else self.console
            target.print(line, markup=False, highlight=False, soft_wrap=True)

    def bar(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=True,
            disable=self.quiet,
        )
        return self.progress


@dataclass
class TrainState:
    """What callbacks see: the model and optimizer being trained, where the loop is
    (``epoch`` is 0-based, ``step`` counts optimizer steps within it), the epoch's ``logs``
    once it ends, and ``stop_training`` which a callback sets to end the run."""

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

    def checkpoint(self) -> dict[str, Any]:
        """The full training state as a plain dict of tensors and numbers (loadable with
        ``torch.load(weights_only=True)``), to continue exactly where the loop is now."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch + 1 if self.epoch_done else self.epoch,
            "step": 0 if self.epoch_done else self.step,
            "global_step": self.global_step,
            "sums": {} if self.epoch_done else dict(self.sums),
            "seed": self.seed,
            "rng": _rng_state(),
            "frozen": frozen_state(self.model),
            "history": self.history.to_dict(),
            "callbacks": [
                {"type": type(cb).__name__, "state": cb.state_dict()}
                for cb in self.callbacks
                if hasattr(cb, "state_dict")
            ],
        }


def _make_optimizer(
    model: nn.Module,
    optimizer: Any,
    lr: float | None,
    lr_mult: float | None,
    layer_decay: float | None,
    weight_decay: float,
) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        if lr is not None:
            raise NetgraftError("give lr or an optimizer instance, not both")
        return optimizer
    if lr is None:
        raise NetgraftError("fit needs lr= (or an optimizer instance)")
    groups = param_groups(
        model, lr, lr_mult=lr_mult, layer_decay=layer_decay, weight_decay=weight_decay
    )
    if callable(optimizer):
        return optimizer(groups)
    name = str(optimizer).lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise NetgraftError(
        f"unknown optimizer {optimizer!r}; use 'adamw', 'adam', 'sgd', an optimizer or a "
        "function(param_groups) -> optimizer"
    )


def _make_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    if scheduler is None or scheduler == "constant":
        return None
    total_steps = max(total_steps, 1)
    if scheduler == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
    if scheduler == "onecycle":
        if total_steps < 4:  # too short for a warm-up and an annealing phase: keep the rate
            return None
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            # at least two warm-up steps: OneCycleLR divides by the warm-up length minus one
            pct_start=min(0.5, max(0.25, 2 / total_steps)),
        )
    if callable(scheduler):
        return scheduler(optimizer, total_steps)
    raise NetgraftError(
        f"unknown scheduler {scheduler!r}; use 'constant', 'cosine', 'onecycle' or a "
        "function(optimizer, total_steps) -> scheduler"
    )


def _cache_plan(
    model: nn.Module, train: Any, cache: Any, val: Any, options: dict[str, Any] | None
) -> Any:
    if cache is False or isinstance(train, DataLoader):
        return None
    from ..cache import plan

    return plan(model, train, cache=cache, val=val, **(options or {}))


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
) -> History:
    """Train ``model`` in place for ``epochs`` epochs and return the :class:`History`.

    ``train``/``val`` are datasets, ``(x, y)`` tensors or numpy arrays (or DataLoaders,
    used as they are). With ``lr``, the optimizer (``"adamw"``, ``"adam"``, ``"sgd"`` or a
    function of the groups) is built over :func:`netgraft.param_groups` (trainable
    parameters only; ``lr_mult``/``layer_decay`` give discriminative rates); or pass an
    optimizer instance. ``scheduler`` (``"cosine"``, ``"onecycle"`` or a function of
    ``(optimizer, total_steps)``) steps every batch. ``loss`` defaults to cross-entropy.
    ``resume`` (a checkpoint folder or file) continues a run exactly, given the same data
    and arguments. ``cache`` lets frozen leading layers be computed once
    (:mod:`netgraft.cache`); ``cache_options`` go to :func:`netgraft.cache.plan` (``dir`` keeps
    the features on disk for later runs, ``dtype``, ``augment_copies`` caches that many
    augmented passes, read in turn by epoch). ``quiet`` hides the progress bar and the epoch lines (they
    still go to the ``netgraft.train`` logger).
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise NetgraftError(f"epochs must be a non-negative integer; found {epochs!r}")
    device = _resolve_device(device)
    callbacks = list(callbacks)
    # checkpoints run last so they save what the other callbacks changed (a reduced lr)
    callbacks.sort(key=lambda cb: isinstance(cb, Checkpoint))
    payload = load_checkpoint(resume) if resume is not None else None
    if payload is not None:
        seed = payload["seed"]
        load_frozen_state(model, payload["frozen"])
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if payload is None:
        _seed_everything(seed)
    model.to(device)
    if payload is not None:
        model.load_state_dict(payload["model"])
    for p in model.parameters():
        if not p.requires_grad:
            p.grad = None  # a stale gradient would let the optimizer move a frozen parameter

    train_data = _as_dataset(train)
    val_data = _as_dataset(val) if val is not None else None
    plan = _cache_plan(model, train_data, cache, val_data, cache_options)
    report = _Reporter(quiet)
    if plan is not None:
        report(plan.describe())
        train_data = plan.train
        if getattr(plan, "val", None) is not None:
            val_data = plan.val
    train_model = plan.model if plan is not None else model
    val_model = (
        train_model if plan is not None and getattr(plan, "val", None) is not None else model
    )

    sampler = (
        None if isinstance(train_data, DataLoader) else EpochSampler(len(train_data), seed, shuffle)
    )
    loader = _loader(train_data, batch_size, sampler)
    steps_per_epoch = (
        math.ceil(len(train_data) / batch_size) if sampler is not None else len(loader)
    )
    opt = _make_optimizer(model, optimizer, lr, lr_mult, layer_decay, weight_decay)
    sched = _make_scheduler(scheduler, opt, epochs * steps_per_epoch)
    history = History()
    state = TrainState(model, opt, sched, history, epochs, seed, callbacks, report, stage=stage)
    if payload is not None:
        opt.load_state_dict(payload["optimizer"])
        if sched is not None and payload.get("scheduler") is not None:
            sched.load_state_dict(payload["scheduler"])
        history.rows[:] = History.from_dict(payload["history"]).rows
        state.epoch, state.step = payload["epoch"], payload["step"]
        state.global_step, state.sums = payload["global_step"], dict(payload["sums"])
        _restore_callbacks(callbacks, payload.get("callbacks", []))
        _set_rng_state(payload["rng"])
        report(f"resuming from {resume}: epoch {state.epoch + 1}, step {state.step}")

    fns, loss_fn = _metric_fns(metrics), _loss_fn(loss)
    for cb in callbacks:
        getattr(cb, "on_train_begin", lambda s: None)(state)
    prefix = f"{stage} · " if stage else ""
    with report.bar() as progress:
        while state.epoch < epochs and not state.stop_training:
            e = state.epoch
            skip = state.step
            if skip and sampler is None:
                raise NetgraftError("resuming within an epoch needs a dataset, not a DataLoader")
            if sampler is not None:
                sampler.set_epoch(e, skip * batch_size)
            if plan is not None:
                plan.set_epoch(e)  # augmented caches: pass e % K
            if skip == 0:
                state.sums = {}
            state.epoch_done = False
            state.logs = {}
            for cb in callbacks:
                getattr(cb, "on_epoch_begin", lambda s: None)(state)
            task = progress.add_task(
                f"{prefix}epoch {e + 1}/{epochs}", total=steps_per_epoch, completed=skip, info=""
            )
            model.train()
            train_model.train()
            started = time.perf_counter()
            lrs_used = group_lrs(opt)
            for batch in loader:
                for cb in callbacks:
                    getattr(cb, "on_batch_begin", lambda s: None)(state)
                x, y = _split(_to(batch, device))
                out = _forward(train_model, x)
                batch_loss = loss_fn(out, y)
                if not torch.isfinite(batch_loss):
                    raise NetgraftError(
                        f"the loss became {float(batch_loss)} at epoch {e + 1}, step "
                        f"{state.step + 1}; lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                batch_loss.backward()
                if max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(
                        [p for g in opt.param_groups for p in g["params"]], max_grad_norm
                    )
                lrs_used = group_lrs(opt)
                opt.step()
                if sched is not None:
                    sched.step()
                _update(state.sums, batch_loss, out, y, fns)
                state.step += 1
                state.global_step += 1
                progress.update(
                    task, advance=1, info=f"loss {state.sums['loss'] / state.sums['n']:.4f}"
                )
                for cb in callbacks:
                    getattr(cb, "on_batch_end", lambda s: None)(state)
            progress.remove_task(task)
            logs: dict[str, Any] = {"epoch": len(history) + 1}
            if stage:
                logs["stage"] = stage
            logs.update(_means(state.sums))
            if val_data is not None:
                scores = evaluate(
                    val_model,
                    val_data,
                    loss=loss_fn,
                    metrics=metrics,
                    batch_size=batch_size * 2,
                    device=device,
                )
                logs.update({f"val_{k}": v for k, v in scores.items() if k != "n"})
            logs["lr"] = lrs_used
            logs["time"] = round(time.perf_counter() - started, 3)
            state.logs = logs
            history.append(logs)
            shown = " · ".join(
                f"{k} {v:.4f}" for k, v in logs.items() if k not in ("epoch", "stage", "lr", "time")
            )
            report(
                f"{prefix}epoch {e + 1}/{epochs} · {shown} · {format_lrs(lrs_used)} · {logs['time']:.1f}s"
            )
            state.epoch_done = True
            for cb in callbacks:
                getattr(cb, "on_epoch_end", lambda s: None)(state)
            history.rows[-1] = dict(state.logs)
            state.epoch += 1
            state.step = 0
            state.sums = {}
            state.epoch_done = False
    for cb in callbacks:
        getattr(cb, "on_train_end", lambda s: None)(state)
    return history
