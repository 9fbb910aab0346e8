"""expand_blocks: transformer stacks grown by function-preserving block copies."""

from __future__ import annotations

import pytest
import torch
import torchvision
import transformers

import netgraft
from netgraft.errors import NetgraftError, SurgeryError
from netgraft.grow import GatedBlock
from netgraft.recipe import replay

SENTENCES = [
    "A trained network can grow without forgetting.",
    "The cat sat on the mat.",
    "Transfer learning reuses what a model already knows.",
]


def _gpt2(dtype=torch.float64):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=4,
        n_embd=32,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def _mean_pool(output, mask):
    hidden = output.last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


@pytest.mark.slow
def test_expanding_real_minilm_from_6_to_8_layers_keeps_sentence_embeddings(minilm_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    model = netgraft.load_model(f"hf:{minilm_dir}").eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = _mean_pool(model(**batch), batch["attention_mask"])
    netgraft.expand_blocks(model, every=3, example_input=dict(batch))
    assert model.config.num_hidden_layers == 8 and len(model.encoder.layer) == 8
    assert netgraft.grown_modules(model) == ["encoder.layer.3", "encoder.layer.7"]
    assert isinstance(model.encoder.layer[3], GatedBlock)
    assert model.encoder.layer[3].gate.item() == 0.0
    with torch.no_grad():
        embeddings = _mean_pool(model(**batch), batch["attention_mask"])
    assert (embeddings - expected).abs().max().item() <= 1e-5
    # still a sentence model: related sentences stay closer than unrelated ones
    sim = (
        torch.nn.functional.normalize(embeddings, dim=1)
        @ torch.nn.functional.normalize(embeddings, dim=1).T
    )
    assert sim[0, 2] > sim[0, 1]


@pytest.mark.slow
def test_expanding_gpt2_keeps_logits_and_cached_generation():
    model = _gpt2()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    netgraft.expand_blocks(model, every=2)
    assert model.config.n_layer == 6 and len(model.transformer.h) == 6
    assert [b.attn.layer_idx for b in model.transformer.h] == list(range(6))
    assert netgraft.grown_modules(model) == ["transformer.h.2", "transformer.h.5"]
    assert torch.count_nonzero(model.transformer.h[2].attn.c_proj.weight) == 0
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max().item() <= 1e-10
    grown_tokens = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(grown_tokens, tokens)


def test_one_step_on_new_gpt2_blocks_changes_them_and_nothing_else():
    model = _gpt2(torch.float32)
    netgraft.expand_blocks(model, after=[0, 3])
    new = netgraft.grown_modules(model)
    assert new == ["transformer.h.1", "transformer.h.5"]
    netgraft.train_only(model, new)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the new blocks did not move"
    assert all(k.startswith(("transformer.h.1.", "transformer.h.5.")) for k in changed), changed
    assert "transformer.h.1.attn.c_proj.weight" in changed
    assert "transformer.h.5.mlp.c_proj.weight" in changed


def test_expanding_llama_style_model_keeps_cached_generation():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).double().eval()
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    netgraft.expand_blocks(model, after=-1)
    assert model.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max().item() <= 1e-10
    assert torch.equal(
        model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True), tokens
    )


def test_recorded_expansion_replays_on_a_fresh_gpt2():
    model = _gpt2()
    netgraft.expand_blocks(model, every=2)
    assert netgraft.get_recipe(model).operations == [{"op": "expand_blocks", "args": {"every": 2}}]
    rebuilt = replay(_gpt2(), netgraft.get_recipe(model).operations)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config.n_layer == 6
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def test_refuses_models_and_positions_it_cannot_expand():
    with pytest.raises(SurgeryError, match="num_hidden_layers"):
        netgraft.expand_blocks(torchvision.models.resnet18(), every=2)
    model = _gpt2()
    with pytest.raises(NetgraftError, match="exactly one of"):
        netgraft.expand_blocks(model, every=2, after=1)
    with pytest.raises(SurgeryError, match="block indices"):
        netgraft.expand_blocks(model, after=4)
    with pytest.raises(NetgraftError, match="positive"):
        netgraft.expand_blocks(model, every=0)
    assert len(model.transformer.h) == 4
