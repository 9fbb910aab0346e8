"""widen_transformer: hidden size, heads and MLP width of real transformer architectures grown
by copying units, outputs unchanged (float64 1e-10, float32 1e-5)."""

from __future__ import annotations

import pytest
import torch
import transformers

import netgraft
from netgraft.errors import NetgraftError, SurgeryError
from netgraft.grow.transformer_width import widen_transformer

IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
SENTENCES = [
    "A trained network can grow without forgetting.",
    "The cat sat on the mat.",
    "Transfer learning reuses what a model already knows.",
]


def _gpt2(cls=transformers.GPT2LMHeadModel, dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        **overrides,
    )
    return cls(config).to(dtype).eval()


def _llama(config_cls=transformers.LlamaConfig, tie=False, **overrides):
    torch.manual_seed(0)
    config = config_cls(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=128,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie,
        **overrides,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    # random norm weights, so a wrongly copied norm cannot pass unnoticed
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _generate(model, ids=IDS):
    return model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def test_widening_gpt2_hidden_and_heads_keeps_logits_and_cached_generation():
    model = _gpt2()
    expected, tokens = _logits(model), _generate(model)
    widen_transformer(model, hidden_size=64, num_heads=8)
    assert (model.config.n_embd, model.config.n_head, model.config.n_inner) == (64, 8, 128)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    attn = model.transformer.h[0].attn
    assert (attn.embed_dim, attn.num_heads, attn.head_dim, attn.split_size) == (64, 8, 8, 64)
    assert (_logits(model) - expected).abs().max().item() <= 1e-10
    assert torch.equal(_generate(model), tokens)


def test_widened_gpt2_base_model_outputs_its_hidden_vector_twice():
    model = _gpt2(transformers.GPT2Model)
    with torch.no_grad():
        expected = model(IDS).last_hidden_state
    widen_transformer(model, hidden_size=96)
    with torch.no_grad():
        hidden = model(IDS).last_hidden_state
    assert hidden.shape[-1] == 96 and model.config.n_head == 12
    for copy in hidden.split(32, dim=-1):
        assert (copy - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("tie", [False, True])
def test_widening_llama_with_grouped_query_attention_keeps_logits_and_generation(tie):
    model = _llama(tie=tie)
    expected, tokens = _logits(model), _generate(model)
    widen_transformer(model, hidden_size=64, intermediate_size=96, noise=0.1)
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        64,
        8,
        4,
    )
    assert (config.head_dim, config.intermediate_size) == (8, 96)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert (_logits(model) - expected).abs().max().item() <= 1e-10
    assert torch.equal(_generate(model), tokens)


def test_llama_heads_grow_at_fixed_hidden_size_because_head_dim_is_its_own_field():
    model = _llama()
    expected = _logits(model)
    widen_transformer(model, num_heads=12)
    assert model.config.hidden_size == 32
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (12, 6)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (96, 32)
    assert (_logits(model) - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("config_cls", [transformers.MistralConfig, transformers.Qwen2Config])
def test_other_llama_style_decoders_widen_exactly(config_cls):
    model = _llama(config_cls)
    expected = _logits(model)
    widen_transformer(model, hidden_size=64)
    assert (_logits(model) - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("width", [200, 256])
def test_mlp_grows_to_any_larger_width_exactly(width):
    model = _gpt2()
    expected = _logits(model)
    widen_transformer(model, intermediate_size=width)
    assert model.transformer.h[1].mlp.c_fc.weight.shape == (32, width)
    assert model.config.n_inner == width
    assert (_logits(model) - expected).abs().max().item() <= 1e-10


def test_noise_keeps_the_function_but_lets_copies_differ():
    model = _gpt2()
    expected = _logits(model)
    query = model.transformer.h[0].attn.c_attn.weight[:, :32].clone()  # (hidden in, query out)
    widen_transformer(model, hidden_size=64, noise=0.2, seed=3)
    grown = model.transformer.h[0].attn.c_attn.weight[:, :32]
    first, second = grown[:32], grown[32:]  # the shares of the two hidden copies
    assert not torch.allclose(first, second)
    assert (first + second - query).abs().max().item() <= 1e-12
    assert (_logits(model) - expected).abs().max().item() <= 1e-10


def test_bert_classifier_widens_with_its_pooler_and_keeps_logits():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=128,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config).to(torch.float64).eval()
    expected = _logits(model)
    widen_transformer(model, hidden_size=64, intermediate_size=96)
    assert model.classifier.weight.shape == (3, 64)
    assert (_logits(model) - expected).abs().max().item() <= 1e-10


def test_bert_masked_lm_keeps_its_decoder_tied_and_its_logits():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=128,
    )
    model = transformers.BertForMaskedLM(config).to(torch.float64).eval()
    expected = _logits(model)
    widen_transformer(model, hidden_size=64)
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert (_logits(model) - expected).abs().max().item() <= 1e-10


def test_widening_is_recorded_and_a_saved_model_reloads_exactly(tmp_path):
    folder = tmp_path / "gpt2"
    _gpt2().config.save_pretrained(folder)
    model = netgraft.load_model(f"hf:{folder}", task="causal-lm").eval()
    widen_transformer(model, hidden_size=64, intermediate_size=160, example_input=IDS)
    assert netgraft.get_recipe(model).operations[-1] == {
        "op": "widen_transformer",
        "args": {"hidden_size": 64, "intermediate_size": 160},
    }
    netgraft.save(model, tmp_path / "saved")
    again = netgraft.load(tmp_path / "saved").eval()
    assert again.config.n_embd == 64 and again.lm_head.weight is again.transformer.wte.weight
    assert torch.equal(_logits(again), _logits(model))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_widening_real_minilm_keeps_its_hidden_states_in_every_copy(minilm_dir, dtype):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    model = netgraft.load_model(f"hf:{minilm_dir}").to(dtype).eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = model(**batch)
    widen_transformer(model, hidden_size=768, num_heads=24, example_input=batch)
    assert (model.config.hidden_size, model.config.num_attention_heads) == (768, 24)
    with torch.no_grad():
        grown = model(**batch)
    # float32: 1e-5 of the outputs' magnitude (|h| reaches 5.7); the original model alone
    # moves by 1.4e-5 between a batch of one sentence and of three
    scale = expected.last_hidden_state.abs().max().item() if dtype == torch.float32 else 1.0
    tol = 1e-10 if dtype == torch.float64 else 1e-5 * scale
    for copy in grown.last_hidden_state.split(384, dim=-1):
        assert (copy - expected.last_hidden_state).abs().max().item() <= tol
    assert (grown.pooler_output[:, :384] - expected.pooler_output).abs().max().item() <= tol


@pytest.mark.slow
def test_widening_real_minilm_classifier_keeps_its_logits(minilm_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    model = netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification").eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = model(**batch).logits
    widen_transformer(model, hidden_size=768, intermediate_size=3072, example_input=batch)
    with torch.no_grad():
        assert (model(**batch).logits - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_size": 48}, "multiple of 32"),
        ({"hidden_size": 64, "num_heads": 4}, "head_dim"),
        ({"num_heads": 8}, "head_dim"),
        ({"hidden_size": 16}, "at least 32"),
        ({"intermediate_size": 64}, "at least 128"),
        ({"hidden_size": 64.0}, "integer"),
    ],
)
def test_a_growth_that_cannot_be_exact_is_refused_before_the_model_is_touched(kwargs, match):
    model = _gpt2()
    params, config = _state(model)
    with pytest.raises(SurgeryError, match=match):
        widen_transformer(model, **kwargs)
    after, after_config = _state(model)
    assert after_config == config
    assert all(torch.equal(after[k], v) for k, v in params.items())


def test_llama_heads_not_a_multiple_are_refused():
    with pytest.raises(SurgeryError, match="multiple of 4"):
        widen_transformer(_llama(), num_heads=6)


def test_parameters_without_a_rule_are_refused_before_the_model_is_touched():
    model = _gpt2(add_cross_attention=True)
    params, config = _state(model)
    with pytest.raises(SurgeryError, match="no GPT-2 rule.*crossattention"):
        widen_transformer(model, hidden_size=64)
    after, after_config = _state(model)
    assert after_config == config and all(torch.equal(after[k], v) for k, v in params.items())


def test_unknown_models_and_empty_requests_are_refused():
    with pytest.raises(SurgeryError, match="not a Hugging Face model"):
        widen_transformer(torch.nn.Sequential(torch.nn.Linear(4, 4)), hidden_size=8)
    t5 = transformers.T5Model(
        transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64)
    )
    with pytest.raises(SurgeryError, match="'t5'"):
        widen_transformer(t5, hidden_size=32)
    with pytest.raises(NetgraftError, match="at least one"):
        widen_transformer(_gpt2())
