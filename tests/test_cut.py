"""cut(): prefix and suffix compose to the model exactly and share its real weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from netgraft import SurgeryError
from netgraft.cut import cut, cut_point


def _output_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["out"]


def _assert_exact_cut(model: nn.Module, at: str, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    model.eval()
    prefix, suffix = cut(model, at=at)
    with torch.no_grad():
        middle = prefix(x)
        assert torch.equal(suffix(middle), model(x))
    assert torch.equal(middle, _output_of(model, at, x))
    own = {id(p) for p in model.parameters()}
    halves = [*prefix.parameters(), *suffix.parameters()]
    assert halves and all(id(p) in own for p in halves)
    assert {id(p) for p in halves} == own  # nothing lost, nothing copied
    assert cut_point(prefix) == at
    return prefix, suffix


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.mark.parametrize("at", ["layer3", "layer4", "avgpool"])
def test_resnet18_cut_composes_to_the_model_exactly(resnet18, at):
    _assert_exact_cut(resnet18, at, torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_mobilenet_v2_cut_composes_to_the_model_exactly():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    x = torch.randn(2, 3, 64, 64)
    for at in ("features.12", "features"):
        _assert_exact_cut(model, at, x)


@pytest.mark.slow
def test_vit_b_16_cut_at_an_encoder_layer_composes_exactly():
    torch.manual_seed(0)
    vit = torchvision.models.vit_b_16(image_size=64)
    prefix, _ = _assert_exact_cut(vit, "encoder.layers.encoder_layer_5", torch.randn(2, 3, 64, 64))
    assert "encoder.layers.encoder_layer_6.mlp.0.weight" not in dict(prefix.named_parameters())


def test_prefix_holds_the_original_parameter_objects_so_updates_show_through(resnet18):
    prefix, _ = cut(resnet18, at="layer3")
    params = dict(prefix.named_parameters())
    assert params["layer3.0.conv1.weight"] is resnet18.layer3[0].conv1.weight
    assert "fc.weight" not in params
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = prefix(x).clone()
        resnet18.layer3[0].conv1.weight.mul_(2.0)
        after = prefix(x)
        resnet18.layer3[0].conv1.weight.div_(2.0)
    assert not torch.equal(before, after)


def test_nested_sequential_is_split_by_slicing_keeping_names():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.Sequential(nn.ReLU(), nn.Linear(8, 8), nn.Tanh()),
        nn.Linear(8, 2),
    )
    prefix, suffix = _assert_exact_cut(model, "1.1", torch.randn(5, 4))
    assert type(prefix) is nn.Sequential and type(suffix) is nn.Sequential
    assert set(dict(prefix.named_parameters())) == {"0.weight", "0.bias", "1.1.weight", "1.1.bias"}
    assert set(dict(suffix.named_parameters())) == {"2.weight", "2.bias"}


def test_subclassed_module_calling_layers_by_attribute_is_cut_with_fx():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 5)
            self.act = nn.ReLU()
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            return self.out(self.act(self.body(x)))

    torch.manual_seed(0)
    _assert_exact_cut(Net(), "act", torch.randn(4, 6))


def test_skip_connection_crossing_the_cut_is_refused_with_the_reason(resnet18):
    with pytest.raises(SurgeryError, match="only the output of 'layer1.0.conv1' may cross"):
        cut(resnet18, at="layer1.0.conv1")


def test_cutting_at_the_whole_model_is_refused(resnet18):
    with pytest.raises(SurgeryError, match="cannot cut at the model itself"):
        cut(resnet18, at=None)


def test_cut_keeps_the_modes_of_the_model(resnet18):
    resnet18.train()
    resnet18.layer1[0].bn1.eval()
    prefix, suffix = cut(resnet18, at="layer3")
    assert prefix.training and suffix.training and not resnet18.layer1[0].bn1.training
    resnet18.eval()


@pytest.mark.slow
def test_bert_encoder_layer_cut_gives_a_clear_error_or_an_exact_cut(minilm_dir):
    from netgraft.zoo import input_for, load_model

    bert = load_model(f"hf:{minilm_dir}").eval()
    x = input_for(bert, (8,), batch=2)
    try:
        prefix, suffix = cut(bert, at="encoder.layer.2")
    except SurgeryError as exc:
        assert "encoder.layer.2" in str(exc) and "torch.fx" in str(exc)
        return
    with torch.no_grad():  # pragma: no cover - only where transformers can be traced
        assert torch.equal(suffix(prefix(x["input_ids"]))[0], bert(**x)[0])
