"""Greedy layer-wise pretraining on the real scikit-learn digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netgraft
from netgraft import NetgraftError, pretrain_layerwise

pytestmark = pytest.mark.usefixtures("one_thread")


def _sigmoid_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.Sigmoid(),
        nn.Linear(128, 64),
        nn.Sigmoid(),
        nn.Linear(64, 10),
    )


def _split(digits):
    x, y = digits
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1200], perm[1200:]


def _labelled(y, pool, per_class, seed):
    g = torch.Generator().manual_seed(100 + seed)
    picks = []
    for c in range(10):
        own = pool[y[pool] == c]
        picks.append(own[torch.randperm(len(own), generator=g)[:per_class]])
    return torch.cat(picks)


@pytest.mark.slow
def test_pretraining_then_fine_tuning_beats_random_init_on_three_labelled_digits_per_class(digits):
    x, y, pool, test = _split(digits)
    random_acc, pretrained_acc = [], []
    for seed in range(3):
        few = _labelled(y, pool, 3, seed)
        for pretrain, accs in ((False, random_acc), (True, pretrained_acc)):
            torch.manual_seed(seed)
            model = _sigmoid_mlp()
            if pretrain:  # the 1,200 pool images, labels unused
                pretrain_layerwise(model, x[pool], epochs_per_layer=10, seed=seed)
            netgraft.fit(model, (x[few], y[few]), epochs=30, lr=1e-3, batch_size=16, seed=seed,
                         quiet=True)  # fmt: skip
            accs.append(netgraft.evaluate(model, (x[test], y[test]))["acc"])
    mean_random = sum(random_acc) / 3
    mean_pretrained = sum(pretrained_acc) / 3
    assert mean_pretrained > mean_random + 0.03, (pretrained_acc, random_acc)


def test_each_layer_learns_to_reconstruct_its_input_and_the_head_is_left_alone(digits):
    x, _ = digits
    torch.manual_seed(0)
    model = _sigmoid_mlp()
    head_before = model[5].weight.detach().clone()
    records = pretrain_layerwise(model, x[:400], epochs_per_layer=3)
    assert [r["layer"] for r in records] == ["1", "3"]
    for r in records:
        assert r["last_loss"] < r["first_loss"]
    assert torch.equal(model[5].weight, head_before)


def test_a_chosen_layer_trains_alone_and_flags_modes_and_norm_statistics_are_restored(digits):
    x, _ = digits
    x = x[:256]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    netgraft.freeze(model, "0")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    records = pretrain_layerwise(model, (x, None), epochs_per_layer=2, layers="3")
    assert [r["layer"] for r in records] == ["3"]
    assert records[0]["last_loss"] < records[0]["first_loss"]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"3.weight", "3.bias"}  # BatchNorm statistics included: nothing else moved
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and model[3].training


def test_a_conv_net_is_pretrained_bottom_up_through_transposed_decoders(digits):
    x, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    records = pretrain_layerwise(model, x[:256], epochs_per_layer=2)
    assert [r["layer"] for r in records] == ["0", "2"]
    assert all(r["last_loss"] < r["first_loss"] for r in records)


def test_bad_arguments_are_one_clear_error(digits):
    x, _ = digits
    with pytest.raises(NetgraftError, match="epochs_per_layer"):
        pretrain_layerwise(_sigmoid_mlp(), x[:8], epochs_per_layer=0)
    with pytest.raises(NetgraftError, match="activation"):
        pretrain_layerwise(_sigmoid_mlp(), x[:8], epochs_per_layer=1, activation="swish")
    with pytest.raises(NetgraftError, match="no Linear or Conv2d"):
        pretrain_layerwise(nn.Sequential(nn.Flatten(), nn.LayerNorm(64)), x[:8], epochs_per_layer=1)
