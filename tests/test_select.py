"""The selector grammar picks what the layer table's order says, and teaches when it fails."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import netgraft


@pytest.fixture(scope="module")
def resnet():
    model = torchvision.models.resnet18()
    table = netgraft.layers(model, torch.randn(1, 3, 32, 32))
    return model, table.names


class OutOfOrder(nn.Module):
    """Registration order differs from execution order: only a trace can tell."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(4, 2)
        self.early = nn.Linear(3, 4)

    def forward(self, x):
        return self.late(torch.relu(self.early(x)))


def test_slice_by_name_stops_before_the_named_module(resnet):
    model, names = resnet
    chosen = netgraft.select(model, ":layer3")
    assert chosen == names[: names.index("layer3.0.conv1")]
    assert chosen[-1].startswith("layer2.")


def test_slice_from_name_starts_at_the_named_module(resnet):
    model, names = resnet
    assert netgraft.select(model, "layer3:") == names[names.index("layer3.0.conv1") :]


def test_slices_by_index_negative_index_and_percent(resnet):
    model, names = resnet
    assert netgraft.select(model, "2:5") == names[2:5]
    assert netgraft.select(model, ":-1") == names[:-1]
    assert netgraft.select(model, "-3:") == names[-3:]
    assert netgraft.select(model, ":70%") == names[: round(0.7 * len(names))]


def test_slices_follow_traced_execution_order_not_registration():
    model = OutOfOrder()
    assert netgraft.select(model, ":1") == ["late"]  # registration order before a trace
    netgraft.layers(model, torch.randn(1, 3))
    assert netgraft.select(model, ":1") == ["early"]  # remembered execution order
    assert netgraft.layers(model).names == ["early", "late"]


def test_block_slices_pick_whole_blocks(resnet):
    model, names = resnet
    assert [b.name for b in netgraft.blocks(model)] == [
        "stem",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "fc",
    ]
    chosen = netgraft.select(model, "block:1:3")
    assert chosen == [n for n in names if n.startswith(("layer1.", "layer2."))]
    assert netgraft.select(model, "block:-1") == ["fc"]
    assert netgraft.select(model, "block:layer4:") == [
        n for n in names if n.startswith("layer4.") or n == "fc"
    ]
    assert netgraft.select(model, "block:0") == ["conv1", "bn1"]


def test_block_slice_over_mobilenet_features():
    model = torchvision.models.mobilenet_v2()
    blocks = netgraft.blocks(model)
    assert [b.name for b in blocks][:2] == ["features.0", "features.1"]
    assert blocks[-1].name == "classifier" and len(blocks) == 20
    chosen = netgraft.select(model, "block::3")
    assert chosen and all(
        n.startswith(("features.0.", "features.1.", "features.2.")) for n in chosen
    )


def test_names_globs_regex_types_and_classes(resnet):
    model, names = resnet
    assert netgraft.select(model, "layer1.0.conv1") == ["layer1.0.conv1"]
    assert netgraft.select(model, "layer1") == [n for n in names if n.startswith("layer1.")]
    assert netgraft.select(model, "*.bn2") == [n for n in names if n.endswith(".bn2")]
    assert netgraft.select(model, r"re:layer[12]\.0\.conv1") == ["layer1.0.conv1", "layer2.0.conv1"]
    bns = [n for n in names if "bn" in n or "downsample.1" in n]
    assert netgraft.select(model, "type:BatchNorm2d") == bns
    assert netgraft.select(model, nn.BatchNorm2d) == bns
    assert netgraft.select(model, "type:_BatchNorm") == bns  # a base class name also matches


def test_lists_are_unions_with_exclusions(resnet):
    model, names = resnet
    chosen = netgraft.select(model, ["layer4", "fc", "~type:BatchNorm2d"])
    assert "fc" in chosen and "layer4.0.conv1" in chosen
    assert not any("bn" in n for n in chosen)
    everything_but_fc = netgraft.select(model, ["~fc"])
    assert everything_but_fc == names[:-1]


def test_unknown_name_raises_with_close_suggestion(resnet):
    model, _ = resnet
    with pytest.raises(netgraft.SelectionError) as info:
        netgraft.select(model, "layer3.0.conv3")
    message = str(info.value)
    assert "layer3.0.conv1" in message or "layer3.0.conv2" in message
    assert "netgraft.layers" in message


def test_any_list_item_matching_nothing_raises(resnet):
    model, _ = resnet
    with pytest.raises(netgraft.SelectionError, match="layr4"):
        netgraft.select(model, ["fc", "layr4"])
    with pytest.raises(netgraft.SelectionError, match="types present"):
        netgraft.select(model, "type:LayerNorm")
    with pytest.raises(netgraft.SelectionError, match="regex"):
        netgraft.select(model, "re:nothing.*here")
    with pytest.raises(netgraft.SelectionError, match="empty"):
        netgraft.select(model, "5:5")
    with pytest.raises(netgraft.SelectionError, match="no block"):
        netgraft.select(model, "block:layer9:")


def test_select_does_not_change_the_model(resnet):
    model, _ = resnet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    netgraft.select(model, ":50%", example_input=torch.randn(1, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert modes == [m.training for m in model.modules()]
