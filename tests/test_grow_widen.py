"""widen (Net2WiderNet): wider layers computing exactly what the narrower ones did."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import netgraft
from netgraft.errors import EquivalenceError, SurgeryError
from netgraft.recipe import replay


def conv_bn_net() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 6, 3, padding=1),
            bn1=nn.BatchNorm2d(6),
            act1=nn.ReLU(),
            conv2=nn.Conv2d(6, 8, 3),
            act2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            out=nn.Linear(8, 10),
        )
    )


def conv_flatten_net() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 5, 3),
            act=nn.ReLU(),
            flatten=nn.Flatten(),
            hidden=nn.Linear(5 * 6 * 6, 20),
            hidden_act=nn.ReLU(),
            out=nn.Linear(20, 10),
        )
    )


@pytest.fixture(scope="module")
def digits64(digits):
    x, y = digits
    return x[:256].double(), y[:256]


def _with_real_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give the BatchNorm running statistics from real digits and non-trivial affine."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for batch in x.split(64):
            model(batch)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def test_widen_conv_bn_relu_conv_is_exact_and_carries_batchnorm(digits64):
    x, _ = digits64
    torch.manual_seed(0)
    model = _with_real_statistics(conv_bn_net().double(), x)
    base = copy.deepcopy(model)
    expected = model(x)
    netgraft.widen(model, "conv1", 10, example_input=x[:4])
    assert model.conv1.weight.shape == (10, 1, 3, 3)
    assert model.bn1.running_mean.shape == (10,) and model.bn1.num_features == 10
    assert model.conv2.weight.shape == (8, 10, 3, 3)
    # the copied units carry the originals' statistics and affine parameters
    assert set(model.bn1.running_var.tolist()) == set(base.bn1.running_var.tolist())
    assert (model(x) - expected).abs().max().item() <= 1e-10
    assert netgraft.verify_equivalence(base, model, x) <= 1e-10
    assert list(model.state_dict()) == list(base.state_dict())  # names unchanged


def test_widen_with_noise_splits_weights_unequally_and_stays_exact(digits64):
    x, _ = digits64
    torch.manual_seed(0)
    model = _with_real_statistics(conv_bn_net().double(), x)
    expected = model(x)
    netgraft.widen(model, "conv1", 12, noise=0.3, example_input=x[:4])
    netgraft.widen(model, "conv2", 16, noise=0.3, example_input=x[:4])
    copies = model.conv2.weight[:, 6:]
    originals = model.conv2.weight[:, :6]
    assert not any(
        torch.allclose(copies[:, i], originals[:, j]) for i in range(6) for j in range(6)
    )
    assert (model(x) - expected).abs().max().item() <= 1e-10


def test_widen_conv_before_flatten_linear_is_exact(digits64):
    x, _ = digits64
    torch.manual_seed(0)
    model = conv_flatten_net().double().eval()
    expected = model(x)
    netgraft.widen(model, "conv", 7, example_input=x[:4])
    assert model.hidden.weight.shape == (20, 7 * 36)
    netgraft.widen(model, "hidden", 32, example_input=x[:4])
    assert model.out.weight.shape == (10, 32)
    assert (model(x) - expected).abs().max().item() <= 1e-10


def test_widen_in_float32_is_within_1e_5(digits64):
    x, _ = digits64
    torch.manual_seed(0)
    model = conv_flatten_net().eval()
    expected = model(x.float())
    netgraft.widen(model, "hidden", 50, example_input=x[:4].float())
    assert (model(x.float()) - expected).abs().max().item() <= 1e-5


def test_recorded_widen_replays_on_a_fresh_base(digits64):
    x, _ = digits64
    torch.manual_seed(0)
    model = conv_flatten_net().double().eval()
    netgraft.widen(model, "conv", 9, example_input=x[:4])
    ops = netgraft.get_recipe(model).operations
    assert ops[-1]["args"]["next_layer"] == "hidden"
    rebuilt = replay(conv_flatten_net().double(), ops).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x), model(x))


def test_refuses_widening_into_a_residual_addition():
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(SurgeryError, match="residual addition"):
        netgraft.widen(model, "layer1.0.conv2", 80)
    assert model.layer1[0].conv2.out_channels == 64


def test_refuses_what_it_cannot_widen_exactly():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    with pytest.raises(SurgeryError, match="Linear or Conv2d"):
        netgraft.widen(model, "features.0.1", 40)
    with pytest.raises(SurgeryError, match="grouped"):
        netgraft.widen(model, "features.1.conv.0.0", 40)
    with pytest.raises(SurgeryError, match="must be an integer above 32"):
        netgraft.widen(model, "features.0.0", 16)
    with pytest.raises(SurgeryError, match="model's output"):
        netgraft.widen(model, "classifier.1", 20, example_input=torch.randn(1, 3, 32, 32))


def test_verify_equivalence_measures_and_raises_on_different_models(digits64):
    x, _ = digits64
    torch.manual_seed(0)
    a = conv_flatten_net().double()
    b = conv_flatten_net().double()
    delta = netgraft.verify_equivalence(a, b, x)
    assert delta > 1e-3
    with pytest.raises(EquivalenceError, match="max"):
        netgraft.verify_equivalence(a, b, x, atol=1e-6)
    assert netgraft.verify_equivalence(a, copy.deepcopy(a), x, atol=0.0) == 0.0
