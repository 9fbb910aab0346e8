"""The study's "lora" mode on the real MiniLM sequence classifier and real political-speech
passages: LoRA (through PEFT) on the top k layers for each k, the source left as it was,
the same rows with and without the shared bottoms and from a worker process, and the errors
before any training."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch
from rich.console import Console
from torch import nn

import netgraft
from netgraft.adapted import is_peft_model
from netgraft.data import TokenizedTexts, load_political_passages
from netgraft.extras import MissingExtraError
from netgraft.study import core

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
peft = pytest.importorskip("peft")

BUDGET = {"epochs": 1, "lr": 1e-3, "batch_size": 16}
QUIET = netgraft.RunOptions(progress=False)


@pytest.fixture(scope="module")
def passages(minilm_dir):
    """32 training and 16 validation passages of 32 tokens (labels 0/1)."""
    import transformers

    p = load_political_passages()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    pick = torch.randperm(len(p.texts), generator=torch.Generator().manual_seed(0))[:48]
    texts, labels = [p.texts[i] for i in pick], p.labels[pick]
    train = TokenizedTexts(texts[:32], labels[:32], tokenizer, max_length=32)
    val = TokenizedTexts(texts[32:], labels[32:], tokenizer, max_length=32)
    return train, val


@pytest.fixture(scope="module")
def source(minilm_dir):
    torch.manual_seed(0)
    return netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification", num_labels=2)


def _lora_study(source, passages, **kwargs):
    kwargs = {"reuse": [1, 2], "baseline": False, "seeds": 1, "budget": BUDGET, **kwargs}
    return netgraft.study(source, *passages, modes=("lora",), **kwargs)


def _rows(result):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.rows]


def test_lora_rows_for_each_k_and_the_source_left_bit_identical(source, passages, tmp_path):
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in source.named_parameters()}
    ops = list(netgraft.recipe_of(source).operations)
    result = _lora_study(source, passages, run=QUIET)
    assert [(r["mode"], r["k"], r["reused_up_to"]) for r in result.rows] == [
        ("lora", 1, "bert.encoder.layer.5"),
        ("lora", 2, "bert.encoder.layer.4"),
    ]
    # rank 8 on query and value per layer (2 x 8 x (384 + 384)) and the 2-class head copy
    assert [r["trained_params"] for r in result.rows] == [12288 + 770, 2 * 12288 + 770]
    assert all(0.0 <= r["acc_mean"] <= 1.0 and len(r["accs"]) == 1 for r in result.rows)
    assert (
        result.recommended["mode"] == "lora" and "LoRA on the top" in result.recommended["reason"]
    )
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(result.rich_table())
    assert "all, LoRA down to bert.encoder.layer.4" in console.export_text()
    assert sorted(p.name for p in result.save(tmp_path).values()) == [
        "study.csv",
        "study.json",
        "study.png",
    ]
    assert not is_peft_model(source)
    assert not any("lora" in n for n, _ in source.named_modules())
    assert list(netgraft.recipe_of(source).operations) == ops
    after = dict(source.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], t) and after[n].requires_grad == g for n, (t, g) in
               before.items())  # fmt: skip


def test_lora_rows_are_the_same_with_the_shared_bottoms_and_without(source, passages, caplog):
    with caplog.at_level(logging.INFO, logger="netgraft.cache"):
        shared = _lora_study(source, passages, seeds=2, run=QUIET)
    built = [m for m in caplog.messages if m.startswith("feature cache built")]
    reused = [m for m in caplog.messages if m.startswith("feature cache reused")]
    assert len(built) == 2  # one frozen bottom per k, before the trials
    assert len(reused) == 4  # every trial (2 k x 2 seeds) reads its k's bottom
    alone = _lora_study(source, passages, seeds=2, run=QUIET.replace(shared_pass=False))
    assert _rows(alone) == _rows(shared)
    again = _lora_study(source, passages, seeds=2, run=QUIET)
    assert _rows(again) == _rows(shared)


def test_lora_rows_from_a_worker_process_are_the_serial_rows(source, passages):
    serial = _lora_study(source, passages, reuse=[1], run=QUIET.replace(threads=1))
    worker = _lora_study(source, passages, reuse=[1], run=QUIET.replace(workers=1, threads=1))
    assert _rows(worker) == _rows(serial)


def test_lora_options_come_from_the_budget(source, passages):
    budget = {**BUDGET, "lora": {"r": 4, "target_modules": ["query"]}}
    result = _lora_study(source, passages, reuse=[1], budget=budget, run=QUIET)
    assert result.rows[0]["trained_params"] == 4 * (384 + 384) + 770
    assert result.settings["lora"] == {"r": 4, "target_modules": ["query"]}


class _NormStack(nn.Module):
    """A stack of three blocks that hold no layer PEFT can adapt (norms only)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a trial ran")

    monkeypatch.setattr(core, "run_trials", refuse)


def test_lora_errors_come_before_any_training(source, passages, monkeypatch):
    _no_training(monkeypatch)
    with pytest.raises(netgraft.NetgraftError, match="'layer', which has 6 blocks"):
        _lora_study(source, passages, reuse=[7], run=QUIET)
    with pytest.raises(netgraft.NetgraftError, match="use unit='block'"):
        _lora_study(source, passages, unit="layer", run=QUIET)
    with pytest.raises(netgraft.NetgraftError, match="finds nothing to adapt in the top 1"):
        _lora_study(source, passages, budget={**BUDGET, "lora": {"target_modules": ["nope"]}})
    with pytest.raises(netgraft.NetgraftError, match=r"cannot set \['layers_to_transform'\]"):
        _lora_study(source, passages, budget={**BUDGET, "lora": {"layers_to_transform": [5]}})
    with pytest.raises(netgraft.NetgraftError, match="which modes lacks"):
        netgraft.study(source, *passages, modes=("frozen",), budget={**BUDGET, "lora": {"r": 4}})
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    norms = _NormStack()
    with pytest.raises(netgraft.NetgraftError, match="PEFT knows no default target modules"):
        netgraft.study(norms, (x, y), (x, y), modes=("lora",), seeds=1, run=QUIET)
    with pytest.raises(netgraft.NetgraftError, match="PEFT cannot put LoRA.*LayerNorm"):
        netgraft.study(norms, (x, y), (x, y), modes=("lora",), seeds=1, run=QUIET,
                       budget={"epochs": 1, "lora": {"target_modules": ["0"]}})  # fmt: skip
    flat = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(netgraft.NetgraftError, match="finds no stack of blocks"):
        netgraft.study(flat, (x, y), (x, y), modes=("lora",), seeds=1, run=QUIET)


def test_lora_mode_without_peft_names_the_extra(monkeypatch):
    _no_training(monkeypatch)
    monkeypatch.setitem(sys.modules, "peft", None)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    with pytest.raises(MissingExtraError, match=r"netgraft\[peft\]"):
        netgraft.study(_NormStack(), (x, y), (x, y), modes=("lora",), seeds=1, run=QUIET)
