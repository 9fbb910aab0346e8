"""Fine-tune a small CNN on the real MNIST digits: head first from cached features, then all.

Run: .venv/bin/python examples/finetune_digits.py
"""

import torch
from torch import nn

import netgraft
from netgraft.data import load_mnist5k

x, y = load_mnist5k()  # 5,000 real MNIST digits
torch.manual_seed(0)
order = torch.randperm(len(x))
train, val = (x[order[:1000]], y[order[:1000]]), (x[order[4000:]], y[order[4000:]])

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
)  # fmt: skip
netgraft.summary(model, x[:1])

# head epochs train from cached features of the frozen layers (said in the log), then all
config = netgraft.FineTuneConfig(head_epochs=2, base_lr=2e-3)
history = netgraft.fine_tune(model, train, val, epochs=2, config=config, seed=0)
print("validation accuracy:", history.last["val_acc"])
