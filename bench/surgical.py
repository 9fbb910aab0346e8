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
from reuse_experiments import SHIFTS, shift_experiment

from netgraft.atomic import atomic_write

BLOCKS = ("conv1", "conv2", "dense", "head")


def _markdown(shifts: list[dict]) -> str:
    """One row per shift: source accuracy, each block tuned alone, all blocks (one rate,
    AutoRGN), the block suggest ranks first and whether it is the surgical study's best."""
    head = ("| shift | source | " + " | ".join(f"only {b}" for b in BLOCKS)
            + " | all blocks | all, AutoRGN | suggest first (w/o head) | surgical best | agree |")  # fmt: skip
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in shifts:
        cell = lambda row: f"{row['acc_mean']:.3f} ± {row['acc_std']:.3f}"  # noqa: E731
        alone = {row["reused_up_to"]: cell(row) for row in r["surgical_rows"]}
        whole = [cell(row) for row in r["whole_model_rows"]]
        lines.append(
            f"| {r['shift']} | {r['source_acc_on_target']:.3f} | "
            + " | ".join(alone[b] for b in BLOCKS)
            + f" | {whole[0]} | {whole[1]} | {r['suggest_ranking'][0]} "
            f"({r['suggest_ranking_without_head'][0]}) | {r['surgical_ranking'][0]} | "
            f"{'yes' if r['agree'] else 'no'} ({'yes' if r['agree_without_head'] else 'no'}) |"
        )
    return "\n".join(lines)


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
    report["table"] = _markdown(report["shifts"])
    print(report["table"], file=sys.stderr)
    text = json.dumps(report, indent=2)
    path = args.out / ("surgical-quick.json" if args.quick else "surgical.json")
    atomic_write(path, lambda p: p.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
