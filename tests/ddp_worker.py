"""One process of the data-parallel tests (tests/test_distributed.py), started with
``python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_worker.py
OUT SCENARIO...``; not a test module itself.

Scenarios, run in the order given, each writing ``OUT/<scenario>_rank<r>.pt``:

- ``fit``: the digits MLP trained on real digits; records which examples each rank read.
- ``cached``: the same with its first layer frozen and ``cache="auto"`` on disk; records how
  many rows went through the frozen layer on each rank (``cached_in_memory``: in memory).
- ``accumulate``: the plain fit with each rank's share in 3 micro-batches.
- ``frozen``: the frozen-prefix model trained whole, counting the bytes DDP all-reduces.
- ``loader``: the plain fit over a caller's DataLoader (each rank keeps its share of batches).
- ``fine_tune``: ``netgraft.fine_tune`` (head stage from cached features, then all).
- ``crash``: trains with a checkpoint every 10 steps and exits the whole process (every rank,
  after the barrier) right after the first one is written.
- ``resume``: continues the crashed run from its checkpoint to the end.
- ``restart``: under ``torchrun --max-restarts 1``, trains with ``resume="auto"`` and a
  checkpoint every 10 steps; on the first attempt rank 0 is SIGKILLed halfway through
  writing its second checkpoint, torchrun restarts both ranks and they continue from the
  first. Records what the checkpoint folder held when the restarted rank started.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, Dataset, TensorDataset

import netgraft
from netgraft.data import load_digits
from netgraft.train import Callback

EPOCHS = 2
BATCH = 64
LR = 3e-3
SEED = 0
CRASH_STEP = 10


def digits() -> TensorDataset:
    """Real digits in float64 (a dataset: fit would make float32 of tensors), so the
    reduction order (threads, processes) cannot matter."""
    x, y = load_digits()
    return TensorDataset(x.double(), y)


def make_model(frozen_prefix: bool = False) -> nn.Module:
    """A small MLP over 8x8 digits (float64), the same on every process."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).double()
    if frozen_prefix:
        netgraft.freeze(model, "1")
    return model


def fit_args() -> dict:
    """The arguments every run (one or two processes) trains with."""
    return {"epochs": EPOCHS, "lr": LR, "batch_size": BATCH, "seed": SEED, "quiet": True}


class Recorded(Dataset):
    """Digits that remember which indices were read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.seen = x, y, []

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.seen.append(int(i))
        return self.x[i], self.y[i]


class EpochReads(Callback):
    """Moves the indices read during each epoch into a list per epoch."""

    def __init__(self, data: Recorded):
        self.data, self.epochs = data, []

    def on_epoch_end(self, state) -> None:
        self.epochs.append(list(self.data.seen))
        self.data.seen.clear()


class ExitAfterFirstSave(netgraft.Checkpoint):
    """A checkpoint every ``every_steps`` steps; the process dies right after the first."""

    def on_batch_end(self, state) -> None:
        super().on_batch_end(state)  # rank 0 writes, every rank waits at the barrier
        if state.global_step == self.every_steps:
            os._exit(3)


def scenario_fit(out: Path, rank: int) -> dict:
    data = Recorded(*digits().tensors)
    reads = EpochReads(data)
    model = make_model()
    history = netgraft.fit(model, data, callbacks=[reads], cache=False, **fit_args())
    return {"state": model.state_dict(), "history": history.rows, "reads": reads.epochs}


def scenario_cached(out: Path, rank: int, options: dict | None = None) -> dict:
    model = make_model(frozen_prefix=True)
    rows = []
    model[1].register_forward_hook(lambda m, i, o: rows.append(int(o.shape[0])))
    options = {"dir": str(out / "cache")} if options is None else options
    history = netgraft.fit(model, digits(), cache="auto", cache_options=options, **fit_args())
    return {"state": model.state_dict(), "history": history.rows, "prefix_rows": sum(rows)}


def scenario_cached_in_memory(out: Path, rank: int) -> dict:
    return scenario_cached(out, rank, options={})


def scenario_accumulate(out: Path, rank: int) -> dict:
    model = make_model()
    history = netgraft.fit(model, digits(), cache=False, accumulate=3, **fit_args())
    return {"state": model.state_dict(), "history": history.rows}


def scenario_frozen(out: Path, rank: int) -> dict:
    """The frozen-prefix model trained whole (no cache), counting what DDP all-reduces."""
    sent = []

    def counting(state, bucket):
        sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return default_hooks.allreduce_hook(None, bucket)

    ddp = torch.nn.parallel.DistributedDataParallel
    original = ddp.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.register_comm_hook(None, counting)

    ddp.__init__ = init
    try:
        model = make_model(frozen_prefix=True)
        history = netgraft.fit(model, digits(), cache=False, **fit_args())
    finally:
        ddp.__init__ = original
    return {"state": model.state_dict(), "history": history.rows, "allreduced_bytes": sent}


def scenario_loader(out: Path, rank: int) -> dict:
    model = make_model()
    loader = DataLoader(digits(), batch_size=BATCH)  # every rank reads whole batches
    args = {k: v for k, v in fit_args().items() if k != "batch_size"}
    history = netgraft.fit(model, loader, cache=False, **args)
    return {"state": model.state_dict(), "history": history.rows}


def scenario_fine_tune(out: Path, rank: int) -> dict:
    model = make_model()
    history = netgraft.fine_tune(model, digits(), **fine_tune_args())
    return {"state": model.state_dict(), "history": history.rows}


def fine_tune_args() -> dict:
    """fine_tune's arguments: head first (from cached features), then everything."""
    return {"config": netgraft.FineTuneConfig(head_epochs=1, base_lr=1e-2), "epochs": 1,
            "batch_size": BATCH, "seed": SEED, "quiet": True}  # fmt: skip


def scenario_crash(out: Path, rank: int) -> dict:
    model = make_model()
    save = ExitAfterFirstSave(out / "ckpt", monitor="loss", mode="min", every_steps=CRASH_STEP)
    netgraft.fit(model, digits(), callbacks=[save], cache=False, **fit_args())
    raise AssertionError("the crash scenario should have exited after its first checkpoint")


def scenario_resume(out: Path, rank: int) -> dict:
    model = make_model()
    save = netgraft.Checkpoint(out / "ckpt", monitor="loss", mode="min", every_steps=CRASH_STEP)
    args = fit_args()
    history = netgraft.fit(
        model, digits(), callbacks=[save], cache=False, resume=out / "ckpt", **args
    )
    return {"state": model.state_dict(), "history": history.rows}


def _die_during_second_save() -> None:
    """Make this process SIGKILL itself halfway through writing its second checkpoint."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < 2:
            return real(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def scenario_restart(out: Path, rank: int) -> dict:
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    folder = out / "restart_ckpt"
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    step = None
    if (folder / "last.pt").is_file():
        step = torch.load(folder / "last.pt", weights_only=True)["global_step"]
    if attempt == 0 and rank == 0:
        _die_during_second_save()
    save = netgraft.Checkpoint(folder, monitor="loss", mode="min", every_steps=CRASH_STEP)
    model = make_model()
    history = netgraft.fit(
        model, digits(), callbacks=[save], cache=False, resume="auto", **fit_args()
    )
    return {"state": model.state_dict(), "history": history.rows, "attempt": attempt,
            "found": found, "found_step": step}  # fmt: skip


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    for name in sys.argv[2:]:
        result = globals()[f"scenario_{name}"](out, rank)
        torch.save(result, out / f"{name}_rank{rank}.pt")


if __name__ == "__main__":
    main()
