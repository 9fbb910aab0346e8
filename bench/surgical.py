"""Benchmark: which block to tune — ``netgraft.suggest`` (relative gradient norms, no
training) against a ``"surgical"`` ``netgraft.study`` (tune each block alone, 3 seeds).

Three shifts of scikit-learn's real 8×8 digits (:func:`netgraft.experiments.auxiliary.
shift_experiment`): input-level ``inverted`` (1 - x) and ``noisy`` (Gaussian noise, std 0.5)
images with the same labels, and output-level ``new-labels`` (a source trained on digits
0–4, target digits 5–9). For each: the suggestion's ranking (with and without the head),
the surgical study's ranking by accuracy, and whether the first blocks agree. Writes
``bench/results/surgical.json`` (``surgical-quick.json`` with ``--quick``) and prints it.
The CPU is shared, so the seconds are indicative only.
Run: ``nice -n 15 .venv/bin/python bench/surgical.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from netgraft.atomic import atomic_write
from netgraft.experiments.auxiliary import SHIFTS, shift_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two seeds, 10 epochs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models on a shared CPU
    options = {"seeds": 2, "epochs": 10} if args.quick else {}
    report: dict = {"quick": args.quick, "shifts": []}
    for kind in SHIFTS:
        started = time.perf_counter()
        result = shift_experiment(kind, **options)
        result["seconds"] = round(time.perf_counter() - started, 1)
        print(f"{kind}: suggest {result['suggest_ranking']} (without head "
              f"{result['suggest_ranking_without_head']}), surgical {result['surgical_ranking']}",
              file=sys.stderr, flush=True)  # fmt: skip
        report["shifts"].append(result)
    text = json.dumps(report, indent=2)
    path = args.out / ("surgical-quick.json" if args.quick else "surgical.json")
    atomic_write(path, lambda p: p.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
