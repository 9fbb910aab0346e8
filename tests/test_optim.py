"""param_groups: trainable parameters only, discriminative rates over blocks, no decay on
norms and biases (real torchvision architectures)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

import netgraft
from netgraft.errors import NetgraftError
from netgraft.optim import block_rates, param_groups


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_lr_mult_spreads_rates_geometrically_from_first_block_to_top(resnet):
    groups = param_groups(resnet, 1e-3, lr_mult=100)
    names = [g["name"] for g in groups]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    lrs = [g["lr"] for g in groups]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-3)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(r == pytest.approx(100 ** (1 / 5)) for r in ratios)


def test_layer_decay_multiplies_rate_per_block_below_the_top(resnet):
    groups = param_groups(resnet, 1e-2, layer_decay=0.5)
    assert [g["lr"] for g in groups] == pytest.approx([1e-2 * 0.5**k for k in range(5, -1, -1)])


def test_only_trainable_parameters_and_each_exactly_once(resnet):
    netgraft.freeze(resnet, ["conv1", "bn1", "layer1"])
    groups = param_groups(resnet, 1e-3, lr_mult=10, weight_decay=0.05)
    in_groups = [p for g in groups for p in g["params"]]
    trainable = [p for p in resnet.parameters() if p.requires_grad]
    assert len(in_groups) == len(trainable) == len({id(p) for p in in_groups})
    assert not any(g["name"].startswith(("stem", "layer1")) for g in groups)
    # rates stay tied to each block's position, not to how many blocks are trainable
    assert next(g["lr"] for g in groups if g["name"] == "layer2") == pytest.approx(
        1e-3 / 10 ** (3 / 5)
    )


def test_norm_and_bias_parameters_get_no_weight_decay(resnet):
    groups = param_groups(resnet, 1e-3, weight_decay=0.05)
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, module in resnet.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            group = by_id[id(p)]
            if isinstance(module, torch.nn.BatchNorm2d) or pname == "bias":
                assert group["weight_decay"] == 0.0 and group["name"].endswith("(no decay)")
            else:
                assert group["weight_decay"] == 0.05, f"{name}.{pname}"
    kept = param_groups(resnet, 1e-3, weight_decay=0.05, no_decay_norm_bias=False)
    assert all(g["weight_decay"] == 0.05 for g in kept)


def test_groups_drive_a_real_optimizer_with_their_names(resnet):
    opt = torch.optim.AdamW(param_groups(resnet, 1e-3, lr_mult=100))
    assert netgraft.optim.group_lrs(opt)["fc"] == pytest.approx(1e-3)
    assert netgraft.optim.group_lrs(opt)["stem"] == pytest.approx(1e-5)


def test_nothing_trainable_and_conflicting_options_are_clear_errors(resnet):
    with pytest.raises(NetgraftError, match="both"):
        param_groups(resnet, 1e-3, lr_mult=10, layer_decay=0.7)
    with pytest.raises(NetgraftError, match="lr_mult"):
        block_rates(3, 1e-3, lr_mult=0.5)
    netgraft.freeze(resnet)
    with pytest.raises(NetgraftError, match="no trainable parameters"):
        param_groups(resnet, 1e-3)


def test_single_block_model_gets_the_top_rate():
    assert block_rates(1, 0.1, lr_mult=100) == [0.1]
    assert math.isclose(block_rates(2, 0.1, lr_mult=100)[0], 0.001)
