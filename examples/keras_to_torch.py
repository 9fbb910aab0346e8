"""Move a Keras model's weights into the equivalent PyTorch model, with a full report.

Run: KERAS_BACKEND=torch .venv/bin/python examples/keras_to_torch.py
"""

import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import netgraft  # noqa: E402

keras_model = keras.Sequential(
    [
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(20, activation="relu"),
        keras.layers.Dense(10),
    ]
)
torch_model = nn.Sequential(
    nn.Conv2d(1, 4, 3, padding=1),
    nn.ReLU(),
    nn.BatchNorm2d(4, eps=1e-3),  # Keras' epsilon
    nn.Flatten(),
    nn.Linear(4 * 8 * 8, 20),
    nn.ReLU(),
    nn.Linear(20, 10),
).eval()

with tempfile.TemporaryDirectory() as tmp:
    path = f"{tmp}/model.keras"
    keras_model.save(path)
    report = netgraft.transfer(path, torch_model)  # Flatten->Dense rows permuted NHWC->NCHW
print(report)
report.assert_complete()

x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
expected = keras.ops.convert_to_numpy(keras_model(x, training=False))  # any backend
got = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
print("max |delta| Keras vs torch:", float(np.abs(expected - got).max()))
