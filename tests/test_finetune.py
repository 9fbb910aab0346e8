"""fine_tune: head first, then all-at-once or gradual unfreezing with discriminative rates,
on real MobileNetV2 (ImageNet weights) and the real scikit-learn digits."""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import netgraft
from netgraft import FineTuneConfig
from netgraft.errors import NetgraftError
from netgraft.train import Callback, fine_tune
from netgraft.train.finetune import schedule

QUIET = netgraft.RunOptions(progress=False)


class Spy(Callback):
    """Reads the optimizer's rates right before each step, and the norm layers' modes."""

    def __init__(self):
        self.lrs: list[tuple[str, dict[str, float]]] = []
        self.bn_training: list[tuple[str, bool]] = []

    def on_batch_begin(self, state):
        self.lrs.append((state.stage, {g["name"]: g["lr"] for g in state.optimizer.param_groups}))
        bn = state.model.features[1].conv[2]
        self.bn_training.append((state.stage, bn.training))


@pytest.fixture(scope="module")
def small_digits(digits):
    """48 real digits as 3×32×32 images (upscaled, grey repeated over channels)."""
    x, y = digits
    x = F.interpolate(x[:48], size=32, mode="bilinear").repeat(1, 3, 1, 1)
    return (x[:32], y[:32]), (x[32:48], y[32:48])


def mobilenet(num_classes=10):
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=num_classes)


@pytest.mark.slow
def test_gradual_unfreezing_shows_optimizer_lr_and_leaves_frozen_blocks_untouched(small_digits):
    train, val = small_digits
    model = mobilenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spy = Spy()
    history = fine_tune(
        model,
        train,
        val,
        epochs=2,
        # batch norms unfreeze with their blocks (train_bn): their own no-decay groups
        config=FineTuneConfig(
            head_epochs=1, base_lr=1e-2, lr_mult=100, unfreeze="gradual", train_bn=True,
            search=False,
        ),
        optimizer="sgd",
        weight_decay=0.1,
        batch_size=16,
        seed=0,
        quiet=True,
        cache=False,
        callbacks=[spy],
    )
    assert history["stage"] == ["head", "unfreeze features.18", "unfreeze features.17"]
    assert history["epoch"] == [1, 2, 3]
    # the rate shown for each epoch is the optimizer's at the epoch's last step
    last_per_stage = {stage: lrs for stage, lrs in spy.lrs}
    for row in history:
        assert row["lr"] == last_per_stage[row["stage"]]
    assert list(history.rows[2]["lr"]) == [
        "features.17",
        "features.17 (no decay)",
        "features.18",
        "features.18 (no decay)",
        "classifier",
        "classifier (no decay)",
    ]
    top = history.rows[2]["lr"]
    assert top["classifier"] / top["features.17"] == pytest.approx(100 ** (2 / 19))
    after = model.state_dict()
    moved = {
        k.split(".")[0] + "." + k.split(".")[1]
        for k in after
        if not torch.equal(after[k], before[k])
    }
    # SGD with momentum and weight decay moved nothing that was frozen at every step
    assert moved == {"features.17", "features.18", "classifier.1"}
    # frozen norm layers stayed in inference mode throughout (bn="eval")
    assert {mode for _, mode in spy.bn_training} == {False}


@pytest.mark.slow
def test_unfreeze_all_trains_everything_except_keep_frozen(small_digits):
    train, val = small_digits
    model = mobilenet()
    before = model.features[0][0].weight.clone()
    bn_before = model.features[0][1].running_mean.clone()
    history = fine_tune(
        model,
        train,
        val,
        epochs=1,
        config=FineTuneConfig(
            head_epochs=1, base_lr=1e-2, keep_frozen="type:BatchNorm2d", search=False
        ),
        batch_size=16,
        seed=0,
        quiet=True,
        cache=False,
    )
    assert history["stage"] == ["head", "all"]
    lrs = history.rows[1]["lr"]
    assert list(lrs)[0] == "features.0" and list(lrs)[-1] == "classifier"
    assert not torch.equal(model.features[0][0].weight, before)
    assert torch.equal(model.features[0][1].running_mean, bn_before)
    assert not any(
        p.requires_grad
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in m.parameters()
    )


def test_bad_unfreeze_mode_is_a_clear_error():
    with pytest.raises(NetgraftError, match="unfreeze must be one of"):
        FineTuneConfig(unfreeze="sometimes")


def write_digit_images(root, digits, per_class=20, size=64):
    x, y = digits
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for i in (y == c).nonzero().flatten()[:per_class].tolist():
            pixels = (x[i, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(
                root / str(c) / f"{i}.png"
            )
    return root


@pytest.mark.slow
def test_imagenet_mobilenet_fine_tunes_on_real_digit_images_and_beats_random_init(
    tmp_path, digits, mobilenet_v2_weights
):
    root = write_digit_images(tmp_path / "digits", digits)
    scores = {}
    for name, weights in (("pretrained", mobilenet_v2_weights), ("random", None)):
        torch.manual_seed(0)
        model = netgraft.load_model("torchvision:mobilenet_v2", weights=weights)
        model.classifier[1] = nn.Linear(1280, 10)
        split = netgraft.data.image_folder(root, model, size=64, val_fraction=0.2, seed=0)
        assert len(split.train) == 160 and len(split.val) == 40
        # the same budget and recipe for both: 4 head epochs, then 1 epoch of everything
        history = fine_tune(
            model,
            split.train,
            split.val,
            epochs=1,
            config=FineTuneConfig(
                head_epochs=4, head_lr=1e-2, base_lr=2e-4, keep_frozen="type:BatchNorm2d"
            ),
            batch_size=16,
            seed=0,
            quiet=True,
        )
        scores[name] = history.last["val_acc"]
        assert scores[name] == pytest.approx(netgraft.evaluate(model, split.val)["acc"])
    assert scores["pretrained"] >= 0.75, scores
    assert scores["pretrained"] >= scores["random"] + 0.4, scores


@pytest.mark.slow
def test_cli_finetune_then_evaluate_and_predict_with_class_names(
    tmp_path, digits, mobilenet_v2_weights, monkeypatch, capsys
):
    from netgraft.cli import main

    def run(*args):
        monkeypatch.setattr("sys.argv", ["netgraft", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        assert exit_info.value.code == 0, captured.err
        return captured.out

    x, y = digits
    root = tmp_path / "data"
    for c, name in ((0, "zero"), (1, "one"), (7, "seven")):
        (root / name).mkdir(parents=True)
        for i in (y == c).nonzero().flatten()[:8].tolist():
            pixels = (x[i, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32)).save(root / name / f"{i}.png")
    out = tmp_path / "model"
    text = run(
        "finetune",
        "torchvision:mobilenet_v2",
        "--weights",
        str(mobilenet_v2_weights),
        "--data",
        str(root),
        "--size",
        "32",
        "--head-epochs",
        "3",
        "--epochs",
        "1",
        "--head-lr",
        "1e-2",
        "--lr",
        "2e-4",
        "--freeze",
        "type:BatchNorm2d",
        "--batch-size",
        "8",
        "-o",
        str(out),
        "--quiet",
    )
    assert "saved to" in text
    assert {p.name for p in out.iterdir()} >= {
        "weights.safetensors",
        "recipe.yaml",
        "history.json",
        "history.png",
        "data.json",
    }
    history = netgraft.History.load(out)
    assert [r["stage"] for r in history] == ["head", "head", "head", "all"]
    scores = json.loads(run("evaluate", str(out), "--data", str(root), "--json"))
    # a large --head-lr for the head, a small --lr for everything after: what it learnt stays
    assert scores["n"] == 24 and scores["acc"] >= 0.6, scores
    image = next((root / "seven").iterdir())
    top = json.loads(run("predict", str(out), str(image), "-k", "3", "--json"))[str(image)]
    assert sorted(t["class"] for t in top) == ["one", "seven", "zero"]
    assert sum(t["prob"] for t in top) == pytest.approx(1.0, abs=1e-4)


def test_cli_finetune_with_one_seed_gives_the_same_model_twice(
    tmp_path, digits, monkeypatch, capsys
):
    from safetensors.torch import load_file

    from netgraft.cli import main

    (tmp_path / "net.py").write_text(
        "from torch import nn\n\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10))\n"
    )
    x, y = digits
    root = tmp_path / "data"
    for c in (0, 1, 7):
        (root / str(c)).mkdir(parents=True)
        for i in (y == c).nonzero().flatten()[:8].tolist():
            pixels = (x[i, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / str(c) / f"{i}.png")
    weights = []
    for run in ("a", "b"):
        torch.manual_seed(len(weights))  # whatever the global stream, --seed decides
        argv = ["netgraft", "finetune", f"{tmp_path / 'net.py'}:build", "--data", str(root)]
        argv += ["--size", "8", "--seed", "3", "--quiet", "-o", str(tmp_path / run)]
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 0, capsys.readouterr().err
        weights.append(load_file(tmp_path / run / "weights.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.fixture(scope="module")
def digits_64(digits):
    """The real digits as ImageNet-normalised 3×64×64 images: 200 to train, 200 held out."""
    x, y = digits
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:400]
    x = F.interpolate(x[order], size=64, mode="bilinear").repeat(1, 3, 1, 1)
    mean = torch.tensor(netgraft.data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(netgraft.data.IMAGENET_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    return (x[:200], y[order][:200]), (x[200:], y[order][200:])


def imagenet_mobilenet(weights, num_classes=10):
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, weights_only=True))
    torch.manual_seed(0)
    model.classifier[1] = nn.Linear(1280, num_classes)
    return model


@pytest.mark.slow
def test_the_defaults_keep_what_the_head_learnt_on_200_digit_images(
    digits_64, mobilenet_v2_weights
):
    train, val = digits_64
    # the head alone, 6 epochs: ImageNet features give a useful head on digits
    model = imagenet_mobilenet(mobilenet_v2_weights)
    alone = FineTuneConfig(head_epochs=6, search=False)
    head_acc = fine_tune(model, train, val, epochs=0, config=alone, run=QUIET).last["val_acc"]
    assert head_acc >= 0.7, head_acc
    # the fixed body rate alone (search=False) undoes it on this task (0.625 against 0.835
    # when this test was written): no fixed setting holds everywhere ...
    # ... so the default searches, on held-out training data, and keeps the head's gain
    model = imagenet_mobilenet(mobilenet_v2_weights)
    history = fine_tune(model, train, val, epochs=2, config=FineTuneConfig(head_epochs=4),
                        seed=0, run=QUIET)  # fmt: skip
    # 200 examples: fifths of 40, three held out in turn (120 scored)
    assert history.search is not None
    assert (history.search["held_out"], history.search["folds"]) == (120, 3)
    assert history.last["val_acc"] >= head_acc - 0.03, (head_acc, history.search)


@pytest.mark.slow
def test_batch_norms_stay_frozen_when_the_body_unfreezes(digits_64, mobilenet_v2_weights):
    train, _ = digits_64
    model = imagenet_mobilenet(mobilenet_v2_weights)
    bn = model.features[5].conv[1][1]
    stats = bn.running_var.clone()
    config = FineTuneConfig(head_epochs=1, search=False)
    history = fine_tune(model, (train[0][:64], train[1][:64]), epochs=1, config=config, run=QUIET)
    assert history["stage"] == ["head", "all"]
    # batch norms stayed frozen after unfreezing (train_bn=False), the convolutions trained
    assert torch.equal(bn.running_var, stats) and not bn.weight.requires_grad
    assert model.features[5].conv[1][0].weight.requires_grad


@pytest.mark.slow
def test_train_bn_unfreezes_batch_norms_with_the_rest(digits_64, mobilenet_v2_weights):
    train, val = digits_64
    model = imagenet_mobilenet(mobilenet_v2_weights)
    bn = model.features[5].conv[1][1]
    stats = bn.running_var.clone()
    config = FineTuneConfig(head_epochs=0, train_bn=True, search=False)
    fine_tune(model, (train[0][:64], train[1][:64]), epochs=1, config=config, seed=0, run=QUIET)
    assert bn.weight.requires_grad and not torch.equal(bn.running_var, stats)


def test_the_head_stage_of_a_distilled_deit_trains_both_heads():
    import timm

    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3)
    stages = schedule(model, 2, FineTuneConfig(head_epochs=1, unfreeze="gradual"))
    assert stages[0].trainable == ["head", "head_dist"]
    assert stages[1].name == "unfreeze norm" and stages[1].trainable[0] == "norm"
    assert stages[1].trainable[-2:] == ["head", "head_dist"]
    assert stages[2].name == "unfreeze blocks.11"
    netgraft.train_only(model, stages[0].trainable)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head", "head_dist"}


def digits_net():
    """A small CNN for the real 8×8 digits: conv block, batch norm, two Linear layers."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("unfreeze", "sometimes", "unfreeze must be one of all, gradual"),
        ("bn", "maybe", "bn must be one of eval, train, frozen"),
        ("head_epochs", -1, "head_epochs must be >= 0"),
        ("head_epochs", 1.5, "head_epochs must be an integer"),
        ("base_lr", 0, "base_lr must be a positive number"),
        ("head_lr", -1e-3, "head_lr must be a positive number"),
        ("lr_mult", 0.5, "lr_mult must be a number >= 1"),
        ("train_bn", "yes", "train_bn must be True or False"),
        ("scheduler", "sometimes", "scheduler must be one of constant, cosine, onecycle"),
    ],
)
def test_a_bad_config_field_is_one_clear_error_when_the_config_is_built(field, value, message):
    with pytest.raises(NetgraftError, match=message):
        FineTuneConfig(**{field: value})
    with pytest.raises(NetgraftError, match=message):
        FineTuneConfig().replace(**{field: value})


def test_fine_tune_runs_the_stages_schedule_computes(digits):
    x, y = digits
    train, val = (x[:96], y[:96]), (x[96:160], y[96:160])
    model = digits_net()
    config = FineTuneConfig(
        head_epochs=2, unfreeze="gradual", base_lr=2e-3, lr_mult=4, search=False
    )
    stages = schedule(model, 3, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = fine_tune(
        model, train, val, epochs=3, config=config, batch_size=32, seed=0, run=QUIET
    )
    assert history["stage"] == [s.name for s in stages]
    assert history["stage"] == ["head", "head", "unfreeze 4", "unfreeze 1", "unfreeze 0"]
    assert list(history.rows[0]["lr"]) == ["6"] and list(history.rows[2]["lr"]) == ["4", "6"]
    # four blocks (0, 1, 4, 6): the rates spread geometrically by lr_mult over them
    rates = history.rows[4]["lr"]
    assert rates["6"] / rates["4"] == pytest.approx(4 ** (1 / 3))
    assert rates["6"] / rates["0"] == pytest.approx(4)
    # the conv block was frozen until the last stage; its batch norm never trained
    assert torch.equal(model[1].running_mean, before["1.running_mean"])
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_old_keyword_arguments_warn_once_naming_the_config_and_mean_the_same(monkeypatch):
    monkeypatch.setattr("netgraft.deprecation._warned", set())
    model = digits_net()
    with pytest.warns(DeprecationWarning, match=r"schedule\(config=FineTuneConfig\(base_lr="):
        old = schedule(model, 2, head_epochs=2, unfreeze="gradual", base_lr=1e-3)
    new = schedule(model, 2, FineTuneConfig(head_epochs=2, unfreeze="gradual", base_lr=1e-3))
    assert old == new
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        schedule(model, 2, base_lr=1e-3)
    with pytest.raises(TypeError, match="no_such_option"):
        schedule(model, 2, no_such_option=1)


def test_fine_tune_takes_at_most_twelve_parameters_and_no_default_of_its_own():
    params = inspect.signature(fine_tune).parameters
    assert len(params) <= 12
    assert not set(params) & {f.name for f in dataclasses.fields(FineTuneConfig)}
    assert params["config"].default is None  # built at call time: the dataclass's defaults


def test_the_head_lookup_is_one_function_and_the_old_name_warns(monkeypatch):
    from netgraft.heads import head_names
    from netgraft.train import head_name

    monkeypatch.setattr("netgraft.deprecation._warned", set())
    model = mobilenet()
    assert head_names(model) == ["classifier"] == [netgraft.find_head(model)[0]]
    assert head_names(model, "features.18") == ["features.18"]
    with pytest.warns(DeprecationWarning, match=r"find_head\(model\)\[0\]"):
        assert head_name(model) == "classifier"


class _Stop(Exception):
    pass


def test_a_default_changed_in_the_config_is_followed_everywhere(
    digits, tmp_path, monkeypatch, capsys
):
    from types import SimpleNamespace

    from netgraft.cli import main

    defaults = FineTuneConfig.__init__.__kwdefaults__
    changed = {"head_epochs": 2, "base_lr": 6e-4, "lr_mult": 4.0, "unfreeze": "gradual"}
    for field, value in {**changed, "train_bn": True}.items():
        monkeypatch.setitem(defaults, field, value)
    expected = FineTuneConfig()
    assert (expected.base_lr, expected.train_bn) == (6e-4, True)
    # fine_tune
    x, y = digits
    model = digits_net()
    bn_stats = model[1].running_mean.clone()
    history = fine_tune(model, (x[:64], y[:64]), epochs=2, batch_size=32, run=QUIET)
    assert history["stage"] == ["head", "head", "unfreeze 4", "unfreeze 1"]
    assert not torch.equal(model[1].running_mean, bn_stats)  # train_bn: trained with the rest
    # the folder workflow
    for c in range(2):
        (tmp_path / "data" / str(c)).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 60 * c + i, np.uint8)).save(
                tmp_path / "data" / str(c) / f"{i}.png"
            )
    seen = {}

    def spy(model, train, val, *, epochs, config, **kwargs):
        seen["config"] = config
        raise _Stop

    monkeypatch.setattr("netgraft.workflows.fine_tune", spy)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 2))
    with pytest.raises(_Stop):
        netgraft.workflows.finetune_folder(net, tmp_path / "data", tmp_path / "out", size=8)
    assert seen.pop("config") == expected

    # the command line
    def finetune_folder(*args, config, **kwargs):
        seen["config"] = config
        return SimpleNamespace(summary=lambda: "done")

    monkeypatch.setattr("netgraft.cli.fine_tune_folder", finetune_folder)
    monkeypatch.setattr("sys.argv", ["netgraft", "finetune", "m.py:f", "--data", "d", "-o", "o"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert seen.pop("config") == expected
    # both trainer callbacks
    from netgraft.integrations.hf import FineTuneCallback
    from netgraft.integrations.lightning import FineTune

    for callback in (FineTune(), FineTuneCallback()):
        assert callback.schedule.config == expected
        # the trainer's rate scales the head stage, the config's ratio the rest
        rated = callback.schedule.rated(1e-3)
        assert rated.head_lr == 1e-3 and rated.base_lr == pytest.approx(1e-3 * 6e-4 / 3e-3)


def test_every_config_field_has_a_command_line_option(monkeypatch, capsys):
    from netgraft.cli import main

    seen = {}

    def finetune_folder(*args, config, **kwargs):
        seen["config"] = config
        return type("Result", (), {"summary": lambda self: "done"})()

    monkeypatch.setattr("netgraft.cli.fine_tune_folder", finetune_folder)
    options = ["--head", "classifier", "--head-epochs", "2", "--lr", "1e-3", "--head-lr", "1e-2"]
    options += ["--lr-mult", "3", "--unfreeze", "gradual", "--bn", "frozen", "--train-bn"]
    options += ["--freeze", "features.0", "--scheduler", "cosine", "--no-search"]
    argv = ["netgraft", "finetune", "m.py:f", "--data", "d", "-o", "o", *options]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert seen["config"] == FineTuneConfig(
        head="classifier", head_epochs=2, base_lr=1e-3, head_lr=1e-2, lr_mult=3,
        unfreeze="gradual", bn="frozen", train_bn=True, keep_frozen="features.0",
        scheduler="cosine", search=False,
    )  # fmt: skip
    monkeypatch.setattr("sys.argv", [*argv[:7], "--unfreeze", "sometimes"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "unfreeze must be one of" in err
    assert "Traceback" not in err


def test_the_readme_call_with_old_keywords_trains_as_its_config_does(digits, monkeypatch):
    monkeypatch.setattr("netgraft.deprecation._warned", set())
    x, y = digits
    train, val = (x[:64], y[:64]), (x[64:96], y[64:96])
    old = dict(head_epochs=2, head_lr=1e-2, base_lr=2e-4, unfreeze="all", keep_frozen="type:BatchNorm2d")  # fmt: skip
    common = {"batch_size": 32, "seed": 0, "quiet": True}
    models = [digits_net(), digits_net()]
    with pytest.warns(DeprecationWarning, match=r"fine_tune\(config=FineTuneConfig\(head_lr="):
        before = fine_tune(models[0], train, val, epochs=1, **old, **common)
    after = fine_tune(models[1], train, val, epochs=1, config=FineTuneConfig(**old), **common)
    assert before["stage"] == after["stage"] == ["head", "head", "all"]
    assert before["val_acc"] == after["val_acc"]
    first, second = (m.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_old_keywords_warn_at_the_users_line_for_every_entry_point(monkeypatch):
    from netgraft.integrations import FineTuneSchedule

    monkeypatch.setattr("netgraft.deprecation._warned", set())
    model = digits_net()
    calls = {
        "schedule": lambda: schedule(model, 1, head_epochs=2),
        "FineTuneSchedule": lambda: FineTuneSchedule(head_epochs=2, lr=1e-3),
        "fine_tune": lambda: fine_tune(model, None, epochs=0, head_epochs=0, unknown_fit_kw=1),
    }
    for where, call in calls.items():
        with pytest.warns(DeprecationWarning, match=rf"{where}\(") as record:
            try:
                call()
            except TypeError:  # fine_tune hands the unknown keyword on to fit
                pass
        assert {w.filename for w in record} == {__file__}, where
    old = FineTuneSchedule(head_epochs=2, lr=1e-3)
    assert old.config.head_epochs == 2 and old.config.base_lr == 1e-3
    assert not old.lr_from_optimizer


def test_fit_s_old_keywords_warn_once_from_fine_tune_and_train_as_their_new_spelling(
    digits, monkeypatch
):
    monkeypatch.setattr("netgraft.deprecation._warned", set())
    x, y = digits
    train, val = (x[:64], y[:64]), (x[64:96], y[64:96])
    config = FineTuneConfig(search=False)
    common = {"epochs": 1, "config": config, "batch_size": 32, "seed": 0}
    models = [digits_net(), digits_net()]
    with pytest.warns(DeprecationWarning) as record:
        old = fine_tune(models[0], train, val, quiet=True, weight_decay=0.01, **common)
    ours = [w for w in record if "is deprecated; use" in str(w.message)]
    assert sorted(str(w.message) for w in ours) == [
        "fine_tune(quiet=...) is deprecated; use run=RunOptions(progress=not quiet)",
        "fine_tune(weight_decay=...) is deprecated; use optimizer=Optimization(weight_decay=...)",
    ]
    assert {w.filename for w in ours} == {__file__}  # the caller's line, not netgraft's
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # each spelling warns once
        fine_tune(digits_net(), train, epochs=0, config=config.replace(head_epochs=0), quiet=True)
        new = fine_tune(models[1], train, val, run=netgraft.RunOptions(progress=False),
                        optimizer=netgraft.Optimization(weight_decay=0.01), **common)  # fmt: skip
    assert old["stage"] == new["stage"] == ["head", "all"]
    assert old["loss"] == new["loss"] and old["val_acc"] == new["val_acc"]
    first, second = (m.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("head", ["classifier", "classifier.*", "type:Linear", ["classifier.1"]])
def test_the_head_may_be_any_selector(head):
    model = mobilenet()
    stages = schedule(model, 2, FineTuneConfig(head=head, unfreeze="gradual"))
    assert [s.name for s in stages] == ["head", "unfreeze features.18", "unfreeze features.17"]
    netgraft.train_only(model, stages[0].trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "classifier.1.weight",
        "classifier.1.bias",
    }


def test_run_options_pass_through_and_cache_true_insists_for_the_head_stage_only(digits):
    x, y = digits
    model = digits_net()
    run = netgraft.RunOptions(cache=True, progress=False)
    history = fine_tune(model, (x[:64], y[:64]), epochs=1, config=FineTuneConfig(), run=run)
    assert history["stage"] == ["head", "all"]  # the "all" stage has nothing to cache
    with pytest.raises(NetgraftError, match="cannot resume"):
        fine_tune(model, (x[:64], y[:64]), epochs=1, run=run.replace(resume="somewhere"))
