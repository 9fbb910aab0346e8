"""Train on several processes with torchrun: the same script, one process or many.

Run (two processes on the CPU; on GPUs torchrun gives each process its own):

    .venv/bin/torchrun --standalone --nproc_per_node 2 examples/torchrun_fit.py
    .venv/bin/python examples/torchrun_fit.py          # the same run in one process

fit notices the launch and trains data parallel through Hugging Face Accelerate:
batch_size is the global batch, each process trains on its share of every batch (so two
processes make the same updates as one), the frozen convolutions are computed once into
the feature cache (each process computes half of it) and never synchronised, rank 0 alone
prints and writes the checkpoint, and RunOptions(resume=...) continues on any number of
processes.
"""

import os

import torch
from torch import nn

import netgraft
from netgraft.data import load_mnist5k

x, y = load_mnist5k()  # 5,000 real MNIST digits, sorted by label
torch.manual_seed(0)  # every process draws the same split and builds the same model
order = torch.randperm(len(x))
train, val = (x[order[:4000]], y[order[:4000]]), (x[order[4000:]], y[order[4000:]])
model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
)  # fmt: skip
netgraft.freeze(model, ["0", "3"])  # keep the convolutions as they are; train the rest

history = netgraft.fit(
    model,
    train,
    val,
    epochs=3,
    lr=2e-3,
    batch_size=128,  # global: each of N processes takes 128 / N per step
    seed=0,
    callbacks=[netgraft.Checkpoint("runs/torchrun_fit", monitor="val_acc")],
    run=netgraft.RunOptions(
        cache=True,  # the frozen convolutions run once, split between the processes
        cache_dir="runs/torchrun_fit/cache",  # written once, read by every rank
    ),
)
if int(os.environ.get("RANK", "0")) == 0:
    print("validation accuracy:", round(history.last["val_acc"], 4))
