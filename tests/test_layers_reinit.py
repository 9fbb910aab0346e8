"""The layer table, summary and re-initialisation on real architectures."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import netgraft


def test_layer_table_is_in_execution_order_with_output_shapes():
    model = torchvision.models.resnet18()
    table = netgraft.layers(model, torch.randn(2, 3, 64, 64))
    names = table.names
    assert names[:2] == ["conv1", "bn1"] and names[-1] == "fc"
    # the downsample branch runs after conv2/bn2 of the same block in torchvision's forward
    assert names.index("layer2.0.bn2") < names.index("layer2.0.downsample.0")
    conv1 = table[0]
    assert conv1.output_shape == (2, 64, 32, 32) and conv1.params == 64 * 3 * 7 * 7
    assert table[-1].output_shape == (2, 1000)
    assert table.total_params == sum(p.numel() for p in model.parameters())
    assert table.trainable_params == table.total_params and table.frozen_params == 0
    bn = next(r for r in table if r.name == "bn1")
    assert bn.norm_mode == "train" and bn.trainable is True


def test_layer_table_of_a_bert_holds_every_parameter(minilm_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_dir), local_files_only=True)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    table = netgraft.layers(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert table.total_params == sum(p.numel() for p in model.parameters())
    assert table.names[0].startswith("embeddings")
    row = next(r for r in table if r.name == "encoder.layer.0.attention.self.query")
    assert row.output_shape == (1, 4, 384)
    assert [b.name for b in netgraft.blocks(model)] == [
        "embeddings",
        *[f"encoder.layer.{i}" for i in range(6)],
        "pooler",
    ]


def test_summary_prints_and_reports_frozen_totals(capsys):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    netgraft.freeze(model, "0")
    table = netgraft.summary(model, torch.randn(1, 4))
    out = capsys.readouterr().out
    assert "1×8" in out and "Linear" in out
    assert table.frozen_params == 40 and table.trainable_params == 18
    assert table.to_dict()["layers"][0]["trainable"] is False


def test_reinit_changes_exactly_the_selected_layers(mobilenet_v2_weights):
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet_v2_weights, weights_only=True))
    before = copy.deepcopy(model.state_dict())
    chosen = netgraft.reinit(model, ["features.18", "classifier"], seed=0)
    assert chosen == ["features.18.0", "features.18.1", "classifier.1"]
    after = model.state_dict()
    for key in before:
        in_selection = key.startswith(("features.18.", "classifier."))
        same = torch.equal(before[key], after[key])
        if in_selection and "num_batches_tracked" not in key:
            assert not same, f"{key} was selected but did not change"
        elif not in_selection:
            assert same, f"{key} was not selected but changed"


def test_reinitialised_batchnorm_is_in_its_initial_state(mobilenet_v2_weights):
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet_v2_weights, weights_only=True))
    netgraft.reinit(model, "features.3.conv.1.1")
    bn = model.features[3].conv[1][1]
    fresh = nn.BatchNorm2d(bn.num_features)
    for key, value in fresh.state_dict().items():
        assert torch.equal(bn.state_dict()[key], value), key


def test_reinit_is_reproducible_with_a_seed_and_leaves_global_rng_alone():
    a = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Embedding(5, 8))
    b = copy.deepcopy(a)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    netgraft.reinit(a, None, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    netgraft.reinit(b, None, seed=7)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_reinit_refuses_a_layer_it_does_not_know():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.full((3,), 2.0))

        def forward(self, x):
            return x * self.gain

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    with pytest.raises(netgraft.NetgraftError, match="Scale"):
        netgraft.reinit(model, "1")
