"""The feature cache on a real Hugging Face encoder: the pretrained MiniLM as a sequence
classifier on real political-speech passages, cut by substitution where torch.fx cannot
trace it, cached with its structured crossing (token ids, mask, hidden states)."""

from __future__ import annotations

import logging

import pytest
import torch

import netgraft
from netgraft.cache import FeatureCache
from netgraft.data import TokenizedTexts, load_political_passages
from netgraft.train.cached import plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def passages(minilm_dir):
    import transformers

    p = load_political_passages()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    pick = torch.randperm(len(p.texts), generator=torch.Generator().manual_seed(0))[:48]
    return TokenizedTexts([p.texts[i] for i in pick], p.labels[pick], tokenizer, max_length=32)


def _classifier(minilm_dir, trainable):
    torch.manual_seed(0)
    model = netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification", num_labels=2)
    return netgraft.train_only(model, trainable)


@pytest.mark.parametrize(
    ("trainable", "cut_at"),
    [("classifier", "bert"), (["bert.encoder.layer.5", "classifier"], "bert.encoder.layer.4")],
)
def test_cached_and_uncached_training_match_on_minilm(
    minilm_dir, passages, caplog, trainable, cut_at
):
    losses = {}
    for cache in (False, True):
        model = _classifier(minilm_dir, trainable)
        with caplog.at_level(logging.INFO, logger="netgraft"):
            caplog.clear()
            history = netgraft.fit(
                model, passages, epochs=2, lr=1e-3, batch_size=16, seed=0, cache=cache, quiet=True
            )
        losses[cache] = [row["loss"] for row in history.rows]
        used = [
            r.getMessage()
            for r in caplog.records
            if "feature cache: frozen prefix" in r.getMessage()
        ]
        assert bool(used) == cache
        if cache:
            assert f"up to {cut_at!r}" in used[0]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][1] < losses[True][0]


def test_structured_features_are_stored_on_disk_with_their_dtypes(minilm_dir, passages, tmp_path):
    model = _classifier(minilm_dir, "classifier")
    cached = plan(model, passages, cache=True, dir=tmp_path, dtype=torch.float16)
    assert cached is not None and cached.cut_point == "bert"
    fields, label = cached.train[3]
    assert [f.dtype for f in fields[:3]] == [torch.int64] * 3  # ids, mask, token types: exact
    assert fields[3].shape == (32, 384) and fields[3].dtype == torch.float32  # returned as computed
    again = FeatureCache(
        cached.prefix, passages, dir=tmp_path, dtype=torch.float16, cut_point="bert"
    )
    assert again.status == "reused"
    with torch.no_grad():
        expected = model(**{k: v[3:4] for k, v in passages.columns.items()}).logits
        got = cached.model([f.unsqueeze(0) for f in fields]).logits
    assert torch.allclose(got, expected, atol=1e-2)  # float16 hidden states
    assert int(label) == int(passages.labels[3])
    shards = sorted(p.name for p in again.path.glob("shard-*.npy"))
    assert shards[:2] == ["shard-00000-1.npy", "shard-00000-2.npy"]
