"""Depth and width growth on every Llama-layout family transformers ships, built from their
configs at small sizes in float64: each is exact (logits, and greedy cached generation
giving the same tokens) or refused before anything changes."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

import netgraft
from netgraft.errors import NetgraftError, SurgeryError
from netgraft.recipe import replay

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# a sliding window shorter than prompt + generated tokens, so it matters per block
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "smollm2": lambda: transformers.LlamaConfig(
        **{**SMALL, "num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 48},
        tie_word_embeddings=True,
    ),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        **SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "gemma": lambda: transformers.GemmaConfig(**SMALL),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, sliding_window=4),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **SMALL, sliding_window=4, sliding_window_pattern=2
    ),
}


def build(family: str) -> torch.nn.Module:
    """A float64 causal LM of ``family`` with random weights, norm weights moved off their
    initial values so that every norm's scale matters."""
    config = FAMILIES[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


IDS = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def behaviour(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits on ``IDS`` and 8 greedy tokens generated with the key-value cache."""
    with torch.no_grad():
        logits = model(IDS).logits
    tokens = model.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=True)
    return logits, tokens


def rebuilt(model: torch.nn.Module) -> torch.nn.Module:
    """The model built anew from its (grown) config, with its weights."""
    fresh = transformers.AutoModelForCausalLM.from_config(model.config).to(torch.float64)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_expanded_family_keeps_logits_and_cached_generation(family):
    model = build(family)
    logits, tokens = behaviour(model)
    netgraft.expand_blocks(model, every=1)
    assert model.config.num_hidden_layers == 6
    layers = model.model.layers
    assert [b.self_attn.layer_idx for b in layers] == list(range(6))
    types = getattr(model.config, "layer_types", None)
    if types is not None:  # each copy attends as its original does
        assert types == [t for t in FAMILIES[family]().layer_types for _ in range(2)]
    grown_logits, grown_tokens = behaviour(model)
    assert (grown_logits - logits).abs().max().item() <= 1e-10
    assert torch.equal(grown_tokens, tokens)
    assert torch.equal(behaviour(rebuilt(model))[1], tokens)


def test_unknown_family_is_refused_before_anything_changes():
    config = transformers.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    model = transformers.GPTNeoXForCausalLM(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for grow in (
        lambda: netgraft.expand_blocks(model, every=1),
        lambda: netgraft.stack_blocks(model, 2),
    ):
        with pytest.raises(SurgeryError, match="'gpt_neox', whose layout"):
            grow()
    assert model.config.num_hidden_layers == 2
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert netgraft.get_recipe(model).operations == []


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_stacking_repeats_the_whole_stack_and_generates_with_its_cache(family, caplog):
    model = build(family)
    first = [b.mlp.down_proj.weight.clone() for b in model.model.layers]
    types = list(model.config.layer_types)
    with caplog.at_level(logging.INFO, logger="netgraft.grow"):
        netgraft.stack_blocks(model, 2)
    assert any("next-token loss" in r.getMessage() for r in caplog.records)
    layers = model.model.layers
    assert model.config.num_hidden_layers == len(layers) == 6
    assert model.config.layer_types == types * 2
    assert [b.self_attn.layer_idx for b in layers] == list(range(6))
    for j, block in enumerate(layers):
        assert torch.equal(block.mlp.down_proj.weight, first[j % 3])
    assert layers[3].mlp.down_proj.weight is not layers[0].mlp.down_proj.weight
    assert netgraft.grown_modules(model) == ["model.layers.3", "model.layers.4", "model.layers.5"]
    cached = model.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=True)
    plain = model.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_stacking_is_recorded_and_replays_on_a_fresh_model():
    model = build("llama")
    netgraft.stack_blocks(model, 3, example_input={"input_ids": IDS})
    operations = netgraft.get_recipe(model).operations
    assert operations == [{"op": "stack_blocks", "args": {"factor": 3}}]
    again = replay(build("llama"), operations)
    again.load_state_dict(model.state_dict())
    assert again.config.num_hidden_layers == 9
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_stacking_refuses_factors_and_modes_it_does_not_know():
    model = build("llama")
    for kwargs, match in (
        ({"factor": 1}, "at least 2"),
        ({"factor": 2.0}, "at least 2"),
        ({"how": "each"}, "how must be one of whole"),
    ):
        with pytest.raises(NetgraftError, match=match):
            netgraft.stack_blocks(model, **kwargs)
    assert model.config.num_hidden_layers == 3


# These families' RMSNorms normalise in float32 whatever the model's dtype, and the mean
# over [h, h] rounds differently from the mean over h: a widened model is exact up to float32
# rounding of its norms (a deepened one, whose norms see the same vectors, bit for bit).
WIDTH_ATOL = 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_widened_family_keeps_logits_and_cached_generation(family):
    model = build(family)
    old = model.config
    hidden, heads, kv = old.hidden_size, old.num_attention_heads, old.num_key_value_heads
    logits, tokens = behaviour(model)
    netgraft.widen_transformer(model, hidden_size=2 * hidden, intermediate_size=100)
    config = model.config
    assert (config.hidden_size, config.intermediate_size) == (2 * hidden, 100)
    # whole key-value groups copied with their query heads; head_dim kept
    assert (config.num_attention_heads, config.num_key_value_heads) == (2 * heads, 2 * kv)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * kv * 8, 2 * hidden)
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    grown_logits, grown_tokens = behaviour(model)
    assert (grown_logits - logits).abs().max().item() <= WIDTH_ATOL
    assert torch.equal(grown_tokens, tokens)
    with torch.no_grad():  # the config rebuilds the same model (embedding scale included)
        assert torch.equal(rebuilt(model)(IDS).logits, grown_logits)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3"])
def test_widening_heads_only_keeps_head_dim_and_logits(family):
    model = build(family)
    logits, _ = behaviour(model)
    netgraft.widen_transformer(model, num_heads=8)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (8, 4)
    assert model.config.head_dim == 8
    with torch.no_grad():
        delta = (model(IDS).logits - logits).abs().max().item()
    assert delta <= WIDTH_ATOL


@pytest.mark.parametrize("family", ["qwen3", "gemma", "gemma3"])
def test_width_it_cannot_keep_exact_is_refused_before_anything_changes(family):
    model = build(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match="multiple of 32"):
        netgraft.widen_transformer(model, hidden_size=48)
    with pytest.raises(SurgeryError, match="multiple of 4"):
        netgraft.widen_transformer(model, num_heads=6)
    assert model.config.hidden_size == 32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_grown_gemma3_saves_and_reloads_by_replaying_its_recipe(tmp_path):
    folder = tmp_path / "gemma3"
    FAMILIES["gemma3"]().save_pretrained(folder)
    model = netgraft.load_model(f"hf:{folder}", task="causal-lm").eval()
    netgraft.widen_transformer(model, hidden_size=64, example_input=IDS)
    netgraft.expand_blocks(model, after=[0, 2], example_input=IDS)
    netgraft.stack_blocks(model, 2, example_input=IDS)
    ops = [op["op"] for op in netgraft.get_recipe(model).operations]
    assert ops == ["widen_transformer", "expand_blocks", "stack_blocks"]
    netgraft.save(model, tmp_path / "saved")
    again = netgraft.load(tmp_path / "saved").eval()
    assert again.config.num_hidden_layers == 10
    assert again.config.layer_types == model.config.layer_types
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)
