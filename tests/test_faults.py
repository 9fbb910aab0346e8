"""Faults at scale and the errors around them: torchrun restarting a killed rank, resume
from the checkpoint folder, mixed-precision state in checkpoints, and checkpoints that do
not fit the model.

The torchrun test launches ``tests/ddp_worker.py`` (scenario ``restart``) on two CPU
processes with gloo; models and data are float64 real digits, so the restarted run and the
uninterrupted one can be compared to 1e-6.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import netgraft
from netgraft.errors import NetgraftError
from netgraft.train.checkpoint import (
    checkpoint_payload,
    load_checkpoint,
    restore_training,
    save_checkpoint,
)

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker as worker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"
WORKER = Path(__file__).parent / "ddp_worker.py"


def _same(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=tol), name


def _torchrun(
    out: Path, *options: str, script: Path = WORKER, args: tuple = ("restart",), timeout: int = 400
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        # restarted ranks must not read the dead ones' addresses (pytorch/pytorch#167288)
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    for name in ("WORLD_SIZE", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", *options, str(script), str(out), *args]
    # a new session, so a timeout can end torchrun and every rank it started
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_torchrun_restarts_a_rank_killed_mid_write_and_ends_with_the_uninterrupted_weights(
    tmp_path,
):
    done = _torchrun(tmp_path, "--max-restarts", "1")
    assert done.returncode == 0, done.stderr[-4000:]
    model = worker.make_model()
    rows = netgraft.fit(model, worker.digits(), cache=False, **worker.fit_args()).rows
    for rank in (0, 1):
        result = torch.load(tmp_path / f"restart_rank{rank}.pt", weights_only=False)
        assert result["attempt"] == 1  # the first attempt died, torchrun restarted both
        _same(result["state"], model.state_dict())
        assert [r["loss"] for r in result["history"]] == pytest.approx([r["loss"] for r in rows])
    found = torch.load(tmp_path / "restart_rank0.pt", weights_only=False)
    # the kill landed during the second write: its temporary file was left, never last.pt
    assert "last.pt" in found["found"] and any(n.endswith(".tmp") for n in found["found"])
    assert found["found_step"] == worker.CRASH_STEP
    assert not list((tmp_path / "restart_ckpt").glob(".*.tmp"))  # the restart cleaned it


def _fit(model, folder=None, resume=None, epochs=2, **extra):
    callbacks = [netgraft.Checkpoint(folder, monitor="loss", mode="min")] if folder else []
    args = {**worker.fit_args(), "epochs": epochs, **extra}
    return netgraft.fit(
        model, worker.digits(), cache=False, callbacks=callbacks, resume=resume, **args
    )


def test_resume_auto_starts_afresh_then_continues_from_the_checkpoint_folder(tmp_path):
    whole = worker.make_model()
    rows = _fit(whole).rows
    first = worker.make_model()
    assert len(_fit(first, tmp_path, resume="auto", epochs=1).rows) == 1  # nothing to resume
    again = worker.make_model()
    history = _fit(again, tmp_path, resume="auto")
    _same(again.state_dict(), whole.state_dict(), 1e-9)
    assert [r["loss"] for r in history.rows] == pytest.approx([r["loss"] for r in rows])
    with pytest.raises(NetgraftError, match=r"resume='auto'.*Checkpoint\(out_dir\)"):
        _fit(worker.make_model(), resume="auto")


def test_max_restarts_without_a_checkpoint_to_continue_from_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    model = worker.make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NetgraftError, match=r"--max-restarts.*callbacks=\[netgraft.Checkpoint"):
        _fit(model)
    with pytest.raises(
        NetgraftError, match=r"--max-restarts.*pass run=RunOptions\(resume='auto'\)"
    ):
        _fit(model, tmp_path)
    _same(model.state_dict(), before, 0)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    _fit(model, epochs=1)  # torchrun without restarts needs neither


def test_a_checkpoint_of_another_model_is_one_error_naming_the_fix(tmp_path):
    _fit(worker.make_model(), tmp_path, epochs=1)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    with pytest.raises(
        NetgraftError, match=r"another model \(unexpected: 3.weight.*new Checkpoint"
    ):
        _fit(other, tmp_path, resume="auto")
    wider = torch.nn.Sequential(*list(worker.make_model())[:-1], torch.nn.Linear(32, 7)).double()
    with pytest.raises(NetgraftError, match=r"shape: 5.weight \(10, 32\) in the checkpoint"):
        _fit(wider, tmp_path, resume=tmp_path)


class _Stop(netgraft.train.Callback):
    def on_epoch_end(self, state):
        state.stop_training = state.epoch == 0


def test_bf16_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path):
    whole = worker.make_model().float()
    args = {"precision": "bf16", "device": "cpu", "epochs": 2}
    data = tuple(t for t in worker.digits().tensors)
    rows = netgraft.fit(whole, (data[0].float(), data[1]), cache=False,
                        **{**worker.fit_args(), **args}).rows  # fmt: skip
    stopped = worker.make_model().float()
    save = netgraft.Checkpoint(tmp_path, monitor="loss", mode="min")
    netgraft.fit(stopped, (data[0].float(), data[1]), cache=False, callbacks=[save, _Stop()],
                 **{**worker.fit_args(), **args})  # fmt: skip
    assert load_checkpoint(tmp_path)["scaler"] is None  # bf16 needs no loss scaling
    resumed = worker.make_model().float()
    save = netgraft.Checkpoint(tmp_path, monitor="loss", mode="min")
    history = netgraft.fit(resumed, (data[0].float(), data[1]), cache=False, callbacks=[save],
                           resume="auto", **{**worker.fit_args(), **args})  # fmt: skip
    _same(resumed.state_dict(), whole.state_dict(), 0)
    assert [r["loss"] for r in history.rows] == [r["loss"] for r in rows]


def test_the_gradient_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    """fp16 needs a GPU; the loss scaler's state is the same object on the CPU: a real
    torch.amp.GradScaler stepped on real digits, saved with the training state and restored
    into a fresh one."""
    model = worker.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    x, y = worker.digits().tensors
    for start in range(0, 320, 64):
        loss = torch.nn.functional.cross_entropy(
            model(x[start : start + 64]), y[start : start + 64]
        )
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 2.0**12  # grown twice: the state is not the initial one
    state = netgraft.train.TrainState(
        model, opt, None, netgraft.train.History(), 1, 0, [], lambda _: None, scaler=scaler
    )
    save_checkpoint(tmp_path / "last.pt", checkpoint_payload(state))
    fresh = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2)
    state.scaler = fresh
    restore_training(load_checkpoint(tmp_path), state)
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 2.0**12


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_lightning_ddp_gradual_finetune_resumed_mid_schedule_equals_uninterrupted(tmp_path):
    """Lightning's DDP on two CPU processes (gloo) with FineTune(unfreeze="gradual"): the
    same trainable set on each process every epoch, and a run stopped after epoch 2 and
    resumed from last.ckpt ends with the uninterrupted weights; plain ddp is refused."""
    pytest.importorskip("lightning")
    script = Path(__file__).parent / "lightning_ddp_worker.py"
    done = _torchrun(tmp_path, script=script, args=["ddp_find_unused_parameters_true"])
    assert done.returncode == 0, done.stderr[-4000:]
    runs = {
        name: [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        for name in ("whole", "stop", "resume")
    }
    for ranks in runs.values():
        assert ranks[0]["trainable"] == ranks[1]["trainable"]
    whole = runs["whole"][0]
    assert [len(names) for names in whole["trainable"].values()] == [2, 4, 6, 6]  # gradual
    assert runs["stop"][0]["trainable"] == {e: whole["trainable"][e] for e in (0, 1)}
    assert runs["resume"][0]["trainable"] == {e: whole["trainable"][e] for e in (2, 3)}
    for rank in (0, 1):
        _same(runs["resume"][rank]["state"], whole["state"])
        _same(runs["whole"][rank]["state"], whole["state"], 0)
    for rank in (0, 1):
        error = torch.load(tmp_path / f"refused_rank{rank}.pt", weights_only=False)["error"]
        assert "strategy='ddp_find_unused_parameters_true'" in error


def test_restarts_with_torchruns_shared_store_warn_how_to_connect_again(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    caplog.set_level("WARNING", logger="netgraft.train")
    _fit(worker.make_model(), tmp_path, resume="auto", epochs=1)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text
