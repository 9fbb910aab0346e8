"""netgraft.integrations.hf.FineTuneCallback inside a real Hugging Face Trainer: the
pretrained MiniLM sequence classifier on real political passages (head first, then
gradual unfreezing, rates in the log history), and a ResNet whose frozen BatchNorm layers
keep their statistics although the Trainer calls model.train() every step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from netgraft import FineTuneConfig
from netgraft.data import load_digits, load_political_passages
from netgraft.errors import NetgraftError, SelectionError

transformers = pytest.importorskip("transformers")
from netgraft.integrations.hf import FineTuneCallback, cached_head_for_trainer  # noqa: E402
from netgraft.integrations.schedule import FineTuneSchedule  # noqa: E402

EPOCHS = 3


def _args(tmp_path, epochs=EPOCHS, save_strategy="no"):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=1e-4,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy=save_strategy,
        disable_tqdm=True,
        seed=0,
    )


class Record(transformers.TrainerCallback):
    """Per epoch, the trainable parameter names and the model's tensors at its start; the
    tensors at the end of training."""

    def __init__(self):
        self.trainable, self.start, self.end = {}, {}, None

    @staticmethod
    def _state(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_epoch_begin(self, args, state, control, model=None, **kw):
        e = len(self.start)
        self.trainable[e] = {n for n, p in model.named_parameters() if p.requires_grad}
        self.start[e] = self._state(model)

    def on_train_end(self, args, state, control, model=None, **kw):
        self.end = self._state(model)


@pytest.fixture(scope="module")
def passages(minilm_dir):
    """32 real passages (16 per party), tokenised to 32 tokens."""
    texts = load_political_passages()
    idx = [i for c in (0, 1) for i in (texts.labels == c).nonzero().flatten()[:16].tolist()]
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    enc = tok(
        [texts.texts[i] for i in idx],
        padding="max_length",
        truncation=True,
        max_length=32,
        return_tensors="pt",
    )
    return [
        {**{k: v[j] for k, v in enc.items()}, "labels": texts.labels[i]} for j, i in enumerate(idx)
    ]


@pytest.fixture(scope="module")
def minilm_run(minilm_dir, passages, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=2
    )
    ft = FineTuneCallback(FineTuneConfig(head_epochs=1, unfreeze="gradual"))
    record = Record()
    args = _args(tmp_path_factory.mktemp("minilm"))
    trainer = transformers.Trainer(
        model,
        args,
        train_dataset=passages,
        callbacks=[ft, record],
        optimizers=ft.optimizers(model, args),
    )
    trainer.train()
    return trainer, record


@pytest.mark.slow
def test_minilm_blocks_become_trainable_at_their_scheduled_epochs(minilm_run):
    _, record = minilm_run
    blocks = {
        e: {".".join(n.split(".")[:2]) for n in names} for e, names in record.trainable.items()
    }
    # one block per epoch from the top of the encoder: the pooler, then its last layer
    assert blocks == {
        0: {"classifier.weight", "classifier.bias"},
        1: {"bert.pooler", "classifier.weight", "classifier.bias"},
        2: {"bert.pooler", "bert.encoder", "classifier.weight", "classifier.bias"},
    }
    layers = {n.split(".")[3] for n in record.trainable[2] if n.startswith("bert.encoder.")}
    assert layers == {"5"}


@pytest.mark.slow
def test_minilm_frozen_tensors_stay_bit_identical_and_unfrozen_ones_train(minilm_run):
    _, record = minilm_run
    head_epoch_start, head_epoch_end = record.start[0], record.start[1]
    for name, tensor in head_epoch_end.items():
        if name.startswith("bert."):
            assert torch.equal(tensor, head_epoch_start[name]), f"frozen {name} changed"
    assert not torch.equal(
        head_epoch_end["classifier.weight"], head_epoch_start["classifier.weight"]
    )
    name = "bert.pooler.dense.weight"
    assert not torch.equal(record.start[2][name], head_epoch_end[name])  # trained once unfrozen
    frozen = "bert.encoder.layer.4.attention.self.query.weight"
    assert torch.equal(record.end[frozen], head_epoch_start[frozen])  # never unfrozen


@pytest.mark.slow
def test_minilm_block_rates_appear_in_the_log_history(minilm_run):
    trainer, _ = minilm_run
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == trainer.state.global_step
    assert all("lr/bert.embeddings" in row and "lr/bert.pooler" in row for row in logged)
    head_stage = [row for row in logged if row["epoch"] <= 1]
    unfrozen = [row for row in logged if row["epoch"] > 1]
    assert head_stage and unfrozen
    assert all(row["lr/bert.pooler"] == 0.0 and row["lr/classifier"] > 0 for row in head_stage)
    # rates fall geometrically over the 9 blocks, from the classifier's to its / lr_mult at the
    # embeddings (still frozen, at 0), both scaled by the Trainer's schedule
    for row in unfrozen:
        assert row["lr/bert.pooler"] * FineTuneConfig().lr_mult ** (1 / 8) == pytest.approx(
            row["lr/classifier"], rel=1e-9
        )
        assert row["lr/bert.embeddings"] == 0.0
    assert max(row["lr/bert.pooler"] for row in unfrozen) > 0
    names = [g["name"] for g in trainer.optimizer.param_groups]
    blocks = [n for n in names if not n.endswith(" (no decay)")]
    assert blocks == [
        "bert.embeddings",
        *[f"bert.encoder.layer.{i}" for i in range(6)],
        "bert.pooler",
        "classifier",
    ]


class ImageClassifier(nn.Module):
    """A torchvision network as the Trainer expects a model: keyword inputs, a loss."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


@pytest.fixture(scope="module")
def digit_images():
    x, y = load_digits()
    x = F.interpolate(x[:32], size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return [{"pixel_values": (x[i] - 0.5) / 0.25, "labels": y[i]} for i in range(32)]


def _resnet():
    torch.manual_seed(0)
    return ImageClassifier(torchvision.models.resnet18(num_classes=10))


def test_resnet_frozen_batchnorm_keeps_its_statistics_through_trainer_train(digit_images, tmp_path):
    model = _resnet()
    record = Record()
    config = FineTuneConfig(
        head_epochs=1, unfreeze="all", keep_frozen="layer1", bn="eval", train_bn=True
    )
    ft = FineTuneCallback(config)
    trainer = transformers.Trainer(
        model, _args(tmp_path, epochs=2), train_dataset=digit_images, callbacks=[ft, record]
    )
    trainer.train()  # the Trainer's own optimizer, regrouped by the callback
    start, after_head, end = record.start[0], record.start[1], record.end
    for name in ("net.layer1.0.bn1.running_mean", "net.layer1.1.bn2.running_var"):
        assert torch.equal(end[name], start[name]), name  # kept frozen all along
    assert torch.equal(after_head["net.bn1.running_mean"], start["net.bn1.running_mean"])
    assert not torch.equal(end["net.bn1.running_mean"], start["net.bn1.running_mean"])
    assert not torch.equal(
        end["net.layer3.0.conv1.weight"], after_head["net.layer3.0.conv1.weight"]
    )
    assert torch.equal(end["net.layer1.0.conv1.weight"], start["net.layer1.0.conv1.weight"])
    logged = [row for row in trainer.state.log_history if "lr/layer3" in row]
    assert logged[0]["lr/layer3"] == 0.0 and max(row["lr/layer3"] for row in logged) > 0


@pytest.mark.parametrize(
    ("options", "epochs", "error", "message"),
    [
        ({"keep_frozen": "no_such_layer"}, 2, SelectionError, "no_such_layer"),
        ({"head": "net.fc2"}, 2, SelectionError, "net.fc2|fc2"),
        ({"head_epochs": 2}, 2, NetgraftError, "only 2 epoch"),
    ],
)
def test_bad_input_fails_at_train_begin_before_any_step(
    digit_images, tmp_path, options, epochs, error, message
):
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = transformers.Trainer(
        model,
        _args(tmp_path, epochs=epochs),
        train_dataset=digit_images,
        callbacks=[FineTuneCallback(FineTuneConfig(**options))],
    )
    with pytest.raises(error, match=message):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_import_without_transformers_names_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import netgraft.integrations\n"
        "try:\n"
        "    import netgraft.integrations.hf\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MissingExtraError")
    assert "pip install 'netgraft[hf]'" in out.stdout


class StopAfter(transformers.TrainerCallback):
    """Ends the run after ``epochs`` epochs, as an interruption would."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, args, state, control, **kw):
        if round(state.epoch) >= self.epochs:
            control.should_training_stop = True


def _resnet_run(digit_images, out, resume=None, stop=None):
    model = _resnet()
    ft = FineTuneCallback(FineTuneConfig(head_epochs=1, unfreeze="gradual"))
    args = _args(out, epochs=3, save_strategy="epoch" if stop else "no")
    trainer = transformers.Trainer(
        model,
        args,
        train_dataset=digit_images,
        callbacks=[ft] + ([StopAfter(stop)] if stop else []),
        optimizers=ft.optimizers(model, args),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


@pytest.mark.slow
def test_trainer_resumed_from_a_checkpoint_matches_the_uninterrupted_run(digit_images, tmp_path):
    full_trainer, full = _resnet_run(digit_images, tmp_path / "full")
    _, stopped = _resnet_run(digit_images, tmp_path / "run", stop=2)
    checkpoint = sorted((tmp_path / "run").glob("checkpoint-*"))[-1]
    trainer, resumed = _resnet_run(digit_images, tmp_path / "run", resume=str(checkpoint))
    assert trainer.state.global_step == full_trainer.state.global_step
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == {
        n for n, p in full.named_parameters() if p.requires_grad
    }
    assert [(g["name"], g["lr"]) for g in trainer.optimizer.param_groups] == [
        (g["name"], g["lr"]) for g in full_trainer.optimizer.param_groups
    ]
    for (name, a), b in zip(resumed.state_dict().items(), full.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_cached_head_trains_the_models_own_head_through_the_trainer(digit_images, tmp_path):
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.stack([r["pixel_values"] for r in digit_images])
    y = torch.stack([r["labels"] for r in digit_images])
    head, train, _ = cached_head_for_trainer(model.net, (x, y))
    trainer = transformers.Trainer(head, _args(tmp_path, epochs=2), train_dataset=train)
    trainer.train()
    after = model.state_dict()
    assert not torch.equal(after["net.fc.weight"], before["net.fc.weight"])
    assert all(torch.equal(v, before[k]) for k, v in after.items() if not k.startswith("net.fc"))


def test_schedulers_with_their_own_per_group_rates_are_refused_with_the_alternatives():
    model = _resnet()
    schedule = FineTuneSchedule(FineTuneConfig(head_epochs=1))
    schedule.start(model, 3, 1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
    with pytest.raises(NetgraftError, match="OneCycleLR.*LambdaLR"):
        schedule.regroup(opt, sched)
    assert schedule.model is model.net  # the wrapper's only child holding parameters
    assert [s.name for s in schedule.stages] == ["head", "all", "all"]
