"""fit, callbacks, checkpoints and exact resume, on the real scikit-learn digits."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import netgraft
from netgraft.errors import NetgraftError
from netgraft.train import Callback, Checkpoint, EarlyStopping, History, ReduceLROnPlateau, fit
from netgraft.train.loop import format_lrs

SRC = Path(__file__).resolve().parents[1] / "src"


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def flat_digits(digits):
    x, y = digits
    x = x.flatten(1)
    return (x[:400], y[:400]), (x[1500:1700], y[1500:1700])


pytestmark = pytest.mark.usefixtures("one_thread")


class LrSpy(Callback):
    """Reads the optimizer's learning rates right before every step."""

    def __init__(self):
        self.per_epoch: dict[int, dict[str, float]] = {}

    def on_batch_begin(self, state):
        self.per_epoch[len(state.history) + 1] = {
            g["name"]: g["lr"] for g in state.optimizer.param_groups
        }


@pytest.mark.slow
def test_fit_learns_real_digits_and_records_history(flat_digits, tmp_path):
    train, val = flat_digits
    model = make_mlp()
    history = fit(model, train, val, epochs=6, lr=1e-2, batch_size=16, seed=0, quiet=True)
    assert len(history) == 6 and history["epoch"] == [1, 2, 3, 4, 5, 6]
    assert history.last["val_acc"] > 0.8
    assert history["loss"][-1] < history["loss"][0]
    js, png = history.save(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert History.load(tmp_path).rows == json.loads(js.read_text())["epochs"]
    scores = netgraft.evaluate(model, val)
    assert scores["acc"] == pytest.approx(history.last["val_acc"])


def test_lr_shown_equals_optimizer_lr_also_after_plateau_reduction(flat_digits, caplog):
    train, val = flat_digits
    spy = LrSpy()
    # min_delta so large that nothing counts as an improvement: reduces after epochs 2 and 3
    plateau = ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1, min_delta=100.0)
    with caplog.at_level(logging.INFO, logger="netgraft.train"):
        history = fit(
            make_mlp(),
            train,
            val,
            epochs=4,
            lr=1e-2,
            lr_mult=10,
            seed=0,
            quiet=True,
            callbacks=[plateau, spy],
        )
    assert plateau.reductions == 3
    lines = [r.getMessage() for r in caplog.records if "epoch " in r.getMessage()]
    assert len(lines) == 4
    for row, line in zip(history, lines, strict=True):
        assert row["lr"] == spy.per_epoch[row["epoch"]]
        assert format_lrs(spy.per_epoch[row["epoch"]]) in line
    tops = [row["lr"]["5"] for row in history]
    assert tops == [1e-2, 1e-2, 5e-3, 2.5e-3]


def test_early_stopping_ends_the_run(flat_digits):
    train, val = flat_digits
    stop = EarlyStopping(monitor="val_loss", patience=1, min_delta=100.0)
    history = fit(make_mlp(), train, val, epochs=10, lr=1e-2, seed=0, quiet=True, callbacks=[stop])
    assert len(history) == 2 and stop.stopped_epoch == 2


def test_frozen_parameters_get_no_momentum_or_weight_decay_update_after_freezing(flat_digits):
    train, _ = flat_digits
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    fit(model, train, epochs=1, optimizer=opt, seed=0, quiet=True)
    # momentum buffers and the last gradients are set: a naive step would still move them
    assert model[0].weight.grad is not None and opt.state[model[0].weight]
    netgraft.freeze(model, "0")
    before = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    top_before = model[5].weight.detach().clone()
    fit(model, train, epochs=1, optimizer=opt, seed=1, quiet=True)
    assert torch.equal(model[0].weight, before[0]) and torch.equal(model[0].bias, before[1])
    assert not torch.equal(model[5].weight, top_before)


def test_same_seed_gives_bit_identical_runs(flat_digits):
    train, val = flat_digits
    a, b = make_mlp(), make_mlp()
    ha = fit(a, train, val, epochs=2, lr=1e-2, seed=3, quiet=True)
    hb = fit(b, train, val, epochs=2, lr=1e-2, seed=3, quiet=True)
    assert ha["loss"] == hb["loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_resume_without_checkpoint_is_a_clear_error(flat_digits, tmp_path):
    train, _ = flat_digits
    with pytest.raises(NetgraftError, match="no checkpoint to resume from"):
        fit(make_mlp(), train, epochs=1, lr=1e-2, resume=tmp_path, quiet=True)


def test_checkpoint_holds_training_state_and_best_tracks_monitor(flat_digits, tmp_path):
    train, val = flat_digits
    model = make_mlp()
    netgraft.freeze(model, "0")
    ckpt = Checkpoint(tmp_path, monitor="val_acc", save_best_only=False)
    history = fit(model, train, val, epochs=2, lr=1e-2, seed=0, quiet=True, callbacks=[ckpt])
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert payload["epoch"] == 2 and payload["step"] == 0
    assert payload["frozen"]["frozen_params"] == ["0.weight", "0.bias"]
    assert {"torch", "numpy", "python"} <= set(payload["rng"])
    assert payload["optimizer"]["state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "epoch_001.pt",
        "epoch_002.pt",
        "last.pt",
    ]
    assert ckpt.best == max(history["val_acc"])


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from netgraft.data import load_digits
    from netgraft.train import Callback, Checkpoint, ReduceLROnPlateau, fit
    sys.path.insert(0, {tests!r})
    from test_train import make_mlp, run_args

    class Beat(Callback):
        def on_batch_end(self, state):
            print(state.global_step, flush=True)
            time.sleep(0.03)

    model = make_mlp()
    fit(model, **run_args({folder!r}, [Beat()]))
    print("finished", flush=True)
    """
)


def run_args(folder, extra=()):
    from netgraft.data import load_digits

    x, y = load_digits()
    x = x.flatten(1)
    return dict(
        train=(x[:400], y[:400]),
        val=(x[1500:1700], y[1500:1700]),
        epochs=3,
        lr=0.05,
        optimizer="sgd",
        scheduler="cosine",
        weight_decay=1e-3,
        batch_size=32,
        seed=7,
        quiet=True,
        callbacks=[
            *extra,
            ReduceLROnPlateau(monitor="val_loss", patience=1, min_delta=100.0),
            Checkpoint(folder, every_steps=3),
        ],
    )


def _complete_checkpoints(folder: Path) -> list[str]:
    """Load every file under a final name; a partial one would fail to load."""
    names = []
    for path in folder.glob("*.pt"):
        try:
            payload = torch.load(path, weights_only=True)
        except FileNotFoundError:
            continue  # replaced between listing and opening
        assert payload["format"] == "netgraft-checkpoint/1", path
        names.append(path.name)
    return names


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_weights_and_metrics(tmp_path):
    folder = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), folder=str(folder)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    steps_per_epoch = 13
    target = steps_per_epoch + 6  # inside the second epoch
    try:
        for line in child.stdout:
            if folder.is_dir():
                _complete_checkpoints(folder)
            if line.strip().isdigit() and int(line) >= target:
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    assert "last.pt" in _complete_checkpoints(folder)
    saved = torch.load(folder / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and 0 < saved["step"] < steps_per_epoch  # killed mid-epoch

    reference = make_mlp()
    ref_history = fit(reference, **run_args(tmp_path / "reference"))
    resumed = make_mlp()
    history = fit(resumed, **run_args(folder), resume=folder)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    drop_time = [{k: v for k, v in row.items() if k != "time"} for row in history]
    assert drop_time == [{k: v for k, v in row.items() if k != "time"} for row in ref_history]
    assert not list(folder.glob(".*.tmp"))  # the resumed run cleared what the kill left


def test_atomic_write_never_leaves_partial_file_under_final_name(tmp_path):
    from netgraft.atomic import atomic_write

    target = tmp_path / "last.pt"
    atomic_write(target, lambda p: p.write_bytes(b"complete"))

    def crash(path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_fit_logs_one_line_per_epoch_with_progress_disabled_when_quiet(flat_digits, capsys):
    train, val = flat_digits
    fit(make_mlp(), train, val, epochs=1, lr=1e-2, seed=0, quiet=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    fit(make_mlp(), train, val, epochs=1, lr=1e-2, seed=0)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "val_acc" in err and "lr " in err


@pytest.mark.parametrize("steps", [1, 3, 4, 5])
def test_onecycle_schedule_runs_on_very_short_trainings(flat_digits, steps):
    (x, y), _ = flat_digits
    model = make_mlp()
    history = fit(
        model,
        (x[: 8 * steps], y[: 8 * steps]),
        epochs=1,
        lr=1e-2,
        batch_size=8,
        scheduler="onecycle",
        seed=0,
        quiet=True,
    )
    assert len(history) == 1 and history["loss"][0] > 0
