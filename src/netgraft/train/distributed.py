"""Data-parallel training through Hugging Face Accelerate, for ``fit`` started with
``torchrun`` or ``accelerate launch``.

:func:`parallel_for` gives the loop a :class:`Parallel`: in one process without mixed
precision it is the plain one, whose every method does what the loop always did (no
Accelerate needed, results unchanged). Under a launch (``WORLD_SIZE`` above 1) or with
``precision="bf16" | "fp16"`` it is :class:`Accelerated`: an ``accelerate.Accelerator``
places the model, wraps it in ``DistributedDataParallel`` after freezing (so frozen
parameters get no gradient bucket and are never all-reduced), applies mixed precision and
scales fp16 losses.

``batch_size`` is the global batch: every rank reads the same seeded permutation of an
epoch and takes a contiguous share of each global batch (:class:`ShareBatches`). A rank's
mean loss is weighted by ``share * world / global`` before DDP averages the gradients, so
N processes make the same updates as one process over the same global batches. Metric
sums are all-reduced every step, so every rank holds the global running means (what a
checkpoint saves and the progress bar shows). What cannot match one process exactly:
batch norm in training mode normalises each process's share (as under any DDP; convert to
``SyncBatchNorm`` for the global batch's statistics) and random layers (dropout) draw per
process. FSDP and DeepSpeed launches are refused (fit is data parallel). This module never
decides when to save and never changes what is frozen.

Example (``torchrun --nproc_per_node 2 train.py``)::

    >>> netgraft.fit(model, train, val, epochs=3, lr=1e-3, batch_size=64)  # global batch
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..data.batches import take_rows
from ..errors import NetgraftError
from .batches import evaluate, metric_fns

__all__ = [
    "PRECISIONS",
    "Accelerated",
    "Parallel",
    "Share",
    "ShareBatches",
    "bf16_supported",
    "check_precision",
    "evaluate_shared",
    "launched",
    "parallel_for",
    "share_bounds",
    "take_rows",
]

PRECISIONS = (None, "no", "fp32", "bf16", "fp16")
_EXTRA = "pip install 'netgraft[accelerate]'"
# distributed types fit's data-parallel loop supports; FSDP/DeepSpeed shard the weights
_DATA_PARALLEL = (
    "NO",
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_NPU",
    "MULTI_XPU",
    "MULTI_MLU",
    "MULTI_HPU",
)


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun``/``accelerate launch``
    (``WORLD_SIZE`` above 1, or an initialised process group of several ranks)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return True
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def share_bounds(rows: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``rows`` rows split between
    ``world`` ranks (the first ``rows % world`` ranks take one row more)."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` can run bfloat16 autocast: a CPU always can; CUDA when the GPU
    supports it (Ampere and later); MPS on macOS 14 and later."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return torch.backends.mps.is_available() and torch.backends.mps.is_macos_or_newer(14, 0)
    return device.type in ("cpu", "xpu", "hpu")


def check_precision(precision: str | None, device: torch.device) -> str | None:
    """Accelerate's ``mixed_precision`` for ``precision`` (None for full precision), or a
    :class:`NetgraftError` when it is unknown or ``device`` cannot run it."""
    if precision not in PRECISIONS:
        raise NetgraftError(f"precision must be 'bf16', 'fp16' or None; found {precision!r}")
    if precision in (None, "no", "fp32"):
        return None
    if precision == "bf16" and not bf16_supported(device):
        raise NetgraftError(
            f"precision='bf16' needs a device that runs bfloat16; {device} cannot "
            "(a CUDA GPU before Ampere, or MPS before macOS 14): use precision='fp16' or None"
        )
    if precision == "fp16" and device.type == "cpu":
        raise NetgraftError(
            "precision='fp16' needs a GPU (loss scaling runs on CUDA, XPU or MPS); the device "
            "is the CPU: use precision='bf16' or None"
        )
    return precision


class Parallel:
    """One process, full precision: each method does what the loop always did, so a run
    without a launch is unchanged. :class:`Accelerated` overrides them for data-parallel
    and mixed-precision runs."""

    rank = 0
    world_size = 1
    scaler: Any = None  # the fp16 gradient scaler (a checkpoint holds its state)

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints and shows progress (rank 0)."""
        return self.rank == 0

    def same_seed(self, seed: int | None) -> int | None:
        """The run's seed, the same on every rank (None stays None in one process)."""
        return seed

    def sync_weights(self, model: nn.Module) -> None:
        """Give every rank rank 0's weights and buffers."""

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """The module to train (wrapped for data parallelism and mixed precision)."""
        self.optimizer = optimizer
        return module

    def no_sync(self, module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """A context in which a backward pass does not all-reduce (unless ``sync``)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (scaled for fp16)."""
        loss.backward()

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> None:
        """Clip the gradients' global norm to ``max_norm`` (unscaled first under fp16)."""
        nn.utils.clip_grad_norm_(params, max_norm)

    def step(self) -> None:
        """Step the optimizer (skipped by the fp16 scaler when gradients overflowed)."""
        self.optimizer.step()

    def reduce_sums(self, sums: dict[str, float], keys: Iterable[str]) -> dict[str, float]:
        """``sums`` added up over every rank, for ``keys`` (missing ones count as 0)."""
        return sums

    def share_rows(self, rows: int) -> range:
        """This rank's contiguous share of ``rows`` rows (:func:`share_bounds`)."""
        return range(*share_bounds(rows, self.rank, self.world_size))

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``tensor``, concatenated in rank order (on the CPU)."""
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank."""
        return flag

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def finish(self) -> None:
        """Undo what :meth:`prepare` did to the user's module."""


class _Prepared(nn.Module):
    """What Accelerate prepares in place of the user's module: Accelerate marks the module
    it prepares and patches its ``forward`` for autocast, so it is given this shell, thrown
    away after fit, and the user's module comes out as it went in."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class Accelerated(Parallel):
    """Data parallel (DDP) and mixed precision through one ``accelerate.Accelerator``,
    through Accelerate's public API (collectives from ``accelerate.utils``)."""

    def __init__(self, device: torch.device, mixed_precision: str | None):
        accelerate = _import_accelerate()
        _forget_other_precision(accelerate, mixed_precision or "no")
        self.ops = accelerate.utils
        self.accelerator = accelerate.Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=mixed_precision or "no",
            # DDP skips parameters without requires_grad: frozen ones get no bucket, and
            # unused trainable ones would be a bug in the model, reported by DDP
            kwargs_handlers=[self.ops.DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        kind = self.accelerator.distributed_type.name
        if kind not in _DATA_PARALLEL:
            raise NetgraftError(
                f"netgraft.fit runs data parallel (DDP); the launch asks for {kind}: launch "
                "with torchrun, or an accelerate config for multi-CPU/multi-GPU"
            )
        self.scaler = self.accelerator.scaler  # None unless fp16
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        found = self.accelerator.device
        self.device = torch.device("cpu") if found.type == "cpu" else found

    def same_seed(self, seed: int | None) -> int | None:
        if self.world_size == 1:
            return seed
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        return int(self.ops.broadcast_object_list([seed], from_process=0)[0])

    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        if self.world_size > 1:
            self.ops.broadcast([*model.parameters(), *model.buffers()], from_process=0)

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        wrapped = self.accelerator.prepare_model(_Prepared(module), device_placement=False)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer, device_placement=False)
        return wrapped

    def no_sync(self, module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(module)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> None:
        self.accelerator.clip_grad_norm_(params, max_norm)

    def reduce_sums(self, sums: dict[str, float], keys: Iterable[str]) -> dict[str, float]:
        if self.world_size == 1:
            return sums
        names = list(keys)
        values = torch.tensor([sums.get(k, 0.0) for k in names], dtype=torch.float64)
        values = self.ops.reduce(values.to(self.device), reduction="sum")
        return {k: float(v) for k, v in zip(names, values.tolist(), strict=True)}

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        local = tensor.to(self.device)
        counts = self.accelerator.gather(torch.tensor([len(local)], device=self.device))
        padded = self.accelerator.pad_across_processes(local, dim=0)
        parts = self.accelerator.gather(padded).chunk(self.world_size)
        return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)]).cpu()

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.ops.reduce(value, reduction="sum").item() > 0)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def finish(self) -> None:
        # the prepared shell (and its DDP wrapper) go; the user's module was never patched
        self.accelerator.free_memory()


def _import_accelerate() -> Any:
    try:
        import accelerate
        import accelerate.utils
    except ImportError as exc:
        raise NetgraftError(
            "fit runs data parallel (a torchrun/accelerate launch) and in mixed precision "
            f"through Hugging Face Accelerate, which is not installed: {_EXTRA}"
        ) from exc
    return accelerate


def _forget_other_precision(accelerate: Any, mixed_precision: str) -> None:
    """Let a later fit in the same process use another precision: Accelerate keeps one
    process-wide state and refuses to change it, so its precision part is reset (the
    process group is kept)."""
    # No public API changes the precision of an initialised AcceleratorState: its
    # _check_initialized says "restart your runtime". Accelerate's own tests reset it
    # this way (huggingface/accelerate#1055, #1740); the one private call left here.
    state = accelerate.state.AcceleratorState
    if state._shared_state and state._shared_state.get("_mixed_precision") != mixed_precision:
        state._reset_state(reset_partial_state=False)


def parallel_for(device: torch.device, precision: str | None = None) -> Parallel:
    """The plain :class:`Parallel` for one process in full precision; :class:`Accelerated`
    under a launch or with mixed precision. ``device``'s type chooses the CPU or the
    accelerator; under a launch each process takes the one Accelerate gives it (its local
    rank's GPU). Raises :class:`NetgraftError` before any training when the precision
    cannot run on ``device`` or Accelerate is missing."""
    mixed = check_precision(precision, device)
    if mixed is None and not launched():
        return Parallel(device)
    return Accelerated(device, mixed)


class ShareBatches(Sampler[list[int]]):
    """This rank's share of every global batch: ``sampler`` (the epoch's order, every rank
    the same) cut into batches of ``batch_size``, of which rank ``rank`` takes its
    contiguous share. An empty share (a last batch smaller than the world) reads the
    batch's first example, which the loop weights by zero."""

    def __init__(self, sampler: Iterable[int], batch_size: int, rank: int, world: int):
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for begin in range(0, len(order), self.batch_size):
            batch = order[begin : begin + self.batch_size]
            start, stop = share_bounds(len(batch), self.rank, self.world)
            yield batch[start:stop] if stop > start else batch[:1]

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)  # type: ignore[arg-type]


@dataclass
class Share:
    """One step's part of a global batch on this rank: ``rows`` examples of ``total``, and
    the weight its mean loss gets so DDP's average of gradients is the global mean's."""

    rows: int
    total: int
    world: int

    @property
    def weight(self) -> float:
        return self.rows * self.world / self.total if self.total else 0.0


def evaluate_shared(
    parallel: Parallel, module: nn.Module, data: Any, **kwargs: Any
) -> dict[str, float]:
    """:func:`netgraft.evaluate` with a dataset split between the ranks and the sums
    all-reduced, so every rank gets the scores over the whole of ``data`` (a DataLoader is
    evaluated whole on every rank)."""
    if parallel.world_size == 1 or isinstance(data, DataLoader) or not isinstance(data, Dataset):
        return evaluate(module, data, **kwargs)
    start, stop = share_bounds(len(data), parallel.rank, parallel.world_size)  # type: ignore[arg-type]
    sums: dict[str, float] = {}
    if stop > start:
        scores = evaluate(module, Subset(data, range(start, stop)), **kwargs)
        sums = {k: v * scores["n"] for k, v in scores.items() if k != "n"}
        sums["n"] = scores["n"]
    keys = ["n", "loss", *metric_fns(kwargs.get("metrics", ("acc",)))]
    total = parallel.reduce_sums(sums, keys)
    n = total.get("n", 0)
    return {**{k: (v / n if n else float("nan")) for k, v in total.items() if k != "n"}, "n": n}
