"""Benchmark: which defaults of ``netgraft.fine_tune`` work without tuning, on three real tasks.

``fine_tune`` trains a new head first (``head_lr``), then unfreezes everything with rates
from ``base_lr / 2 / lr_mult`` (first block) to ``base_lr / 2`` (top); batch norms stay
frozen unless ``train_bn``. AdamW (fit's default), weight decay 0, batch 32 and the onecycle
schedule are fixed. The tasks:

- ``mobilenet_v2→digits``: torchvision's ImageNet MobileNetV2 (netgraft.data weights) on
  scikit-learn's real digits, upsampled to 3×64×64 (200 training images, 300 held out);
- ``mnist_cnn→5-9``: the demo's CNN trained on MNIST digits 0–4
  (:mod:`netgraft.demo`), new classifier, digits 5–9 from 30 images per class
  (150), tested on 500 held-out images;
- ``minilm→party``: the pretrained all-MiniLM-L6-v2 sequence classifier (2 labels) on
  64-word passages of the 2012 convention speeches (netgraft.data), 256 training and 128
  held-out passages, each half democrat, split by speech, max_length 64.

For every seed (3; it seeds the new head and the data order) it trains the head once per
``head_lr`` in ``HEAD_LRS``, then, from the head trained at ``--head-lr``, runs the unfreeze
stage once per ``(base_lr, lr_mult, train_bn)`` in ``CANDIDATES``: the two calls are
exactly one ``fine_tune`` call's stages (the second call gets ``seed + 1``, as fine_tune's
second stage does). It also runs head-only training for the same total epochs, and the old
defaults (head 1e-3, base 1e-3, lr_mult 100, batch norms trained). Each row reports
validation accuracy after the head stage and at the end (mean ± std over seeds, per-seed
values). ``choice`` is the candidate whose worst shortfall, over tasks, from the best
candidate's final accuracy on that task is smallest.

Prints JSON and writes it to ``bench/results/finetune_defaults.json`` after every task
(``--quick``: one seed, two candidates, ``finetune_defaults-quick.json``). Accuracies are
what this measures; times are noisy on a shared CPU. Run it niced on a shared machine:
``nice -n 15 python bench/finetune_defaults.py [--quick] [--tasks mobilenet_v2,mnist_cnn,minilm]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import Dataset

import netgraft
from netgraft.data import (
    load_digits,
    load_mnist5k,
    load_political_passages,
    minilm_path,
    mobilenet_v2_weights_path,
)
from netgraft.demo import DemoConfig, _reused, _train_source, split_digits
from netgraft.train.finetune import with_batch_norms

RESULTS = Path(__file__).parent / "results"
OLD = {"head_lr": 1e-3, "base_lr": 1e-3, "lr_mult": 100.0, "train_bn": True}
HEAD_LRS = (1e-3, 3e-3, 1e-2)
# base_lr at lr_mult 10, and lr_mult 100 at base_lr 3e-4, batch norms frozen;
# then the centre with batch norms trained, to show what training them does
CANDIDATES = (
    *({"base_lr": b, "lr_mult": 10.0, "train_bn": False} for b in (1e-4, 3e-4, 1e-3)),
    {"base_lr": 3e-4, "lr_mult": 100.0, "train_bn": False},
    {"base_lr": 3e-4, "lr_mult": 10.0, "train_bn": True},
)


@dataclass
class Task:
    """One real transfer task: ``make(seed)`` gives the source network with a new head
    (initialised by ``seed``); ``train``/``val`` are datasets or ``(x, y)`` tensors."""

    name: str
    make: Callable[[int], nn.Module]
    train: Any
    val: Any
    head: str | None
    head_epochs: int
    epochs: int
    batch_size: int = 32


def mobilenet_task(quick: bool) -> Task:
    """ImageNet MobileNetV2 → scikit-learn digits at 3×64×64, ImageNet-normalised."""
    x, y = load_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    x = F.interpolate(x, size=64, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    n_val = 200 if quick else 300
    state = torch.load(mobilenet_v2_weights_path(), weights_only=True)

    def make(seed: int) -> nn.Module:
        model = torchvision.models.mobilenet_v2()
        model.load_state_dict(state)
        torch.manual_seed(seed)
        model.classifier[1] = nn.Linear(1280, 10)
        return model

    return Task(
        "mobilenet_v2→digits", make, (x[:200], y[:200]), (x[200 : 200 + n_val], y[200 : 200 + n_val]),
        head=None, head_epochs=5, epochs=2,
    )  # fmt: skip


def mnist_cnn_task(quick: bool) -> Task:
    """The demo's CNN trained on MNIST digits 0–4 → digits 5–9 from 30 images per class."""
    config = DemoConfig(source_epochs=2 if quick else 5, test_per_class=100)
    split = split_digits(*load_mnist5k(), pool_per_class=300, test_per_class=100)
    source, source_acc = _train_source(split, config, lambda line: None)
    train = split.sample(30, seed=0)
    task = Task(
        "mnist_cnn→5-9", lambda seed: _reused(source, seed), train, split.test,
        head="classifier", head_epochs=6, epochs=6,
    )  # fmt: skip
    task.source_acc = round(source_acc, 4)
    return task


class _Encoded(Dataset):
    """Tokenised passages as Hugging Face style dicts with ``labels``."""

    def __init__(self, encoded: dict[str, torch.Tensor], labels: torch.Tensor):
        self.encoded, self.labels = encoded, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def _passages_by_speech(n_train: int, n_val: int, per_speech: int = 6) -> tuple[Any, list, list]:
    """Indices of training and held-out passages, half of each party on each side (so
    predicting one party scores 0.5), no speech on both sides, at most ``per_speech``
    passages of one speech, speeches in a fixed shuffled order."""
    p = load_political_passages(words=64)
    speeches = torch.randperm(
        int(p.documents.max()) + 1, generator=torch.Generator().manual_seed(0)
    )
    sides: dict[str, dict[int, list[int]]] = {"train": {0: [], 1: []}, "val": {0: [], 1: []}}
    quota = {"train": n_train // 2, "val": n_val // 2}
    for doc in speeches.tolist():
        picked = (p.documents == doc).nonzero().flatten()[:per_speech].tolist()
        label = int(p.labels[picked[0]])
        for side in ("train", "val"):
            room = quota[side] - len(sides[side][label])
            if room > 0:
                sides[side][label].extend(picked[:room])
                break
    train = sides["train"][0] + sides["train"][1]
    val = sides["val"][0] + sides["val"][1]
    return p, train, val


def minilm_task(quick: bool) -> Task:
    """Pretrained MiniLM (all-MiniLM-L6-v2) → democrat or republican speech passage."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    p, train, val = _passages_by_speech(256, 128)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def encode(idx: list[int]) -> _Encoded:
        enc = tokenizer([p.texts[i] for i in idx], max_length=64, truncation=True,
                        padding="max_length", return_tensors="pt")  # fmt: skip
        return _Encoded(dict(enc), p.labels[idx])

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)

    return Task("minilm→party", make, encode(train), encode(val), head=None, head_epochs=6,
                epochs=2)  # fmt: skip


def _stage(task: Task, model: nn.Module, seed: int, epochs: int, **config: Any) -> float:
    """One ``fine_tune`` call on ``model`` in place, ``config`` the :class:`FineTuneConfig`
    fields besides the head (``search`` off: each grid point runs exactly its setting);
    the last epoch's validation accuracy."""
    settings = netgraft.FineTuneConfig(head=task.head, **{"search": False, **config})
    history = netgraft.fine_tune(
        model, task.train, task.val, epochs=epochs, config=settings, batch_size=task.batch_size,
        seed=seed, run=netgraft.RunOptions(progress=False),
    )  # fmt: skip
    return float(history.last["val_acc"])


def _head(task: Task, seed: int, head_lr: float, epochs: int = 0) -> tuple[nn.Module, float]:
    model = task.make(seed)
    acc = _stage(task, model, seed, epochs=0, head_epochs=task.head_epochs + epochs,
                 head_lr=head_lr)  # fmt: skip
    return model, acc


def _unfreeze(task: Task, head: nn.Module, seed: int, base_lr, lr_mult, train_bn) -> float:
    """fine_tune's second stage from a copy of the trained ``head`` (seed + 1, as in one call)."""
    model = copy.deepcopy(head)
    return _stage(task, model, seed + 1, epochs=task.epochs, head_epochs=0, base_lr=base_lr,
                  lr_mult=lr_mult, train_bn=train_bn)  # fmt: skip


def candidates(grid: str) -> list[dict[str, Any]]:
    """The unfreeze-stage candidates: all, ``"lite"``/``"mini"``: the three base_lr at
    lr_mult 10, ``"quick"``: the first and the last."""
    if grid == "quick":
        return [CANDIDATES[0], CANDIDATES[-1]]
    return list(CANDIDATES if grid == "full" else CANDIDATES[:3])


def run_seed(task: Task, seed: int, head_lr: float, grid: str) -> list[dict[str, Any]]:
    """Every measurement of one seed on ``task``, one dict per (kind, config)."""
    out = []
    heads = {}
    chosen = {"full": HEAD_LRS, "mini": (head_lr,)}.get(grid, sorted({head_lr, OLD["head_lr"]}))
    for lr in chosen:
        started = time.perf_counter()
        heads[lr] = _head(task, seed, lr)
        out.append({"kind": "head", "head_lr": lr, "head_acc": heads[lr][1],
                    "acc": heads[lr][1], "seconds": time.perf_counter() - started})  # fmt: skip
    started = time.perf_counter()
    acc = _head(task, seed, head_lr, epochs=task.epochs)[1]
    out.append({"kind": "head only", "head_lr": head_lr, "acc": acc,
                "seconds": time.perf_counter() - started})  # fmt: skip
    runs = [({**OLD, "kind": "old defaults"}, heads[OLD["head_lr"]])] if grid != "mini" else []
    runs += [({**c, "head_lr": head_lr, "kind": "fine_tune"}, heads[head_lr])
             for c in candidates(grid)]  # fmt: skip
    has_bn = with_batch_norms(task.make(seed), None) is not None
    for config, (head, head_acc) in runs:
        started = time.perf_counter()
        same = {**config, "train_bn": False}
        if config["train_bn"] and not has_bn and same in [c for c, _ in runs]:
            # without batch norms train_bn changes nothing: the run would repeat that one
            acc = next(r["acc"] for r in out if _key(r) == _key(same))
        else:
            acc = _unfreeze(
                task, head, seed, config["base_lr"], config["lr_mult"], config["train_bn"]
            )
        out.append({**config, "head_acc": head_acc, "acc": acc,
                    "seconds": time.perf_counter() - started})  # fmt: skip
        print(f"{task.name} seed {seed}: {out[-1]}", file=sys.stderr, flush=True)
    return out


def _key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ("kind", "head_lr", "base_lr", "lr_mult", "train_bn"))


def summarise(name: str, per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of one task: each configuration's accuracies over seeds as mean ± std."""
    rows = []
    for first in per_seed[0]:
        same = [next(r for r in runs if _key(r) == _key(first)) for runs in per_seed]
        row = {
            "task": name,
            **{k: first[k] for k in first if k not in ("acc", "head_acc", "seconds")},
        }
        for field in ("head_acc", "acc"):
            if field in first:
                values = [r[field] for r in same]
                row[f"{field}_mean"] = round(statistics.fmean(values), 4)
                row[f"{field}_std"] = round(statistics.pstdev(values), 4)
                row[f"{field}s"] = [round(v, 4) for v in values]
        row["seconds"] = round(statistics.fmean(r["seconds"] for r in same), 2)
        rows.append(row)
    return rows


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fine_tune candidate whose worst shortfall, over tasks, from the best candidate's
    mean final accuracy on that task is smallest; with its per-task numbers."""
    tuned = [r for r in rows if r["kind"] in ("fine_tune", "old defaults")]
    tasks = sorted({r["task"] for r in tuned})
    best = {t: max(r["acc_mean"] for r in tuned if r["task"] == t) for t in tasks}
    regret: dict[tuple, float] = {}
    for r in tuned:
        key = _key(r)
        regret[key] = max(regret.get(key, 0.0), best[r["task"]] - r["acc_mean"])
    # only candidates measured on every task (a task on a smaller grid lacks some)
    everywhere = [k for k in regret if all(any(_key(r) == k for r in tuned if r["task"] == t)
                                           for t in tasks)]  # fmt: skip
    key = min(everywhere, key=regret.get)
    per_task = {}
    for t in tasks:
        mine = next(r for r in tuned if r["task"] == t and _key(r) == key)
        head_only = next(r for r in rows if r["task"] == t and r["kind"] == "head only")
        per_task[t] = {
            "head_acc": mine["head_acc_mean"],
            "final_acc": mine["acc_mean"],
            "head_only_acc": head_only["acc_mean"],
            "best_candidate_acc": best[t],
        }
    names = ("kind", "head_lr", "base_lr", "lr_mult", "train_bn")
    return {
        **dict(zip(names, key, strict=True)),
        "worst_shortfall": round(regret[key], 4),
        "tasks": per_task,
    }


TASKS = {"mobilenet_v2": mobilenet_task, "mnist_cnn": mnist_cnn_task, "minilm": minilm_task}


def _run_task(name: str, args: argparse.Namespace, seeds: int) -> tuple[list, dict]:
    """The rows of one task over ``seeds`` seeds, and what the task was."""
    started = time.perf_counter()
    task = TASKS[name](args.quick)
    grid = "quick" if args.quick else args.grid.get(name, "full")
    first = args.first_seed
    per_seed = [run_seed(task, s, args.head_lr, grid) for s in range(first, first + seeds)]
    size = {
        k: len(d[0]) if isinstance(d, tuple) else len(d)
        for k, d in (("train", task.train), ("val", task.val))
    }
    info = {
        **size,
        "head_epochs": task.head_epochs,
        "epochs": task.epochs,
        "seconds": round(time.perf_counter() - started, 1),
        **({"source_acc": task.source_acc} if hasattr(task, "source_acc") else {}),
    }
    return summarise(task.name, per_seed), {"task": task.name, "grid": grid, **info}


def _pool(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the same task and configuration from runs over other seeds, as one row each
    (per-seed values joined, mean ± std and mean seconds over all of them)."""
    pooled: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["task"], *_key(row))
        if key not in pooled:
            pooled[key] = {**row, "n": 1}
            continue
        into = pooled[key]
        into["seconds"] = (into["seconds"] * into["n"] + row["seconds"]) / (into["n"] + 1)
        into["n"] += 1
        for field in ("head_acc", "acc"):
            if f"{field}s" in row:
                into[f"{field}s"] = into[f"{field}s"] + row[f"{field}s"]
                into[f"{field}_mean"] = round(statistics.fmean(into[f"{field}s"]), 4)
                into[f"{field}_std"] = round(statistics.pstdev(into[f"{field}s"]), 4)
    return [{**{k: v for k, v in r.items() if k != "n"}, "seconds": round(r["seconds"], 2)}
            for r in pooled.values()]  # fmt: skip


def merge(files: list[Path], out: Path) -> None:
    """One result from several runs (other tasks, or the same task over other seeds)."""
    parts = [json.loads(f.read_text()) for f in files]
    result = {**parts[0], "tasks": {}, "rows": [], "seconds": 0.0}
    for part in parts:
        for name, info in part["tasks"].items():
            if name in result["tasks"]:
                info = {**info, "seconds": result["tasks"][name]["seconds"] + info["seconds"]}
            result["tasks"][name] = {
                **info,
                "seeds": result["tasks"].get(name, {}).get("seeds", 0) + part["seeds"],
            }
        result["rows"] += part["rows"]
        result["seconds"] = round(result["seconds"] + part["seconds"], 1)
    result["rows"] = _pool(result["rows"])
    result["seeds"] = max(t["seeds"] for t in result["tasks"].values())
    result["choice"] = choose(result["rows"])
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=1, ensure_ascii=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, two candidates")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds from this one on")
    parser.add_argument(
        "--lite",
        default="",
        help="comma-separated tasks run on the lite grid (two head rates, three candidates)",
    )
    parser.add_argument(
        "--mini",
        default="",
        help="comma-separated tasks run on the mini grid (--head-lr, three candidates, no old)",
    )
    parser.add_argument("--head-lr", type=float, default=3e-3, help="head rate of the grid")
    parser.add_argument("--threads", type=int, default=1, help="1 runs best on a busy CPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="merge these results (tasks run apart) into --out"
    )
    args = parser.parse_args()
    args.grid = {name: "lite" for name in args.lite.split(",") if name}
    args.grid.update({name: "mini" for name in args.mini.split(",") if name})
    if args.merge:
        merge(args.merge, args.out or RESULTS / "finetune_defaults.json")
        return
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    seeds = 1 if args.quick else args.seeds
    name = "finetune_defaults-quick.json" if args.quick else "finetune_defaults.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, info = [], {}
    for name in args.tasks.split(","):
        task_rows, task_info = _run_task(name, args, seeds)
        info[task_info.pop("task")] = task_info
        rows += task_rows
        result = {
            "benchmark": "finetune_defaults",
            "quick": args.quick,
            "seeds": seeds,
            "reference_head_lr": args.head_lr,
            "fixed": "AdamW (fit's default), weight decay 0, batch 32, onecycle, unfreeze='all'",
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads": args.threads,
            },  # fmt: skip
            "tasks": info,
            "choice": choose(rows),
            "rows": rows,
            "seconds": round(time.perf_counter() - started, 1),
        }
        # written after every task, so a long run that is stopped keeps what it measured
        out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
