"""fit on two processes (torchrun, gloo on the CPU) against one process over the same
global batches; checkpoints written by one rank and resumed; mixed precision refusals.

Two launches of ``tests/ddp_worker.py`` serve every test: one runs the plain, cached and
crashing scenarios, the other resumes the crashed run. Models and data are float64 so
the comparison does not depend on the reduction order of threads or processes.
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
from netgraft.train import EpochSampler
from netgraft.train import distributed as dist_mod
from netgraft.train.distributed import share_bounds

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker as worker  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
N = 1797  # real digits
CACHED = ("cached", "cached_in_memory")


def _launch(out: Path, *scenarios: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(Path(__file__).parent / "ddp_worker.py"), str(out)]
    return subprocess.run(
        [*command, *scenarios], env=env, capture_output=True, text=True, timeout=180
    )


def _result(out: Path, scenario: str, rank: int) -> dict:
    return torch.load(out / f"{scenario}_rank{rank}.pt", weights_only=False)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-5), name


def _losses(rows: list[dict]) -> list[float]:
    return [row["loss"] for row in rows]


@pytest.fixture(scope="module")
def launched_runs(tmp_path_factory):
    """One two-process launch: the plain fit (also with micro-batches), with a frozen prefix,
    the cached ones (on disk, in memory), over a DataLoader, fine_tune, then a run that dies after its first checkpoint (so the launch
    itself fails, on purpose)."""
    out = tmp_path_factory.mktemp("ddp")
    scenarios = ["fit", "accumulate", "frozen", *CACHED, "loader", "fine_tune", "crash"]
    done = _launch(out, *scenarios)
    assert done.returncode != 0, "the crash scenario should have ended the launch"
    assert (out / "fine_tune_rank1.pt").is_file(), done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def one_process():
    """The plain fit on one process over the same global batches."""
    model = worker.make_model()
    history = netgraft.fit(model, worker.digits(), cache=False, **worker.fit_args())
    return model.state_dict(), history.rows


@pytest.mark.slow
def test_two_processes_each_train_on_their_half_of_every_global_batch(launched_runs):
    reads = [_result(launched_runs, "fit", r)["reads"] for r in (0, 1)]
    for epoch in range(worker.EPOCHS):
        sampler = EpochSampler(N, worker.SEED)
        sampler.set_epoch(epoch)
        order = sampler.order()
        for rank in (0, 1):
            expected = []
            for begin in range(0, N, worker.BATCH):
                batch = order[begin : begin + worker.BATCH]
                start, stop = share_bounds(len(batch), rank, 2)
                expected += batch[start:stop]
            assert reads[rank][epoch] == expected
        assert len(reads[0][epoch]) == 899 and len(reads[1][epoch]) == 898
        assert sorted(reads[0][epoch] + reads[1][epoch]) == list(range(N))


@pytest.mark.slow
def test_two_processes_end_with_the_weights_and_losses_of_one_process(launched_runs, one_process):
    weights, rows = one_process
    for rank, scenario in [(0, "fit"), (1, "fit"), (0, "accumulate"), (1, "accumulate")]:
        result = _result(launched_runs, scenario, rank)
        _assert_same_weights(result["state"], weights)
        assert _losses(result["history"]) == pytest.approx(_losses(rows), rel=1e-9)
        assert [r["acc"] for r in result["history"]] == pytest.approx([r["acc"] for r in rows])


@pytest.mark.slow
def test_frozen_parameters_are_never_all_reduced_and_train_like_one_process(launched_runs):
    model = worker.make_model(frozen_prefix=True)
    rows = netgraft.fit(model, worker.digits(), cache=False, **worker.fit_args()).rows
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    steps = -(-N // worker.BATCH) * worker.EPOCHS
    for rank in (0, 1):
        result = _result(launched_runs, "frozen", rank)
        _assert_same_weights(result["state"], model.state_dict())
        assert _losses(result["history"]) == pytest.approx(_losses(rows), rel=1e-9)
        # DDP's buckets hold the trainable gradients alone, once per step
        assert sum(result["allreduced_bytes"]) == trainable * steps


@pytest.mark.slow
def test_a_dataloader_and_fine_tune_on_two_processes_match_one_process(launched_runs):
    loader = torch.utils.data.DataLoader(worker.digits(), batch_size=worker.BATCH)
    model = worker.make_model()
    args = {k: v for k, v in worker.fit_args().items() if k != "batch_size"}
    rows = netgraft.fit(model, loader, cache=False, **args).rows
    tuned = worker.make_model()
    tuned_rows = netgraft.fine_tune(tuned, worker.digits(), **worker.fine_tune_args()).rows
    for rank in (0, 1):
        result = _result(launched_runs, "loader", rank)
        _assert_same_weights(result["state"], model.state_dict())
        assert _losses(result["history"]) == pytest.approx(_losses(rows), rel=1e-9)
        result = _result(launched_runs, "fine_tune", rank)
        _assert_same_weights(result["state"], tuned.state_dict())
        assert _losses(result["history"]) == pytest.approx(_losses(tuned_rows), rel=1e-9)
        # the same stages as one process: its search chose the same setting
        assert [r["stage"] for r in result["history"]] == [r["stage"] for r in tuned_rows]


@pytest.mark.slow
def test_cache_is_built_once_split_between_ranks_and_losses_match_one_process(launched_runs):
    model = worker.make_model(frozen_prefix=True)
    rows = []
    model[1].register_forward_hook(lambda m, i, o: rows.append(int(o.shape[0])))
    history = netgraft.fit(model, worker.digits(), cache="auto", **worker.fit_args())
    traced = sum(rows) - N  # rows the plan runs to trace the model, on every process
    results = [_result(launched_runs, scenario, r) for scenario in CACHED for r in (0, 1)]
    for index, result in enumerate(results):
        rank = index % 2
        start, stop = share_bounds(N, rank, 2)
        assert result["prefix_rows"] == stop - start + traced  # its half, no more
        assert _losses(result["history"]) == pytest.approx(_losses(history.rows), rel=1e-9)
        _assert_same_weights(result["state"], model.state_dict())
    stores = [p for p in (launched_runs / "cache").iterdir() if p.is_dir()]
    assert len(stores) == 1 and (stores[0] / "manifest.json").is_file()
    # the store the two processes wrote is the one a single process would have built
    prefix, _ = netgraft.cut(worker.make_model(frozen_prefix=True), at="2")
    again = netgraft.FeatureCache(
        prefix, worker.digits(), dir=launched_runs / "cache", cut_point="2"
    )
    assert again.status == "reused"


@pytest.mark.slow
def test_killed_after_first_checkpoint_then_resumed_on_two_processes_ends_uninterrupted(
    launched_runs, one_process
):
    saved = torch.load(launched_runs / "ckpt" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["world_size"]) == (0, worker.CRASH_STEP, 2)
    done = _launch(launched_runs, "resume")
    assert done.returncode == 0, done.stderr[-4000:]
    uninterrupted = _result(launched_runs, "fit", 0)
    for rank in (0, 1):
        resumed = _result(launched_runs, "resume", rank)
        _assert_same_weights(resumed["state"], uninterrupted["state"])
        assert _losses(resumed["history"]) == pytest.approx(_losses(uninterrupted["history"]))


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_one(launched_runs, one_process, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "last.pt").write_bytes((launched_runs / "ckpt" / "last.pt").read_bytes())
    model = worker.make_model()
    history = netgraft.fit(model, worker.digits(), cache=False, resume=folder, **worker.fit_args())
    weights, rows = one_process
    _assert_same_weights(model.state_dict(), weights)
    assert _losses(history.rows) == pytest.approx(_losses(rows))


def test_micro_batches_give_the_updates_of_whole_batches_in_one_process(one_process):
    model = worker.make_model()
    history = netgraft.fit(model, worker.digits(), cache=False, accumulate=3, **worker.fit_args())
    weights, rows = one_process
    _assert_same_weights(model.state_dict(), weights)
    assert _losses(history.rows) == pytest.approx(_losses(rows), rel=1e-9)
    with pytest.raises(NetgraftError, match="accumulate must be a positive integer"):
        netgraft.fit(model, worker.digits(), accumulate=0, **worker.fit_args())


def test_fp16_on_the_cpu_is_one_clear_error_before_training():
    model = worker.make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NetgraftError, match="fp16.*GPU"):
        netgraft.fit(model, worker.digits(), device="cpu", precision="fp16", **worker.fit_args())
    _assert_same_weights(model.state_dict(), before)


def test_bf16_where_the_device_cannot_run_it_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(dist_mod, "bf16_supported", lambda device: False)
    model = worker.make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NetgraftError, match="bf16.*bfloat16"):
        netgraft.fit(model, worker.digits(), device="cpu", precision="bf16", **worker.fit_args())
    _assert_same_weights(model.state_dict(), before)
    with pytest.raises(NetgraftError, match="precision must be"):
        netgraft.fit(model, worker.digits(), precision="int8", **worker.fit_args())


def test_bf16_on_the_cpu_trains_and_leaves_the_model_as_it_was():
    x, y = netgraft.data.load_digits()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    history = netgraft.fit(
        model, (x, y), device="cpu", precision="bf16", epochs=2, lr=1e-2, seed=0, quiet=True
    )
    assert history.rows[-1]["loss"] < history.rows[0]["loss"]
    assert "forward" not in model.__dict__  # Accelerate's autocast wrapper is removed
    assert model(x[:4]).dtype == torch.float32


def test_a_launch_without_accelerate_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NetgraftError, match=r"netgraft\[accelerate\]"):
        netgraft.fit(worker.make_model(), worker.digits(), **worker.fit_args())
