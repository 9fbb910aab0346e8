"""Benchmark: a frozen-mode study over every block with the shared frozen pass against one
pass per trial.

Two tasks: the demo's (its CNN trained on MNIST digits 0–4, reused for 5–9; blocks
``features.conv1``, ``features.conv2``) and ImageNet MobileNetV2 (torchvision's weights,
:func:`netgraft.data.mobilenet_v2_weights_path`) reused for scikit-learn's real digits at
32×32 RGB (every block before the classifier, 18 of them). For each task it times
``netgraft.study(..., modes=("frozen",))`` over every block with ``shared_pass=True`` and
with ``shared_pass=False`` (the K·S trials each run their own frozen pass), side by side in
one process, and checks both give the same rows. It measures B, one frozen forward pass of
the source over the training and validation data, and E·H, the mean time of a trial in the
shared run (training E epochs on stored features and the validation score), and reports
the ideal speedup (K·S·(B+E·H)) / (B + K·S·E·H) and the measured speedup as a fraction of
it. One pass per trial runs only the prefix up to each cut (cheaper than B for small k), so
the ideal of the formula is an upper bound.

The CPU is shared with other work: absolute times are noisy, the ratios are measured side
by side in the same run. Prints JSON and writes it to bench/results/study[-quick].json.
Run: ``nice -n 15 python bench/study.py [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import netgraft
from netgraft.data import load_digits, load_mnist5k, mobilenet_v2_weights_path
from netgraft.demo import demo_model, split_digits

RESULTS = Path(__file__).parent / "results"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def demo_task(quick: bool):
    """The demo's source (digits 0–4) and a target of digits 5–9 from its pools."""
    x, y = load_mnist5k()
    split = split_digits(x, y, pool_per_class=300, test_per_class=200)
    torch.manual_seed(0)
    source = demo_model()
    netgraft.fit(source, split.source, epochs=1 if quick else 3, lr=1e-3, batch_size=64,
                 seed=0, run=netgraft.RunOptions(progress=False, cache=False))  # fmt: skip
    train = split.sample(20 if quick else 100, seed=0)
    n_val = 60 if quick else 200
    val = (split.test[0].view(5, 200, 1, 28, 28)[:, :n_val].reshape(-1, 1, 28, 28),
           split.test[1].view(5, 200)[:, :n_val].reshape(-1))  # fmt: skip
    return source, train, val


def mobilenet_task(quick: bool):
    """ImageNet MobileNetV2 and digits 0–9 at 32×32 RGB, normalised as ImageNet expects."""
    source = torchvision.models.mobilenet_v2()
    source.load_state_dict(torch.load(mobilenet_v2_weights_path(), weights_only=True))
    x, y = load_digits()
    x = nn.functional.interpolate(x, size=32, mode="bilinear").repeat(1, 3, 1, 1)
    mean, std = (
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    )
    x = (x - mean) / std
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_train, n_val = (100, 100) if quick else (300, 300)
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    return source, (x[tr], y[tr]), (x[va], y[va])


def frozen_pass_seconds(model: nn.Module, datasets, repeats: int = 2) -> float:
    """B: the best of ``repeats`` eval-mode forward passes over the data in batches of 64."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.no_grad():
            model.eval()
            for x, _ in datasets:
                for i in range(0, len(x), 64):
                    model(x[i : i + 64])
        best = min(best, time.perf_counter() - started)
    model.train()
    return best


class _PassLog(logging.Handler):
    """Keeps the shared pass's timings from its log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.timings: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"pass\(es\), ([\d.]+)s \(finding the cut points ([\d.]+)s\)",
                          record.getMessage())  # fmt: skip
        if found:
            self.timings = {"pass_s": float(found[1]), "finding_cuts_s": float(found[2])}


def run_study(source, train, val, shared: bool, seeds: int, epochs: int):
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        result = netgraft.study(
            source, train, val, modes=("frozen",), baseline=False, seeds=seeds,
            budget={"epochs": epochs, "lr": 1e-3, "batch_size": 32},
            run=netgraft.RunOptions(shared_pass=shared, cache_dir=cache_dir, progress=False),
        )  # fmt: skip
        return time.perf_counter() - started, result


def bench_task(name: str, task, seeds: int, epochs: int) -> dict:
    source, train, val = task
    per_trial_s, per_trial = run_study(source, train, val, False, seeds, epochs)
    catcher = _PassLog()
    logger = logging.getLogger("netgraft.study")
    logger.addHandler(catcher)
    logger.setLevel(logging.INFO)
    try:
        shared_s, shared = run_study(source, train, val, True, seeds, epochs)
    finally:
        logger.removeHandler(catcher)
    b = frozen_pass_seconds(source, [train, val])
    trials = len(shared.rows) * seeds
    eh = sum(r["seconds"] for r in shared.rows) / len(shared.rows)  # E·H: one trial's own work
    ideal = trials * (b + eh) / (b + trials * eh)
    measured = per_trial_s / shared_s
    same = [{k: v for k, v in r.items() if k != "seconds"} for r in shared.rows] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in per_trial.rows
    ]
    return {
        "task": name,
        "blocks_K": len(shared.rows),
        "seeds_S": seeds,
        "epochs_E": epochs,
        "train_examples": len(train[0]),
        "val_examples": len(val[0]),
        "wall_one_pass_per_trial_s": round(per_trial_s, 2),
        "wall_shared_pass_s": round(shared_s, 2),
        "B_frozen_pass_s": round(b, 3),
        "shared_pass_s": catcher.timings.get("pass_s"),
        "shared_pass_finding_cuts_s": catcher.timings.get("finding_cuts_s"),
        "EH_trial_s": round(eh, 3),
        "measured_speedup": round(measured, 3),
        "ideal_speedup": round(ideal, 3),
        "fraction_of_ideal": round(measured / ideal, 3),
        "same_rows": same,
        "best_k": shared.recommended["k"] if shared.recommended else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, seeds and epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds, epochs = (1, 1) if args.quick else (2, 2)
    report = {
        "bench": "study: shared frozen pass vs one pass per trial",
        "quick": args.quick,
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "note": "CPU shared with other work: ratios are measured side by side in one run",
        "tasks": [
            bench_task("demo CNN, MNIST 0-4 -> 5-9", demo_task(args.quick), seeds, epochs),
            bench_task(
                "MobileNetV2 ImageNet -> digits 32x32", mobilenet_task(args.quick), seeds, epochs
            ),
        ],
    }
    text = json.dumps(report, indent=2)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"study{'-quick' if args.quick else ''}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
