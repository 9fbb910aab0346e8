"""The study at scale on real digits: the shared frozen pass, trials in worker processes and
on Ray, a killed study resumed, and the errors a user can cause before any trial runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import netgraft
from netgraft import NetgraftError, study
from test_study import build  # the small digits CNN; worker scripts import it from here

STUDY = {"reuse": [1, 3], "modes": ("frozen", "surgical"), "seeds": 1, "budget": 2, "threads": 1}


@pytest.fixture(scope="module")
def task(digits):
    """A source trained on digits 0–4; 5–9 as the target: 60 training images, 300 for
    validation."""
    x, y = digits
    src = y < 5
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    source = build()
    netgraft.fit(source, (x[src], y[src]), epochs=2, lr=3e-3, batch_size=64, seed=0, quiet=True)
    torch.set_num_threads(before)
    tx, ty = x[~src], y[~src] - 5
    perm = torch.randperm(len(tx), generator=torch.Generator().manual_seed(0))
    return source, (tx[perm[:60]], ty[perm[:60]]), (tx[perm[300:600]], ty[perm[300:600]])


@pytest.fixture(scope="module")
def serial(task):
    source, train, val = task
    return study(source, train, val, quiet=True, **STUDY)


def same(rows: list[dict]) -> list[dict]:
    """Rows without their seconds (wall time differs between runs)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_the_shared_frozen_pass_gives_the_rows_of_one_pass_per_trial(task, serial, caplog):
    source, train, val = task
    caplog.set_level("INFO", logger="netgraft")
    alone = study(source, train, val, quiet=True, shared_pass=False, **STUDY)
    assert same(alone.rows) == same(serial.rows)
    assert [(r["model"], r["mode"], r["k"]) for r in serial.rows] == [
        ("scratch", "scratch", 0),
        ("source", "frozen", 1),
        ("source", "frozen", 3),
        ("source", "surgical", 1),
        ("source", "surgical", 3),
    ]
    assert serial.trials_run == 5 and serial.trials_reused == 0
    # the run above used one pass per trial: no shared pass was logged
    assert not any("shared frozen pass" in r.getMessage() for r in caplog.records)
    caplog.clear()
    study(source, train, val, quiet=True, **STUDY)
    logged = [r.getMessage() for r in caplog.records]
    # three cut points (frozen k=1 and k=3, surgical k=3 tuning fc1 behind frozen conv1 and
    # conv2; surgical k=1 has no frozen prefix), captured in one pass over train and one
    # over val
    assert "shared frozen pass: 3 cut point(s) for 3 setting(s) in 2 pass(es)" in "".join(logged)
    assert any("surgical k=1 runs its own pass" in m for m in logged)
    # each of those trials read its train and val features from the pass's stores, found
    # under the feature cache's own key
    assert sum(m.startswith("feature cache reused") for m in logged) == 6


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_worker_processes_give_the_serial_rows(task, serial):
    source, train, val = task
    parallel = study(source, train, val, quiet=True, workers=2, **STUDY)
    assert same(parallel.rows) == same(serial.rows)
    assert parallel.recommended == serial.recommended


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_tasks_on_a_local_two_cpu_ray_give_the_serial_rows(task, serial):
    ray = pytest.importorskip("ray")
    source, train, val = task
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = study(source, train, val, quiet=True, backend="ray", **STUDY)
    finally:
        ray.shutdown()
    assert same(on_ray.rows) == same(serial.rows)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_ray_cluster_losing_a_node_after_the_first_trial_gives_the_serial_rows(
    task, serial, tmp_path
):
    """A head (no CPUs) and two one-CPU worker nodes, each with its own temporary folder;
    the first worker node is removed (its processes killed) once the first trial is in."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    source, train, val = task
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = []
        for i in (0, 1):
            (tmp_path / f"node{i}").mkdir()
            env = {"TMPDIR": str(tmp_path / f"node{i}")}
            nodes.append(cluster.add_node(num_cpus=1, env_vars=env))
        cluster.wait_for_nodes()
        lines = []

        def lose_a_node(line):
            lines.append(line)
            if len(lines) == 1:
                cluster.remove_node(nodes[0], allow_graceful=False)

        on_ray = study(source, train, val, quiet=True, backend="ray", progress=lose_a_node,
                       ray_address=cluster.address, out_dir=tmp_path / "out", **STUDY)  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert same(on_ray.rows) == same(serial.rows)
    assert on_ray.trials_run == 5 and len(lines) == 5  # every trial counted once
    assert len(list((tmp_path / "out").glob("trials/*/*.json"))) == 5
    # the surviving node read the shared pass from its own folder, filled from Ray's object
    # store (the driver's features folder is not where its trials looked)
    copies = list((tmp_path / "node1").glob("netgraft-ray-features/*/*/manifest.json"))
    assert len(copies) == 6  # three cut points, train and val


_KILLED_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_study_scale import STUDY, build
import netgraft
torch.set_num_threads(1)
source = build()
source.load_state_dict(torch.load({weights!r}))
train, val = torch.load({data!r})
netgraft.study(source, train, val, out_dir={out!r}, quiet=True, **STUDY)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_study_resumes_running_only_the_missing_trials(task, serial, tmp_path):
    source, train, val = task
    torch.save(source.state_dict(), tmp_path / "source.pt")
    torch.save((train, val), tmp_path / "data.pt")
    out = tmp_path / "out"
    script = _KILLED_RUN.format(
        tests=str(Path(__file__).parent),
        weights=str(tmp_path / "source.pt"),
        data=str(tmp_path / "data.pt"),
        out=str(out),
    )
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])
    deadline = time.monotonic() + 240
    try:
        while len(list(out.glob("trials/*/*.json"))) < 2:
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline, "no trial was written in time"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    written = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*.json")}
    assert 2 <= len(written) < 5
    assert not (out / "study.json").exists()
    for path in written:  # every file under its final name is a whole trial
        assert {"key", "trial", "acc", "trained_params", "seconds"} <= set(
            json.loads(path.read_text())
        )

    resumed = study(source, train, val, out_dir=out, quiet=True, **STUDY)
    assert resumed.trials_reused == len(written)
    assert resumed.trials_run == 5 - len(written)
    assert same(resumed.rows) == same(serial.rows)
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # not run again
    assert json.loads((out / "study.json").read_text())["rows"] == resumed.rows

    # another budget is another study: nothing is mixed in from the first
    other = study(source, train, val, out_dir=out, quiet=True, **{**STUDY, "budget": 1})
    assert other.trials_reused == 0 and other.trials_run == 5
    assert len(list(out.glob("trials/*"))) == 2


def test_ray_missing_is_one_clear_error_before_any_trial(task, monkeypatch):
    source, train, val = task
    ran = []
    monkeypatch.setattr(
        sys.modules["netgraft.study.core"], "run_trials", lambda *a, **k: ran.append(a)
    )
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    with pytest.raises(NetgraftError, match=r"needs Ray.*pip install 'netgraft\[ray\]'"):
        study(source, train, val, backend="ray", **STUDY)
    assert not ran


def test_an_unreachable_ray_address_is_one_clear_error_before_any_trial(task, monkeypatch):
    pytest.importorskip("ray")
    source, train, val = task
    ran = []
    monkeypatch.setattr(
        sys.modules["netgraft.study.core"], "run_trials", lambda *a, **k: ran.append(a)
    )
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(NetgraftError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:9'"):
        study(source, train, val, backend="ray", ray_address="127.0.0.1:9", **STUDY)
    assert not ran
    with pytest.raises(NetgraftError, match="backend must be one of local, ray"):
        study(source, train, val, backend="dask", **STUDY)
    with pytest.raises(NetgraftError, match="workers must be a positive integer"):
        study(source, train, val, workers=0, **STUDY)


def test_cli_study_with_ray_at_an_unreachable_address_fails_in_one_line(task, tmp_path, cli):
    pytest.importorskip("ray")
    from PIL import Image
    from safetensors.torch import save_file

    source, (x, y), _ = task
    for i, (img, label) in enumerate(zip(x[:20], y[:20], strict=True)):
        folder = tmp_path / "digits" / f"digit{int(label) + 5}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img[0] * 255).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    code_file = tmp_path / "net.py"
    code_file.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                         "from test_study_scale import build\n")  # fmt: skip
    weights = tmp_path / "source.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    out = tmp_path / "out"
    code, _, err = cli(
        "study", f"{code_file}:build", "--weights", str(weights), "--data",
        str(tmp_path / "digits"), "--size", "8", "--out", str(out), "--ray", "127.0.0.1:9",
        "--workers", "2",
    )  # fmt: skip
    assert code == 1
    assert "cannot reach the Ray cluster at '127.0.0.1:9'" in err and "Traceback" not in err
    assert not (out / "trials").exists()


class _Locked:
    """A loss holding a lock: no process can receive it."""

    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, out, y):
        return nn.functional.cross_entropy(out, y)


def test_workers_with_a_budget_that_cannot_be_sent_fail_before_any_trial(task, monkeypatch):
    source, train, val = task
    ran = []
    runners = sys.modules["netgraft.study.runners"]
    monkeypatch.setattr(runners, "ProcessPoolExecutor", lambda *a, **k: ran.append(a))
    budget = {"epochs": 1, "loss": _Locked()}
    with pytest.raises(NetgraftError, match="workers=2 .* cannot be serialised.*lock"):
        study(source, train, val, workers=2, **{**STUDY, "budget": budget})
    assert not ran


# A whole user script: the model class, the loss and the data live in __main__, which a
# spawned worker could not re-import when the script comes from stdin or -c
_MAIN_SCRIPT = """
import json, torch
from torch import nn
import netgraft

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.mid(self.body(x)))

torch.set_num_threads(1)
x, y = netgraft.data.load_digits()
torch.manual_seed(0)
source = Net()
budget = {"epochs": 1, "batch_size": 32, "loss": lambda out, t: nn.functional.cross_entropy(out, t)}
train, val = (x[:120], y[:120] % 5), (x[120:300], y[120:300] % 5)
args = dict(reuse=[1], modes=("frozen", "fine-tuned"), seeds=1, budget=budget, threads=1,
            quiet=True, baseline=False)
serial = netgraft.study(source, train, val, **args)
pooled = netgraft.study(source, train, val, workers=2, **args)
print("ROWS", json.dumps([serial.rows, pooled.rows]))
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_workers_from_stdin_or_c_with_a_main_model_class_give_the_serial_rows(how):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    command = [sys.executable, "-"] if how == "stdin" else [sys.executable, "-c", _MAIN_SCRIPT]
    done = subprocess.run(
        command, input=_MAIN_SCRIPT if how == "stdin" else None, env=env, capture_output=True,
        text=True, timeout=220,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(li for li in done.stdout.splitlines() if li.startswith("ROWS "))
    serial, pooled = json.loads(line[5:])
    assert len(serial) == 2 and same(pooled) == same(serial)
