"""The feature cache never changes what training computes: functional dropout and random
operations, before or after the cut, on small models and on the two timm models whose
``forward_head`` applies ``F.dropout`` (issue 26); real digits and real ImageNet images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import netgraft
from netgraft.cut import cut
from netgraft.train.cached import plan


class HeadDropout(nn.Module):
    """A frozen conv body, then ``F.dropout`` as a function, then a trainable head: the
    dropout must stay with the head (the timm ``forward_head`` pattern)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(64 * 2 * 2, 10)

    def forward(self, x):
        return self.head(F.dropout(self.body(x), p=self.p, training=self.training))


class NoisyStem(nn.Module):
    """Randomness inside the frozen part: dropout between two frozen convs (``noise`` adds
    ``torch.randn_like`` to the input instead, so no cut can leave it out of the prefix)."""

    def __init__(self, noise: bool = False):
        super().__init__()
        self.noise = noise
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        if self.noise:
            x = x + 0.1 * torch.randn_like(x)
        h = F.dropout(self.stem(x), p=0.3, training=self.training)
        return self.head(self.body(h))


@pytest.fixture(scope="module")
def digits_set(digits) -> TensorDataset:
    x, y = digits
    return TensorDataset(x[:256], y[:256])


def _losses(model_fn, data, cache, train="head", batch_size=32):
    torch.manual_seed(0)
    model = model_fn()
    netgraft.train_only(model, train)
    history = netgraft.fit(
        model,
        data,
        epochs=2,
        lr=1e-2,
        seed=5,
        batch_size=batch_size,
        cache=cache,
        val=data,
        quiet=True,
    )
    return [(row["loss"], row["val_loss"]) for row in history.rows]


def _assert_same(a, b, rel=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=rel), (a, b)


def test_traced_halves_follow_the_mode_they_run_in_not_the_mode_at_the_cut(digits_set):
    model = HeadDropout().eval()  # fx would bake training=False into the suffix
    prefix, suffix = cut(model, at="body")
    x = digits_set.tensors[0][:8]
    suffix.train()
    model.train()
    torch.manual_seed(1)
    want = model(x)
    torch.manual_seed(1)
    got = suffix(prefix(x))
    assert torch.equal(got, want)
    suffix.eval()
    model.eval()
    assert not torch.equal(suffix(prefix(x)), got)  # no dropout in evaluation
    assert torch.equal(suffix(prefix(x)), model(x))


def test_functional_dropout_before_the_head_trains_the_same_with_the_cache(digits_set):
    torch.manual_seed(0)
    model = HeadDropout()
    netgraft.train_only(model, "head")
    p = plan(model, digits_set, cache="auto")
    assert p is not None and p.cut_point == "body"
    assert "training = self.training" in p.model.code
    _assert_same(_losses(HeadDropout, digits_set, "auto"), _losses(HeadDropout, digits_set, False))


def test_functional_dropout_in_the_frozen_part_moves_the_cut_before_it(digits_set):
    torch.manual_seed(0)
    model = NoisyStem()
    netgraft.train_only(model, "head")
    p = plan(model, digits_set, cache=True)
    assert p.cut_point == "stem"  # before the dropout, not at 'body' after it
    _assert_same(_losses(NoisyStem, digits_set, True), _losses(NoisyStem, digits_set, False))
    _assert_same(_losses(NoisyStem, digits_set, "auto"), _losses(NoisyStem, digits_set, False))


def test_random_input_noise_is_refused_naming_the_operation(digits_set):
    torch.manual_seed(0)
    model = NoisyStem(noise=True)
    netgraft.train_only(model, "head")
    with pytest.raises(netgraft.CacheError, match="randn_like"):
        plan(model, digits_set, cache=True)
    assert plan(model, digits_set, cache="auto") is None
    noisy = lambda: NoisyStem(noise=True)  # noqa: E731
    _assert_same(_losses(noisy, digits_set, "auto"), _losses(noisy, digits_set, False))


class Untraceable(nn.Module):
    """Value-dependent control flow (fx cannot trace it: cut by substitution) and dropout
    in the frozen part only in training, as a function."""

    def __init__(self, random_body: bool):
        super().__init__()
        self.random_body = random_body
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        if x.sum() > -1e9:  # a branch on a value: torch.fx cannot trace it
            x = x * 1.0
        if self.random_body and self.training:
            x = F.dropout(x, p=0.3)
        h = self.body(x)
        return self.head(F.dropout(h, p=0.5, training=self.training))


def test_substitution_cut_keeps_the_suffix_dropout_and_refuses_a_random_prefix(digits_set):
    torch.manual_seed(0)
    model = Untraceable(random_body=False)
    netgraft.train_only(model, "head")
    p = plan(model, digits_set, cache=True)
    assert p.cut_point == "body" and type(p.model).__name__ == "Substituted"
    clean = lambda: Untraceable(random_body=False)  # noqa: E731
    _assert_same(_losses(clean, digits_set, True), _losses(clean, digits_set, False))
    model = Untraceable(random_body=True)
    netgraft.train_only(model, "head")
    with pytest.raises(netgraft.CacheError, match="random in training"):
        plan(model, digits_set, cache=True)


@pytest.mark.parametrize("arch", ["legacy_seresnet50", "repghostnet_080"])
def test_timm_heads_with_functional_dropout_train_the_same_with_the_cache(
    arch, imagenet_batch, one_thread
):
    timm = pytest.importorskip("timm")
    x, y = imagenet_batch
    data = TensorDataset(F.interpolate(x[:8], size=64, mode="bilinear"), y[:8] % 5)

    def build():
        model = timm.create_model(arch, pretrained=False)
        assert model.drop_rate == pytest.approx(0.2)  # F.dropout in forward_head
        netgraft.replace_head(model, 5)
        return model

    heads = [name for name, _ in netgraft.find_heads(build())]
    torch.manual_seed(0)
    model = build()
    netgraft.train_only(model, heads)
    p = plan(model, data, cache="auto")
    assert p is not None and p.cut_point in ("global_pool", "flatten")
    kw = {"train": heads, "batch_size": 4}
    cached = _losses(build, data, "auto", **kw)
    _assert_same(cached, _losses(build, data, False, **kw))
