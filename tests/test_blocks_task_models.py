"""Blocks of task models: a Hugging Face sequence classifier (the real pretrained MiniLM),
netgraft's own ``attach`` wrapper and a timm model inside a user's module have their
backbone's blocks, then their heads; gradual unfreezing (fine_tune and the Lightning
callback) then adds one encoder layer per epoch from the top, on real passages."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

import netgraft
from netgraft.data import load_political_passages
from netgraft.train import Callback, fine_tune

transformers = pytest.importorskip("transformers")

MINILM_BLOCKS = [
    "bert.embeddings",
    *[f"bert.encoder.layer.{i}" for i in range(6)],
    "bert.pooler",
    "classifier",
]
# the stages of gradual unfreezing, from the top: one block per epoch after the head epoch
GRADUAL = ["bert.pooler", *[f"bert.encoder.layer.{i}" for i in range(5, -1, -1)], "bert.embeddings"]


def _minilm(minilm_dir):
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(minilm_dir), num_labels=2, local_files_only=True
    )


@pytest.fixture(scope="module")
def passages(minilm_dir):
    """16 real passages (8 per party), tokenised to 16 tokens, as Hugging Face batches."""
    texts = load_political_passages()
    idx = [i for c in (0, 1) for i in (texts.labels == c).nonzero().flatten()[:8].tolist()]
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = tok(
        [texts.texts[i] for i in idx],
        padding="max_length",
        truncation=True,
        max_length=16,
        return_tensors="pt",
    )
    return [
        {**{k: v[j] for k, v in enc.items()}, "labels": texts.labels[i]} for j, i in enumerate(idx)
    ]


def test_minilm_sequence_classifier_has_embeddings_six_layers_pooler_and_head(minilm_dir):
    model = netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification", num_labels=2)
    found = netgraft.blocks(model)
    assert [b.name for b in found] == MINILM_BLOCKS
    assert sum(b.params for b in found) == sum(p.numel() for p in model.parameters())
    assert netgraft.select(model, "block:-1:")[0].startswith("classifier")


def test_attach_wrapper_and_timm_inside_a_user_module_show_the_backbone_blocks():
    stacked = netgraft.attach(torchvision.models.resnet18(), nn.Linear(1000, 3))
    assert [b.name for b in netgraft.blocks(stacked)] == [
        *[f"base.{n}" for n in ("stem", "layer1", "layer2", "layer3", "layer4", "fc")],
        "top",
    ]

    class User(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model("efficientnet_lite0", num_classes=0)
            self.head = nn.Linear(1280, 3)

    names = [b.name for b in netgraft.blocks(User())]
    assert [f"backbone.blocks.{i}" for i in range(7)] == names[1:8]
    assert names[-1] == "head"


class Trainable(Callback):
    """The names of the trainable blocks and the embeddings' tensors at each epoch's start."""

    def __init__(self):
        self.trainable: list[set[str]] = []
        self.embeddings: list[dict[str, torch.Tensor]] = []

    def on_epoch_begin(self, state):
        self.trainable.append(_trainable_blocks(state.model))
        self.embeddings.append(_embeddings(state.model))


def _trainable_blocks(model):
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {b for b in MINILM_BLOCKS if any(n.startswith(b + ".") for n in names)}


def _embeddings(model):
    return {k: v.detach().clone() for k, v in model.bert.embeddings.state_dict().items()}


def _assert_one_layer_per_epoch_from_the_top(trainable, embeddings, final):
    assert trainable[0] == {"classifier"}
    for epoch in range(1, len(GRADUAL) + 1):
        assert trainable[epoch] == {"classifier", *GRADUAL[:epoch]}, epoch
    # the embeddings stay bit-identical until the last stage unfreezes them, then train
    for epoch in range(len(GRADUAL)):
        for name, tensor in embeddings[epoch].items():
            assert torch.equal(tensor, embeddings[0][name]), (epoch, name)
    assert not torch.equal(final["word_embeddings.weight"], embeddings[0]["word_embeddings.weight"])


@pytest.mark.slow
def test_fine_tune_gradual_unfreezes_one_minilm_layer_per_epoch(minilm_dir, passages):
    model = _minilm(minilm_dir)
    spy = Trainable()
    history = fine_tune(
        model,
        DataLoader(passages, batch_size=8),
        epochs=len(GRADUAL),
        head_epochs=1,
        unfreeze="gradual",
        base_lr=1e-3,
        seed=0,
        quiet=True,
        cache=False,
        callbacks=[spy],
    )
    assert history["stage"] == ["head", *[f"unfreeze {b}" for b in GRADUAL]]
    _assert_one_layer_per_epoch_from_the_top(spy.trainable, spy.embeddings, _embeddings(model))


@pytest.mark.slow
def test_lightning_fine_tune_unfreezes_one_minilm_layer_per_epoch(minilm_dir, passages, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from netgraft.integrations.lightning import FineTune

    class Lit(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Record(pl.Callback):
        def __init__(self):
            self.trainable, self.embeddings = [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self.trainable.append(_trainable_blocks(pl_module.model))
            self.embeddings.append(_embeddings(pl_module.model))

    lit, record = Lit(_minilm(minilm_dir)), Record()
    trainer = pl.Trainer(
        max_epochs=1 + len(GRADUAL),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FineTune(head_epochs=1, unfreeze="gradual"), record],
        default_root_dir=tmp_path,
    )
    trainer.fit(lit, DataLoader(passages, batch_size=8))
    final = _embeddings(lit.model)
    _assert_one_layer_per_epoch_from_the_top(record.trainable, record.embeddings, final)


@pytest.mark.slow
def test_hf_fine_tune_callback_unfreezes_one_minilm_layer_per_epoch(minilm_dir, passages, tmp_path):
    from netgraft.integrations.hf import FineTuneCallback

    class Record(transformers.TrainerCallback):
        def __init__(self):
            self.trainable, self.embeddings = [], []

        def on_epoch_begin(self, args, state, control, model=None, **kw):
            self.trainable.append(_trainable_blocks(model))
            self.embeddings.append(_embeddings(model))

    model, record = _minilm(minilm_dir), Record()
    ft = FineTuneCallback(head_epochs=1, unfreeze="gradual")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=1 + len(GRADUAL),
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model,
        args,
        train_dataset=passages,
        callbacks=[ft, record],
        optimizers=ft.optimizers(model, args),
    )
    trainer.train()
    _assert_one_layer_per_epoch_from_the_top(
        record.trainable, record.embeddings, _embeddings(model)
    )


class _Listed(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_layer_decay_and_suggest_see_the_minilm_layers(minilm_dir, passages):
    model = _minilm(minilm_dir)
    groups = netgraft.optim.param_groups(model, 1e-3, layer_decay=0.5, weight_decay=0.0)
    rates = {g["name"]: g["lr"] for g in groups}
    assert list(rates) == MINILM_BLOCKS
    assert rates["bert.encoder.layer.5"] == pytest.approx(1e-3 * 0.5**2)
    assert rates["bert.embeddings"] == pytest.approx(1e-3 * 0.5**8)
    ranked = netgraft.suggest(
        model, _Listed(passages), batches=1, batch_size=8, exclude=["classifier"]
    )
    assert sorted(ranked.ranking) == sorted(MINILM_BLOCKS[:-1])
