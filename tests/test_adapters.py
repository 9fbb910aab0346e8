"""Adapters through Hugging Face PEFT on the real MiniLM sequence classifier and real
political-speech passages: blocks, selectors, freezing, the feature cache below the lowest
adapter, save and load, and the errors before training."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

import netgraft
from netgraft.adapters import adapter_blocks, adapter_stack
from netgraft.data import TokenizedTexts, load_political_passages

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")

LORA = {"r": 8, "target_modules": ["query", "value"]}


@pytest.fixture(scope="module")
def passages(minilm_dir):
    import transformers

    p = load_political_passages()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    pick = torch.randperm(len(p.texts), generator=torch.Generator().manual_seed(0))[:48]
    return TokenizedTexts([p.texts[i] for i in pick], p.labels[pick], tokenizer, max_length=32)


def _classifier(minilm_dir):
    torch.manual_seed(0)
    return netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification", num_labels=2)


def _lora(minilm_dir, top=2):
    return netgraft.add_adapters(_classifier(minilm_dir), top=top, **LORA)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_blocks_of_a_peft_model_are_its_base_blocks_with_each_adapter_in_its_block(minilm_dir):
    plain = [b.name for b in netgraft.blocks(_classifier(minilm_dir))]
    model = _lora(minilm_dir)
    found = netgraft.blocks(model)
    assert [b.name for b in found] == plain
    held = {found[i].name: len(names) for i, names in adapter_blocks(model).items()}
    assert held == {"bert.encoder.layer.4": 4, "bert.encoder.layer.5": 4, "classifier": 1}
    assert adapter_stack(model).depth == 6
    assert model.peft_config["default"].layers_to_transform == [4, 5]


def test_unfreeze_and_train_only_keep_pefts_own_trainable_set_unless_told(minilm_dir):
    model = _lora(minilm_dir)
    own = _trainable(model)
    assert all(".lora_" in n or ".modules_to_save." in n for n in own)
    netgraft.freeze(model)
    assert not _trainable(model)
    netgraft.unfreeze(model)
    assert _trainable(model) == own
    netgraft.train_only(model, "bert.encoder.layer.5")  # a name relative to the base
    assert _trainable(model) == {n for n in own if ".layer.5." in n}
    netgraft.train_only(model, "bert.encoder.layer.5.output.LayerNorm", base=True)
    assert {n.rsplit(".", 1)[-1] for n in _trainable(model)} == {"weight", "bias"}
    assert netgraft.trainable_report(model)["adapters"] == sum(
        p.numel() for n, p in model.named_parameters() if n in own
    )


def test_adapter_selector_picks_the_adapters_layers(minilm_dir):
    model = _lora(minilm_dir)
    chosen = netgraft.select(model, "adapter:default")
    assert len(chosen) == 9 and all(".lora_" in n or "modules_to_save" in n for n in chosen)
    with pytest.raises(netgraft.SelectionError, match="names no adapter"):
        netgraft.select(model, "adapter:other")


def test_cached_lora_training_matches_uncached_and_leaves_the_bottom_bit_identical(
    minilm_dir, passages, caplog
):
    losses, used = {}, {}
    for cache in (False, True):
        model = _lora(minilm_dir)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with caplog.at_level(logging.INFO, logger="netgraft"):
            caplog.clear()
            history = netgraft.fit(
                model, passages, epochs=3, lr=1e-3, batch_size=16, seed=0, cache=cache, quiet=True
            )
        losses[cache] = [row["loss"] for row in history.rows]
        used[cache] = [m for m in caplog.messages if "feature cache: frozen prefix" in m]
        bottom = [
            n for n in before if ".embeddings." in n or any(f".layer.{i}." in n for i in range(4))
        ]
        assert len(bottom) > 50
        assert all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in bottom)
        assert any(
            not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n
        )
    assert not used[False]
    assert "up to 'base_model.model.bert.encoder.layer.3'" in used[True][0]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[True][2] < losses[True][0]


def test_save_and_load_give_identical_logits_without_pickle(minilm_dir, passages, tmp_path):
    model = _lora(minilm_dir)
    netgraft.fit(model, passages, epochs=1, lr=1e-3, batch_size=16, seed=0, quiet=True)
    netgraft.save(model, tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "recipe.yaml",
        "weights.safetensors",
    ]
    again = netgraft.load(tmp_path / "lora")
    assert type(again) is type(model) and again.peft_config["default"].layers_to_transform == [4, 5]
    batch = {k: v[:8] for k, v in passages.columns.items()}
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, again.eval()(**batch).logits)
    assert _trainable(again) == _trainable(model)


def test_a_peft_model_built_by_peft_itself_saves_with_its_base_recipe(minilm_dir, tmp_path):
    config = peft.LoraConfig(task_type="SEQ_CLS", layers_to_transform=[5], **LORA)
    model = peft.get_peft_model(_classifier(minilm_dir), config)
    ops = netgraft.recipe_of(model).operations
    assert [op["op"] for op in ops] == ["add_adapters"]
    netgraft.save(model, tmp_path / "m")
    again = netgraft.load(tmp_path / "m")
    assert _trainable(again) == _trainable(model)


def test_adapters_inside_keep_frozen_are_refused_before_peft_changes_the_model(minilm_dir):
    model = _classifier(minilm_dir)
    with pytest.raises(netgraft.NetgraftError, match="adapters on layers kept frozen"):
        netgraft.add_adapters(model, top=2, keep_frozen="bert.encoder.layer.5", **LORA)
    assert not any("lora" in n for n, _ in model.named_modules())


def test_layers_beyond_the_depth_are_refused_with_the_depth(minilm_dir):
    with pytest.raises(netgraft.NetgraftError, match="has 6 blocks"):
        netgraft.add_adapters(_classifier(minilm_dir), layers_to_transform=[4, 6], **LORA)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 2)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_a_peft_model_whose_base_has_no_blocks_fails_before_training():
    model = peft.get_peft_model(_TwoLayers(), peft.LoraConfig(r=2, target_modules=["first"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    with pytest.raises(netgraft.NetgraftError, match="finds no stack of blocks in _TwoLayers"):
        netgraft.fit(model, (x, y), epochs=1, lr=1e-2, quiet=True)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_without_peft_one_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(netgraft.NetgraftError, match=r"netgraft\[peft\]"):
        netgraft.add_adapters(_TwoLayers(), target_modules=["first"])


def _schedule_run(minilm_dir, passages, root, max_epochs, ckpt_path=None):
    """LoRA on the top two layers fine-tuned inside Lightning: the head for one epoch, then
    the adapters of layer 5, then of layer 4, then all; a checkpoint after every epoch."""
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader

    from netgraft.integrations.lightning import FineTune
    from netgraft.train.engine import EpochSampler

    class Lit(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            torch.manual_seed(1000 * self.current_epoch + batch_idx)  # the same dropout masks
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    # from_pretrained leaves the model in eval mode and Lightning keeps modules' modes
    lit = Lit(_lora(minilm_dir).train())
    stages = []
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        callbacks=[
            FineTune(netgraft.FineTuneConfig(head_epochs=1, unfreeze="gradual")),
            pl.callbacks.LambdaCallback(
                on_train_epoch_start=lambda t, m: stages.append(_trainable(m.model))
            ),
            pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(passages, batch_size=16, sampler=EpochSampler(len(passages), seed=0))
    trainer.fit(lit, loader, ckpt_path=ckpt_path)
    return trainer, lit.model, stages


def test_gradual_schedule_across_adapters_resumed_mid_run_equals_the_uninterrupted_run(
    minilm_dir, passages, tmp_path
):
    trainer, full, stages = _schedule_run(minilm_dir, passages, tmp_path / "full", 4)
    layer = [sorted({n.split(".layer.")[1][0] for n in s if ".layer." in n}) for s in stages]
    assert layer == [[], ["5"], ["4", "5"], ["4", "5"]]
    assert all(any("modules_to_save" in n for n in s) for s in stages)
    assert all(".lora_" in n or "modules_to_save" in n for s in stages for n in s)
    _schedule_run(minilm_dir, passages, tmp_path / "cut", 2)
    again, resumed, rest = _schedule_run(
        minilm_dir, passages, tmp_path / "cut", 4, ckpt_path=tmp_path / "cut/last.ckpt"
    )
    assert rest == stages[2:]
    groups = [(g["name"], g["lr"]) for g in again.optimizers[0].param_groups]
    assert groups == [(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups]
    for (name, a), b in zip(resumed.state_dict().items(), full.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_fine_tune_trains_the_head_then_the_adapters_from_the_top_and_never_the_base(
    minilm_dir, passages
):
    model = _lora(minilm_dir)
    own = _trainable(model)
    config = netgraft.FineTuneConfig(
        head_epochs=1, unfreeze="gradual", keep_frozen=None, search=False
    )
    quiet = netgraft.RunOptions(progress=False)
    history = netgraft.fine_tune(model, passages, epochs=3, config=config, batch_size=16, seed=0,
                                 run=quiet)  # fmt: skip
    stages = [row["stage"] for row in history.rows]
    assert stages == ["head", "unfreeze bert.encoder.layer.5", "unfreeze bert.encoder.layer.4",
                      "all"]  # fmt: skip
    assert _trainable(model) == own
    with pytest.raises(netgraft.NetgraftError, match="adapters on layers kept frozen"):
        netgraft.fine_tune(model, passages, epochs=1, batch_size=16, run=quiet,
                           config=config.replace(keep_frozen="bert.encoder.layer.4"))  # fmt: skip


def test_suggest_adapters_chooses_blocks_under_the_budget_and_leaves_the_model(
    minilm_dir, passages
):
    model = _classifier(minilm_dir)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    per_block = 8 * (384 + 384) * 2  # rank 8 on query and value
    s = netgraft.suggest_adapters(
        model, passages, budget=2 * per_block + 100, batch_size=16, **LORA
    )
    assert len(s.recommended) == 2 and s.settings["adapter_params"] == 2 * per_block
    assert [r["block"] for r in s.rows] == [f"bert.encoder.layer.{i}" for i in range(6)]
    assert sorted(r["rank"] for r in s.rows) == list(range(1, 7))
    top = netgraft.suggest_adapters(
        model, passages, budget=2 * per_block, contiguous=True, batch_size=16, **LORA
    )
    assert top.lora["layers_to_transform"] == [4, 5] and top.lora["layers_pattern"] == "layer"
    assert all(
        torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]
        for n, p in model.named_parameters()
    )
    adapted = netgraft.add_adapters(model, **top.lora)
    assert sorted(adapter_blocks(adapted)) == [5, 6, 8]  # layers 4 and 5, and the head
    with pytest.raises(netgraft.NetgraftError, match="fits no block"):
        netgraft.suggest_adapters(_classifier(minilm_dir), passages, budget=100, **LORA)


def test_expand_adapted_carries_the_adapters_and_the_copies_start_without(
    minilm_dir, passages, tmp_path
):
    model = _lora(minilm_dir)
    netgraft.fit(model, passages, epochs=1, lr=1e-2, batch_size=16, seed=0, quiet=True)
    batch = {k: v[:8] for k, v in passages.columns.items()}
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    adapter_weights = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    netgraft.expand_adapted(model, after=[5], example_input=batch)
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).logits, expected, atol=1e-5)
    held = {netgraft.blocks(model)[i].name for i in adapter_blocks(model)}
    assert held == {"bert.encoder.layer.4", "bert.encoder.layer.5", "classifier"}
    assert model.peft_config["default"].layers_to_transform == [4, 5]
    assert all(
        torch.equal(adapter_weights[n], p)
        for n, p in model.named_parameters()
        if n in adapter_weights
    )
    netgraft.save(model, tmp_path / "grown")
    again = netgraft.load(tmp_path / "grown")
    with torch.no_grad():
        assert torch.equal(again.eval()(**batch).logits, model(**batch).logits)


def test_lora_on_only_the_new_blocks_is_one_call(minilm_dir, passages):
    model = _classifier(minilm_dir)
    netgraft.expand_blocks(model, after=[2, 5], verify=False)
    adapted = netgraft.adapt_new_blocks(model, **LORA)
    held = {netgraft.blocks(adapted)[i].name for i in adapter_blocks(adapted)}
    assert held == {"bert.encoder.layer.3", "bert.encoder.layer.7", "classifier"}
