"""Cuts by substitution: real models whose forward torch.fx cannot trace, split at a module."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import netgraft
from netgraft.errors import SurgeryError
from netgraft.substitute import cut_by_substitution, max_difference


@pytest.fixture(scope="module")
def minilm_classifier(minilm_dir):
    torch.manual_seed(0)
    return netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification").eval()


@pytest.fixture(scope="module")
def sentences(minilm_dir):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    texts = [
        "Four more years of building an economy from the middle class out.",
        "We built it, and small businesses are the backbone of this country.",
        "Health care is a right, not a privilege.",
    ]
    batch = tokenizer(texts, padding="max_length", max_length=24, truncation=True)
    return {k: torch.tensor(v) for k, v in batch.items()}


@pytest.mark.parametrize("at", ["bert", "bert.pooler", "bert.encoder.layer.4"])
def test_bert_classifier_cut_by_substitution_reproduces_the_logits(
    minilm_classifier, sentences, at
):
    prefix, suffix = cut_by_substitution(minilm_classifier, at, sentences)
    with torch.no_grad():
        expected = minilm_classifier(**sentences).logits
        got = suffix(prefix(sentences)).logits
    assert torch.equal(got, expected)


def test_modules_before_the_boundary_are_skipped_and_forwards_restored(
    minilm_classifier, sentences
):
    prefix, suffix = cut_by_substitution(minilm_classifier, "bert.encoder.layer.4", sentences)
    crossing = prefix(sentences)
    watched = (
        "bert.embeddings.word_embeddings",
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.5.attention.self.query",
        "classifier",
    )
    ran: list[str] = []
    handles = [
        m.register_forward_hook(lambda *_a, n=n: ran.append(n))
        for n, m in minilm_classifier.named_modules()
        if n in watched
    ]
    try:
        suffix(crossing)
    finally:
        for h in handles:
            h.remove()
    # a skipped module returns its placeholder without calling anything inside it
    assert ran == ["bert.encoder.layer.5.attention.self.query", "classifier"]
    assert not any("forward" in m.__dict__ for m in minilm_classifier.modules())


def test_suffix_trains_the_real_parameters_after_the_boundary(minilm_classifier, sentences):
    prefix, suffix = cut_by_substitution(minilm_classifier, "bert.encoder.layer.4", sentences)
    with torch.no_grad():
        crossing = prefix(sentences)
    minilm_classifier.zero_grad(set_to_none=True)
    suffix(crossing).logits.sum().backward()
    layer5 = minilm_classifier.bert.encoder.layer[5].output.dense.weight
    layer0 = minilm_classifier.bert.encoder.layer[0].output.dense.weight
    assert layer5.grad is not None and layer5.grad.abs().sum() > 0
    assert layer0.grad is None
    minilm_classifier.zero_grad(set_to_none=True)


def test_the_suffix_takes_the_crossing_flattened_as_a_cache_stores_it(minilm_classifier, sentences):
    prefix, suffix = cut_by_substitution(minilm_classifier, "bert", sentences)
    crossing = prefix(sentences)
    flat = tuple(torch.utils._pytree.tree_leaves(crossing))
    with torch.no_grad():
        assert torch.equal(suffix(flat).logits, suffix(crossing).logits)
    with pytest.raises(SurgeryError, match="flattened tensors"):
        suffix(flat[:1])


def test_untraceable_timm_model_is_cut_at_its_head_by_substitution():
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_b0", num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)
    prefix, suffix = cut_by_substitution(model, "global_pool", x)
    with torch.no_grad():
        assert max_difference(suffix(prefix(x)), model(x)) == 0.0


def test_a_skip_connection_around_the_cut_is_refused_naming_the_module():
    model = torchvision.models.resnet18().eval()
    with pytest.raises(SurgeryError, match=r"maxpool.*also used after it"):
        cut_by_substitution(model, "layer1.0.conv1", torch.randn(2, 3, 64, 64))


def test_a_module_called_twice_is_no_cut_point():
    shared = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.shared(self.shared(x)))

    with pytest.raises(SurgeryError, match="calls it 2 times"):
        cut_by_substitution(Twice(), "shared", torch.randn(3, 4))


def test_cut_falls_back_to_substitution_when_fx_cannot_trace(minilm_classifier, sentences):
    with pytest.raises(SurgeryError, match="example_input"):
        netgraft.cut(minilm_classifier, at="bert")
    prefix, suffix = netgraft.cut(minilm_classifier, at="bert", example_input=sentences)
    with torch.no_grad():
        assert torch.equal(suffix(prefix(sentences)).logits, minilm_classifier(**sentences).logits)
