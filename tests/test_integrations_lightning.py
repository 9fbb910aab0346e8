"""netgraft.integrations.lightning.FineTune inside a real Lightning Trainer: the ImageNet
MobileNetV2 fine-tuned on real digit images, head first then one block per epoch; frozen
blocks untouched, rates logged, and a run resumed from its checkpoint identical to the
uninterrupted one."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import netgraft
from netgraft import FineTuneConfig
from netgraft.data import load_digits
from netgraft.errors import NetgraftError, SelectionError
from netgraft.train.engine import EpochSampler

pl = pytest.importorskip("lightning.pytorch")
from netgraft.integrations import cached_head  # noqa: E402
from netgraft.integrations.lightning import FineTune  # noqa: E402

EPOCHS = 4


@pytest.fixture(scope="module")
def digits():
    """64 real digits as 3-channel 32x32 images, normalised."""
    x, y = load_digits()
    x = F.interpolate(x[:64], size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return TensorDataset((x - 0.5) / 0.25, y[:64])


@pytest.fixture(scope="module")
def initial(mobilenet_v2_weights):
    """The ImageNet MobileNetV2 with a fresh 10-class head (seeded): its state to start from."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet_v2_weights, weights_only=True))
    netgraft.replace_head(model, num_classes=10)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _model(initial):
    model = torchvision.models.mobilenet_v2(num_classes=10)
    model.load_state_dict(initial)
    return model


class Lit(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.97**step)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Record(pl.Callback):
    """Reseeds each batch (dropout draws the same masks in a resumed run, whenever Lightning
    draws its loader's seed) and records, per epoch, the trainable parameter names and the
    model's tensors at its start and end."""

    def __init__(self):
        self.trainable, self.start, self.end = {}, {}, {}

    def _state(self, pl_module):
        return {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 * trainer.current_epoch + batch_idx)

    def on_train_epoch_start(self, trainer, pl_module):
        e = trainer.current_epoch
        self.trainable[e] = {n for n, p in pl_module.model.named_parameters() if p.requires_grad}
        self.start[e] = self._state(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.end[trainer.current_epoch] = self._state(pl_module)


def _fit(initial, digits, root, max_epochs, ckpt_path=None, **finetune):
    model = _model(initial)
    lit = Lit(model)
    record = Record()
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=pl.loggers.CSVLogger(root, name="logs"),
        callbacks=[
            FineTune(FineTuneConfig(head_epochs=1, unfreeze="gradual", **finetune)),
            record,
            pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    loader = DataLoader(digits, batch_size=32, sampler=EpochSampler(len(digits), seed=0))
    trainer.fit(lit, loader, ckpt_path=ckpt_path)
    return trainer, lit, record


@pytest.fixture(scope="module")
def uninterrupted(initial, digits, tmp_path_factory):
    return _fit(initial, digits, tmp_path_factory.mktemp("full"), EPOCHS)


def _block_of(name):
    return name.split(".")[0] if name.startswith("classifier") else ".".join(name.split(".")[:2])


@pytest.mark.slow
def test_gradual_schedule_unfreezes_one_block_per_epoch_from_the_top(uninterrupted):
    _, _, record = uninterrupted
    blocks = {e: {_block_of(n) for n in names} for e, names in record.trainable.items()}
    assert blocks == {
        0: {"classifier"},
        1: {"classifier", "features.18"},
        2: {"classifier", "features.18", "features.17"},
        3: {"classifier", "features.18", "features.17", "features.16"},
    }


@pytest.mark.slow
def test_frozen_blocks_keep_parameters_and_batchnorm_statistics_bit_identical(uninterrupted):
    _, _, record = uninterrupted
    for epoch in range(EPOCHS):
        trainable = {_block_of(n) for n in record.trainable[epoch]}
        before, after = record.start[epoch], record.end[epoch]
        for name, tensor in after.items():
            if _block_of(name) in trainable:
                continue
            assert torch.equal(tensor, before[name]), f"frozen {name} changed in epoch {epoch}"
    # batch norms outside the head stay frozen in every stage (train_bn=False, as fine_tune)
    stats = [name for name in record.end[3] if "running_" in name]
    assert len(stats) == 2 * 52
    for name in stats:
        assert torch.equal(record.end[3][name], record.start[0][name]), name
    # an unfrozen block did train
    name = "features.17.conv.0.0.weight"
    assert not torch.equal(record.end[2][name], record.start[2][name])


@pytest.mark.slow
def test_param_groups_are_named_after_blocks_and_their_rates_logged(uninterrupted):
    trainer, _, _ = uninterrupted
    opt = trainer.optimizers[0]
    names = [g["name"] for g in opt.param_groups]
    assert "features.0" in names and "classifier" in names and "features.18 (no decay)" in names
    lrs = netgraft.optim.group_lrs(opt)
    assert lrs["features.0"] == 0.0  # still frozen after 4 epochs
    assert lrs["features.16"] > 0 and lrs["features.16"] < lrs["features.18"] < lrs["classifier"]
    with open(trainer.logger.log_dir + "/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    rates = [float(r["lr/features.18"]) for r in rows if r.get("lr/features.18")]
    assert rates[0] == 0.0 and rates[-1] > 0  # frozen during the head epoch, then trained


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_run(uninterrupted, initial, digits, tmp_path):
    full_trainer, full, _ = uninterrupted
    _fit(initial, digits, tmp_path, 2)
    trainer, resumed, _ = _fit(
        initial, digits, tmp_path, EPOCHS, ckpt_path=tmp_path / "ckpt/last.ckpt"
    )
    assert trainer.current_epoch == full_trainer.current_epoch == EPOCHS
    trainable = {n for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in full.model.named_parameters() if p.requires_grad}
    groups, full_groups = (
        trainer.optimizers[0].param_groups,
        full_trainer.optimizers[0].param_groups,
    )
    assert [(g["name"], g["param_names"]) for g in groups] == [
        (g["name"], g["param_names"]) for g in full_groups
    ]
    assert [g["lr"] for g in groups] == pytest.approx([g["lr"] for g in full_groups], rel=1e-9)
    for (name, a), b in zip(
        resumed.model.state_dict().items(), full.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    state = trainer.optimizers[0].state_dict()["state"]
    full_state = full_trainer.optimizers[0].state_dict()["state"]
    assert state.keys() == full_state.keys()
    for k in state:
        torch.testing.assert_close(state[k]["exp_avg"], full_state[k]["exp_avg"], rtol=0, atol=1e-6)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == (
        full_trainer.lr_scheduler_configs[0].scheduler.last_epoch
    )


@pytest.mark.slow
def test_selector_matching_nothing_fails_at_fit_start(initial, digits, tmp_path):
    with pytest.raises(SelectionError, match="no_such_layer"):
        _fit(initial, digits, tmp_path, EPOCHS, keep_frozen="no_such_layer")


@pytest.mark.slow
def test_schedule_longer_than_the_run_fails_before_training(initial, digits, tmp_path):
    with pytest.raises(NetgraftError, match="only 1 epoch"):
        _fit(initial, digits, tmp_path, 1)
    assert not (tmp_path / "ckpt").exists()  # nothing was trained or saved


def test_import_without_lightning_names_the_extra():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import netgraft.integrations\n"
        "try:\n"
        "    import netgraft.integrations.lightning\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MissingExtraError")
    assert "pip install 'netgraft[lightning]'" in out.stdout


@pytest.mark.slow
def test_cached_head_trains_the_models_own_head_inside_lightning(initial, digits):
    model = _model(initial)
    x, y = digits.tensors
    part, train, _, cut_point = cached_head(model, (x, y))
    assert cut_point.startswith("features") or cut_point == "flatten"
    assert len(train) == len(x) and torch.equal(train.tensors()[1], y)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Lit(part), DataLoader(train, batch_size=32))
    state = model.state_dict()
    assert not torch.equal(state["classifier.1.weight"], initial["classifier.1.weight"])
    for name, tensor in state.items():
        if name.startswith("features"):
            assert torch.equal(tensor, initial[name]), name
    model.eval()
    part.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:8]), part(train.tensors()[0][:8]))


class LitNet(pl.LightningModule):
    """A LightningModule holding its model as ``self.net``, as many do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("head", ["net.3", "3", ["net.3"]])
def test_head_named_as_named_modules_shows_it_or_inside_the_model(head):
    x, y = load_digits()
    lit = LitNet()
    assert "net.3" in dict(lit.named_modules())
    first = lit.net[1].weight.clone()
    trainable = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            trainable.append({n for n, p in pl_module.named_parameters() if p.requires_grad})

    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FineTune(FineTuneConfig(head=head, keep_frozen="net.1")), Watch()],
    )
    trainer.fit(lit, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32))
    assert trainable[0] == {"net.3.weight", "net.3.bias"}
    assert trainable[1] == {"net.3.weight", "net.3.bias"}  # net.1 kept frozen, named outside
    assert torch.equal(lit.net[1].weight, first)


def test_callback_old_keyword_arguments_warn_once_and_map_onto_the_config(monkeypatch):
    monkeypatch.setattr("netgraft.deprecation._warned", set())
    with pytest.warns(DeprecationWarning, match=r"FineTune\(config=FineTuneConfig\(unfreeze="):
        old = FineTune(head_epochs=2, unfreeze="gradual", lr_mult=None, bn="eval")
    assert old.schedule.config == FineTuneConfig(head_epochs=2, unfreeze="gradual")
    assert old.schedule.lr_from_optimizer
    # the old absolute rates: the config's rates as they are
    with pytest.warns(DeprecationWarning, match="lr_from_optimizer=False"):
        rated = FineTune(head_lr=1e-2).schedule
    assert not rated.lr_from_optimizer and rated.rated(1.0).head_lr == 1e-2
    ratio = FineTuneConfig().base_lr / FineTuneConfig().head_lr
    assert rated.config.base_lr == pytest.approx(1e-2 * ratio)
    with pytest.raises(TypeError, match="no_such_option"):
        FineTune(no_such_option=1)
