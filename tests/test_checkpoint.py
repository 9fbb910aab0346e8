"""The checkpoint module on its own: build a payload, write it, read it, restore it into
fresh objects; a run killed between saves resumes bit for bit; broken files are one
clear error. (fit's own resume through the Checkpoint callback is in test_train.py.)"""

from __future__ import annotations

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
from netgraft.data import load_digits
from netgraft.errors import NetgraftError
from netgraft.train import History, ReduceLROnPlateau, TrainState
from netgraft.train.checkpoint import (
    checkpoint_payload,
    load_checkpoint,
    restore_model,
    restore_training,
    save_checkpoint,
)
from netgraft.train.optimizers import make_optimizer, make_scheduler

SRC = Path(__file__).resolve().parents[1] / "src"
TOTAL_STEPS = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def make_state(model: nn.Module, callbacks: list | None = None) -> TrainState:
    """A training state over ``model``'s trainable parameters: SGD with momentum and weight
    decay (so the optimizer has state) and a cosine schedule."""
    opt = make_optimizer(model, "sgd", 0.05, None, None, 1e-3)
    sched = make_scheduler("cosine", opt, TOTAL_STEPS)
    return TrainState(
        model, opt, sched, History(), 1, 7, callbacks or [], lambda line: None, stage="test"
    )


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits()
    return x.flatten(1)[:400], y[:400]


def train_steps(state: TrainState, x: torch.Tensor, y: torch.Tensor, n: int, after=None) -> None:
    """``n`` optimizer steps on batches drawn from the global random stream (so a resumed
    run matches only if the random streams were restored too)."""
    state.model.train()
    for _ in range(n):
        idx = torch.randint(0, len(x), (16,))
        loss = nn.functional.cross_entropy(state.model(x[idx]), y[idx])
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.sums["loss"] = state.sums.get("loss", 0.0) + float(loss.detach())
        state.sums["n"] = state.sums.get("n", 0) + 16
        state.step += 1
        state.global_step += 1
        if after is not None:
            after(state)


def reference_run() -> nn.Module:
    model = make_model()
    netgraft.freeze(model, "0")
    torch.manual_seed(7)
    train_steps(make_state(model), *digits(), TOTAL_STEPS)
    return model


def assert_same_tensors(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_same_tensors(u, v)
    else:
        assert a == b


def test_payload_written_read_and_restored_gives_identical_state_in_fresh_objects(tmp_path):
    x, y = digits()
    model = make_model()
    netgraft.freeze(model, "0", bn="eval")
    plateau = ReduceLROnPlateau(patience=1)
    plateau.best, plateau.wait, plateau.reductions = 0.5, 1, 2
    state = make_state(model, [plateau])
    torch.manual_seed(3)
    train_steps(state, x, y, 9)
    state.history.append({"epoch": 1, "loss": 1.5, "lr": {"0": 0.05}, "time": 0.1})
    save_checkpoint(tmp_path / "last.pt", checkpoint_payload(state))
    next_draws = torch.rand(5)

    fresh = make_model()  # nothing frozen: the frozen state must come from the checkpoint
    payload = load_checkpoint(tmp_path)  # a folder reads its last.pt
    restore_model(payload, fresh)
    fresh_plateau = ReduceLROnPlateau(patience=1)
    resumed = make_state(fresh, [fresh_plateau])
    restore_training(payload, resumed)

    assert torch.equal(torch.rand(5), next_draws)
    assert_same_tensors(fresh.state_dict(), model.state_dict())
    assert [n for n, p in fresh.named_parameters() if not p.requires_grad] == ["0.weight", "0.bias"]
    assert_same_tensors(resumed.optimizer.state_dict(), state.optimizer.state_dict())
    assert resumed.scheduler.state_dict() == state.scheduler.state_dict()
    assert (resumed.epoch, resumed.step, resumed.global_step) == (0, 9, 9)
    assert resumed.sums == state.sums and resumed.history.rows == state.history.rows
    assert fresh_plateau.state_dict() == plateau.state_dict()


def test_payload_taken_at_epoch_end_points_at_the_next_epoch():
    state = make_state(make_model())
    state.epoch, state.step, state.global_step, state.sums = 2, 13, 39, {"loss": 4.0, "n": 8}
    state.epoch_done = True
    payload = checkpoint_payload(state)
    assert (payload["epoch"], payload["step"], payload["global_step"]) == (3, 0, 39)
    assert payload["sums"] == {}


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import netgraft
    from netgraft.train.checkpoint import checkpoint_payload, save_checkpoint
    from test_checkpoint import TOTAL_STEPS, digits, make_model, make_state, train_steps

    def save(state):
        save_checkpoint({path!r}, checkpoint_payload(state))
        print(state.global_step, flush=True)
        time.sleep(0.03)

    model = make_model()
    netgraft.freeze(model, "0")
    torch.manual_seed(7)
    train_steps(make_state(model), *digits(), TOTAL_STEPS, after=save)
    print("finished", flush=True)
    """
)


@pytest.mark.slow
def test_saved_then_killed_then_restored_run_matches_an_uninterrupted_one(tmp_path):
    path = tmp_path / "last.pt"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), path=str(path)))
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
    try:
        for line in child.stdout:
            if line.strip().isdigit() and int(line) >= 15:
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()

    payload = load_checkpoint(path)
    assert 15 <= payload["global_step"] < TOTAL_STEPS
    resumed = make_model()
    restore_model(payload, resumed)
    state = make_state(resumed)
    restore_training(payload, state)
    train_steps(state, *digits(), TOTAL_STEPS - state.global_step)
    reference = reference_run()
    assert_same_tensors(resumed.state_dict(), reference.state_dict())


def test_corrupt_truncated_or_foreign_files_are_one_clear_error(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, checkpoint_payload(make_state(make_model())))
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all" * 10)
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(NetgraftError, match="cannot read checkpoint"):
            load_checkpoint(tmp_path / name)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(NetgraftError, match="is not a netgraft checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": "netgraft-checkpoint/1", "model": {}}, tmp_path / "partial.pt")
    with pytest.raises(NetgraftError, match="incomplete: it lacks optimizer"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(NetgraftError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path / "missing")


def test_saving_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path):
    state = make_state(make_model())
    path = save_checkpoint(tmp_path / "last.pt", checkpoint_payload(state))
    state.global_step = 5
    save_checkpoint(path, checkpoint_payload(state))
    assert load_checkpoint(path)["global_step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
