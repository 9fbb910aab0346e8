"""The feature cache: same training with and without it, never a stale or corrupt cache read,
random pipelines refused, concurrent builders safe; on real digits and real architectures."""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import transforms as T

import netgraft
from netgraft.cache import FeatureCache, cache_key, random_transforms
from netgraft.cut import cut
from netgraft.train.cached import plan


def digits_cnn() -> nn.Sequential:
    """A small CNN for the 8×8 digits: two conv/BN blocks (the frozen part) and a dropout
    head (the trainable part, so the random stream must line up with and without cache)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def digits_set(digits) -> TensorDataset:
    x, y = digits
    return TensorDataset(x[:600], y[:600])


def _pretrained_frozen_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = digits_cnn()
    with torch.no_grad():  # non-trivial running statistics, as after pretraining
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    netgraft.train_only(model, "9")
    return model


def _fit(model: nn.Module, data: Dataset, cache, **kw):
    from netgraft import fit

    return fit(model, data, epochs=2, lr=1e-2, seed=7, batch_size=64, cache=cache, quiet=True, **kw)


def test_cached_and_uncached_training_give_the_same_losses(digits, digits_set, caplog):
    val = TensorDataset(digits[0][600:800], digits[1][600:800])
    uncached_model = _pretrained_frozen_cnn()
    cached_model = _pretrained_frozen_cnn()
    uncached = _fit(uncached_model, digits_set, cache=False, val=val)
    with caplog.at_level(logging.INFO):
        cached = _fit(cached_model, digits_set, cache=True, val=val)
    assert "validation: 200 examples cached" in caplog.text
    for key in ("loss", "acc", "val_loss", "val_acc"):
        assert [row[key] for row in cached] == pytest.approx(
            [row[key] for row in uncached], rel=1e-5
        ), key
    assert torch.allclose(cached_model[9].weight, uncached_model[9].weight, atol=1e-5)
    # the frozen part was never touched by either run
    assert torch.equal(cached_model[0].weight, _pretrained_frozen_cnn()[0].weight)


@pytest.mark.slow
def test_resnet18_cached_last_block_training_matches_uncached(digits, caplog):
    x, y = digits
    images = nn.functional.interpolate(x[:48].repeat(1, 3, 1, 1), size=32, mode="bilinear")
    data = TensorDataset(images, y[:48])

    def model():
        torch.manual_seed(0)
        m = torchvision.models.resnet18(num_classes=10)
        netgraft.train_only(m, ["layer4", "fc"])
        return m

    from netgraft import fit

    kw = dict(epochs=2, lr=1e-3, seed=3, batch_size=16, quiet=True)
    uncached = fit(model(), data, cache=False, **kw)
    with caplog.at_level(logging.INFO):
        cached = fit(model(), data, cache=True, **kw)
    assert "frozen prefix up to 'layer3'" in caplog.text
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in uncached], rel=1e-4)


def test_features_are_the_prefix_outputs_in_eval_mode_and_modes_are_restored(digits_set):
    model = _pretrained_frozen_cnn()
    prefix, _ = cut(model, at="7")
    prefix.train()
    cache = FeatureCache(prefix, digits_set)
    assert prefix.training and model[1].training is False  # frozen BN stays held in eval
    assert model[2].training  # modes restored after building
    x, y = digits_set.tensors
    with torch.no_grad():
        expected = model.eval()[:8](x)
    feats, labels = cache.tensors()
    assert torch.allclose(feats, expected, atol=1e-6)
    assert torch.equal(labels, y)
    assert len(cache) == len(digits_set) and cache[5][1] == y[5]


def test_disk_cache_is_reused_and_equals_memory_cache(digits_set, tmp_path):
    prefix, _ = cut(_pretrained_frozen_cnn(), at="7")
    memory = FeatureCache(prefix, digits_set)
    first = FeatureCache(prefix, digits_set, dir=tmp_path, shard_bytes=200_000)
    again = FeatureCache(prefix, digits_set, dir=tmp_path, shard_bytes=200_000)
    assert (memory.status, first.status, again.status) == ("memory", "built", "reused")
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1
    assert torch.equal(again.tensors()[0], memory.tensors()[0])
    assert all(torch.equal(again[i][0], memory[i][0]) for i in (0, 299, 599))


def test_fit_keeps_the_cache_on_disk_with_cache_options_and_reuses_it(digits_set, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="netgraft.train"):
        first = _fit(
            _pretrained_frozen_cnn(), digits_set, cache=True, cache_options={"dir": tmp_path}
        )
        again = _fit(
            _pretrained_frozen_cnn(), digits_set, cache=True, cache_options={"dir": tmp_path}
        )
    lines = [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]
    assert len(lines) == 2 and "[built" in lines[0] and "[reused" in lines[1]
    assert [row["loss"] for row in again] == [row["loss"] for row in first]


def test_cache_takes_inputs_and_targets_tensors_like_fit(digits, digits_set, tmp_path):
    x, y = digits
    prefix, _ = cut(_pretrained_frozen_cnn(), at="7")
    from_tensors = FeatureCache(prefix, (x[:600], y[:600]), dir=tmp_path)
    from_dataset = FeatureCache(prefix, digits_set)
    assert from_tensors.status == "built" and len(from_tensors) == 600
    assert torch.equal(from_tensors.tensors()[0], from_dataset.tensors()[0])
    assert torch.equal(from_tensors[5][1], y[5])


def test_fp16_cache_halves_the_storage_and_stays_close(digits_set, tmp_path):
    prefix, _ = cut(_pretrained_frozen_cnn(), at="7")
    full = FeatureCache(prefix, digits_set, dir=tmp_path / "a")
    half = FeatureCache(prefix, digits_set, dir=tmp_path / "b", dtype=torch.float16)
    size = lambda c: sum(f.stat().st_size for f in c.path.glob("shard-*.npy"))  # noqa: E731
    assert size(half) < 0.55 * size(full)
    assert half[0][0].dtype == torch.float32
    assert torch.allclose(half.tensors()[0], full.tensors()[0], rtol=2e-3, atol=2e-3)


def test_corrupted_shard_is_detected_and_rebuilt(digits_set, tmp_path, caplog):
    prefix, _ = cut(_pretrained_frozen_cnn(), at="7")
    good = FeatureCache(prefix, digits_set, dir=tmp_path, shard_bytes=200_000)
    expected = good.tensors()[0].clone()
    shard = good.path / "shard-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte in the data, header intact
    shard.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        rebuilt = FeatureCache(prefix, digits_set, dir=tmp_path, shard_bytes=200_000)
    assert rebuilt.status == "rebuilt"
    assert any("fails its checksum" in r.getMessage() for r in caplog.records)
    assert torch.equal(rebuilt.tensors()[0], expected)
    (rebuilt.path / "shard-00000.npy").write_bytes(b"truncated")
    assert FeatureCache(prefix, digits_set, dir=tmp_path, shard_bytes=200_000).status == "rebuilt"


def test_cache_built_for_other_weights_is_not_reused(digits_set, tmp_path):
    model = _pretrained_frozen_cnn()
    prefix, _ = cut(model, at="7")
    old = FeatureCache(prefix, digits_set, dir=tmp_path)
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] += 1e-3
    new = FeatureCache(prefix, digits_set, dir=tmp_path)
    assert new.status == "built" and new.key != old.key
    with torch.no_grad():
        expected = model.eval()[:8](digits_set.tensors[0])
    assert torch.allclose(new.tensors()[0], expected, atol=1e-6)
    assert not torch.allclose(new.tensors()[0], old.tensors()[0])
    with torch.no_grad():  # a buffer (BN statistics) is part of the key too
        model[4].running_mean[0] += 1e-3
    assert FeatureCache(prefix, digits_set, dir=tmp_path).status == "built"


def test_key_changes_with_data_cut_point_and_transforms(digits_set):
    prefix, _ = cut(_pretrained_frozen_cnn(), at="7")
    base = cache_key(prefix, digits_set)
    assert cache_key(prefix, digits_set) == base
    assert cache_key(prefix, Subset(digits_set, range(300))) != base
    assert cache_key(prefix, digits_set, cut_point="7") != base
    assert cache_key(prefix, digits_set, dtype=torch.float16) != base
    x, y = digits_set.tensors
    assert cache_key(prefix, TensorDataset(x.flip(-1), y)) != base
    a = _ImageList(x[:20], y[:20], T.Normalize([0.5], [0.5]))
    b = _ImageList(x[:20], y[:20], T.Normalize([0.5], [0.25]))
    assert cache_key(prefix, a) != cache_key(prefix, b)


class _ImageList(Dataset):
    """A map-style dataset applying a torchvision transform, like an image folder does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=None):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        img = self.x[i]
        return (self.transform(img) if self.transform else img), self.y[i]


def test_random_transforms_are_refused_unless_augment_copies(digits_set):
    x, y = digits_set.tensors
    prefix, _ = cut(_pretrained_frozen_cnn(), at="7")
    augmented = _ImageList(
        x[:40], y[:40], T.Compose([T.RandomHorizontalFlip(), T.RandomResizedCrop(8)])
    )
    assert random_transforms(augmented) == ["RandomHorizontalFlip", "RandomResizedCrop"]
    with pytest.raises(netgraft.CacheError, match="RandomHorizontalFlip.*augment_copies"):
        FeatureCache(prefix, augmented)
    copies = FeatureCache(prefix, augmented, augment_copies=2)
    first = copies.tensors()[0]
    copies.set_epoch(1)
    second = copies.tensors()[0]
    copies.set_epoch(2)
    assert not torch.allclose(first, second)
    assert torch.equal(copies.tensors()[0], first)
    assert torch.equal(copies.tensors()[1], y[:40])


def test_unnamed_random_pipeline_is_refused(digits_set):
    x, y = digits_set.tensors
    prefix, _ = cut(_pretrained_frozen_cnn(), at="7")
    noisy = _ImageList(x[:40], y[:40], lambda img: img + 0.1 * torch.randn_like(img))
    with pytest.raises(netgraft.CacheError, match="random"):
        FeatureCache(prefix, noisy)


def test_plan_refuses_random_data_under_true_and_skips_it_under_auto(digits_set):
    x, y = digits_set.tensors
    augmented = _ImageList(x[:40], y[:40], T.RandomHorizontalFlip())
    model = _pretrained_frozen_cnn()
    assert plan(model, augmented, cache="auto") is None
    with pytest.raises(netgraft.CacheError, match="augment_copies"):
        plan(model, augmented, cache=True)
    assert plan(model, augmented, cache=True, augment_copies=2).train.copies == 2


def test_plan_cuts_before_first_trainable_layer_and_says_so(digits_set):
    model = _pretrained_frozen_cnn()
    p = plan(model, digits_set)
    assert p is not None and p.cut_point == "7"  # the dropout stays with the trainable head
    assert {n for n, _ in p.model.named_parameters()} == {"9.weight", "9.bias"}
    assert p.model.get_parameter("9.weight") is model[9].weight
    assert "'7'" in p.describe() and "600 examples" in p.describe()
    assert plan(model, digits_set, cache=False) is None


def test_plan_keeps_dropout_out_of_the_frozen_prefix(digits_set):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64 * 64, 10)
    )
    netgraft.train_only(model, "3")
    p = plan(model, digits_set, cache=True)
    assert p.cut_point == "0" and isinstance(p.model[0], nn.Dropout)


def test_plan_explains_why_it_does_not_apply(digits_set, caplog):
    model = _pretrained_frozen_cnn()
    netgraft.unfreeze(model)
    assert plan(model, digits_set) is None
    with pytest.raises(netgraft.CacheError, match="no frozen layer runs before it"):
        plan(model, digits_set, cache=True)
    netgraft.freeze(model, bn="frozen")  # batch statistics in training: not deterministic
    netgraft.unfreeze(model, "9")
    with caplog.at_level(logging.INFO, logger="netgraft.cache"):
        assert plan(model, digits_set) is None
    assert "not deterministic in training: 1 (BatchNorm2d" in caplog.text
    # asked for explicitly, it caches what comes before the first batch-dependent layer
    assert plan(model, digits_set, cache=True).cut_point == "0"


@pytest.mark.slow
def test_concurrent_builders_end_with_one_valid_cache(digits_set, tmp_path):
    prefix, _ = cut(_pretrained_frozen_cnn(), at="7")
    kwargs = dict(dir=str(tmp_path), shard_bytes=100_000, batch_size=16)
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=FeatureCache, args=(prefix, digits_set), kwargs=kwargs) for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    folders = [p for p in Path(tmp_path).iterdir() if p.is_dir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")
    reused = FeatureCache(prefix, digits_set, **kwargs)
    assert reused.status == "reused" and reused.path == folders[0]
    with torch.no_grad():
        expected = prefix.eval()(digits_set.tensors[0])
    assert np.allclose(reused.tensors()[0].numpy(), expected.numpy(), atol=1e-6)
