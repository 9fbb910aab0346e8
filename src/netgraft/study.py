"""How many layers to reuse: run the transfer experiment for the user and show the answer.

:func:`study` copies the first ``k`` units (blocks by default, or layers) of a trained source
model, re-initialises the rest, trains on the target data with the copied units frozen
(``"frozen"``) or trainable (``"fine-tuned"``) — or keeps every unit and tunes only unit ``k`` (``"surgical"``, Lee et al.
2023, "Surgical fine-tuning improves adaptation to distribution shifts") — and records
validation accuracy (mean and std
over seeds), the number of trained parameters and the time, for every ``k`` asked for. A
from-scratch baseline (``k = 0``) and a *selffer* control (a model trained on the target task
itself, reused the same way; Yosinski et al. 2014, "How transferable are features in deep
neural networks?") put the numbers in context. Frozen prefixes are trained from cached
features (:func:`netgraft.fit` with ``cache="auto"``). Results: a rich table, JSON, CSV, a PNG
of accuracy against ``k`` per mode, and a recommended ``k``.

Example::

    >>> result = netgraft.study(source, (x_train, y_train), (x_val, y_val), seeds=3, budget=5)
    >>> result.recommended
    {'model': 'source', 'mode': 'frozen', 'k': 2, ...}
    >>> result.save("study-out")  # study.json, study.csv, study.png

This module never changes the source or control model (every run trains a copy) and writes
only into the output folder it is given.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.utils.data import default_collate

from .errors import NetgraftError
from .experiments.results import (
    errorbars,
    mean_std,
    results_table,
    rows_csv,
    seeded_row,
    write_results,
)
from .freeze import freeze, train_only, unfreeze
from .heads import find_head, replace_head
from .layers import blocks, head_block_index, layers
from .reinit import reinit
from .train import evaluate, fit

__all__ = ["MODES", "STUDY_MODES", "StudyResult", "study"]

log = logging.getLogger(__name__)

MODES = ("frozen", "fine-tuned")  # the default sweep
# "surgical" (Lee et al., ICLR 2023): tune only unit k, every other unit frozen
STUDY_MODES = (*MODES, "surgical")
UNITS = ("block", "layer")
_BUDGET_DEFAULTS: dict[str, Any] = {"epochs": 5, "lr": 1e-3, "batch_size": 32}
_CSV_COLUMNS = (
    "model",
    "mode",
    "k",
    "reused_up_to",
    "acc_mean",
    "acc_std",
    "trained_params",
    "seconds",
    "accs",
)


@dataclass
class StudyResult:
    """The rows of a study (one per model, mode and ``k``), the units counted, the
    recommended row and the settings used."""

    rows: list[dict[str, Any]]
    unit: str
    units: list[str]
    recommended: dict[str, Any] | None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain data (what ``study.json`` holds)."""
        return {
            "unit": self.unit,
            "units": self.units,
            "rows": self.rows,
            "recommended": self.recommended,
            "settings": self.settings,
        }

    def to_csv(self) -> str:
        """The rows as CSV text, per-seed accuracies joined by ``;``."""
        return rows_csv(self.rows, _CSV_COLUMNS)

    def rich_table(self, title: str | None = None) -> Table:
        """The rows as a rich table, the recommended row marked with ★."""
        columns = [
            ("model", "left"),
            ("mode", "left"),
            ("k", "right"),
            (f"reused {self.unit}s", "left"),
            ("val acc", "right"),
            ("trained params", "right"),
            ("s/run", "right"),
            ("", "left"),
        ]
        cells = [
            [
                row["model"],
                row["mode"],
                str(row["k"]),
                _reused_cell(row),
                mean_std(row, 4),
                f"{row['trained_params']:,}",
                f"{row['seconds']:.2f}",
                "★" if self.recommended and _same_run(row, self.recommended) else "",
            ]
            for row in self.rows
        ]
        caption = f"★ recommended: {self.recommended['reason']}" if self.recommended else None
        return results_table(title or f"how many {self.unit}s to reuse", columns, cells, caption)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``study.json``, ``study.csv`` and ``study.png`` into ``out_dir`` (atomically);
        return their paths."""
        return write_results(
            out_dir,
            "study",
            self.to_dict(),
            csv_text=self.to_csv(),
            plot=self._draw,
            figsize=(6.8, 4.4),
        )

    def _draw(self, ax) -> None:
        for row in self.rows:
            if row["mode"] == "scratch":
                lo, hi = row["acc_mean"] - row["acc_std"], row["acc_mean"] + row["acc_std"]
                ax.axhspan(lo, hi, color="grey", alpha=0.15)
                ax.axhline(row["acc_mean"], color="grey", linestyle=":", label="from scratch")
        for model in ("source", "control"):
            for mode in STUDY_MODES:
                rows = sorted(
                    (r for r in self.rows if r["model"] == model and r["mode"] == mode),
                    key=lambda r: r["k"],
                )
                if rows:
                    style = "-" if model == "source" else "--"
                    errorbars(ax, rows, "k", linestyle=style, label=f"{model} · {mode}")
        if self.recommended:
            ax.plot(
                [self.recommended["k"]],
                [self.recommended["acc_mean"]],
                marker="*",
                markersize=16,
                color="gold",
                markeredgecolor="black",
                linestyle="none",
                label="recommended",
            )
        ax.set_xticks(sorted({r["k"] for r in self.rows}))
        ax.set_xlabel(f"{self.unit}s reused (k)")
        ax.set_ylabel("validation accuracy (mean ± std over seeds)")
        ax.set_title(f"How many {self.unit}s to reuse")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")


def _reused_cell(row: Mapping[str, Any]) -> str:
    if row["mode"] == "surgical":
        return f"only {row['reused_up_to']} tuned"
    return row["reused_up_to"] and f"… {row['reused_up_to']}" or "none"


def _same_run(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["model"] == b["model"] and a["mode"] == b["mode"] and a["k"] == b["k"]


def _units(model: nn.Module, unit: str, example: Any) -> list[list[str]]:
    """The module names each unit holds, in order (blocks, or single layers)."""
    if unit == "block":
        return [[n for n in b.layer_names if n] for b in blocks(model)]
    return [[row.name] for row in layers(model, example)]


def _unit_names(model: nn.Module, unit: str, units: list[list[str]]) -> list[str]:
    return [b.name for b in blocks(model)] if unit == "block" else [n[0] for n in units]


def _labels(data: Any) -> torch.Tensor | None:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return torch.as_tensor(data[1])
    targets = getattr(data, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets)
    samples = getattr(data, "samples", None)
    if samples is not None:
        return torch.as_tensor([label for _, label in samples])
    return None


def _num_classes(data: Any) -> int:
    classes = getattr(data, "classes", None)
    if classes is not None:
        return len(classes)
    labels = _labels(data)
    if labels is None:
        labels = torch.as_tensor([int(item[1]) for item in data])
    if labels.numel() == 0:
        raise NetgraftError("the target training data is empty; the study needs examples")
    return int(labels.max()) + 1


def _head_outputs(model: nn.Module) -> int | None:
    _, head = find_head(model)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _budget(budget: int | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(budget, bool) or not isinstance(budget, (int, Mapping)):
        raise NetgraftError(
            f"budget must be a number of epochs or a dict of fit arguments; found {budget!r}"
        )
    out = dict(_BUDGET_DEFAULTS)
    out.update({"epochs": budget} if isinstance(budget, int) else dict(budget))
    reserved = {"seed", "cache", "quiet", "resume"} & set(out)
    if reserved:
        raise NetgraftError(f"budget cannot set {sorted(reserved)}: the study sets them per run")
    if not isinstance(out["epochs"], int) or out["epochs"] < 1:
        raise NetgraftError(f"the budget needs at least one epoch; found {out['epochs']!r}")
    return out


def _check_reuse(
    reuse: Iterable[int], limit: int, unit: str, names: list[str], what: str = "before the head"
) -> list[int]:
    ks = sorted({int(k) for k in reuse})
    bad = [k for k in ks if k < 0 or k > limit]
    if bad:
        raise NetgraftError(
            f"reuse counts must be between 0 and {limit} (the {unit}s {what}: "
            f"{', '.join(names[:limit]) or 'none'}); found {bad}"
        )
    return ks


def _mode_ks(
    model: nn.Module,
    units: list[list[str]],
    unit: str,
    unit_names: list[str],
    modes: Sequence[str],
    reuse: Iterable[int] | None,
) -> dict[str, list[int]]:
    """The counts ``k`` each mode runs: units reused before the head (frozen, fine-tuned),
    or the unit tuned, the head's units included (surgical)."""
    limit = head_block_index(units, find_head(model)[0])
    out = {}
    for mode in modes:
        surgical = mode == "surgical"
        top = len(units) if surgical else limit
        asked = range(1, top + 1) if reuse is None else reuse
        what = "one of which is tuned" if surgical else "before the head"
        out[mode] = _check_reuse(asked, top, unit, unit_names, what)
    return out


def _example(data: Any) -> Any:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return torch.as_tensor(data[0][:1])
    return default_collate([data[0][0]])


@dataclass
class _Sweep:
    """What every run of one study shares: the units, the target data, the budget, the seeds."""

    units: list[list[str]]
    unit_names: list[str]
    num_classes: int
    train: Any
    val: Any
    budget: dict[str, Any]
    seeds: int
    quiet: bool

    def row(self, name: str, base: nn.Module, mode: str, k: int) -> dict[str, Any]:
        """The row of ``base`` (called ``name``) reusing its first ``k`` units in ``mode``,
        over every seed; from scratch (``k = 0``) trains everything."""
        run_mode = "fine-tuned" if mode == "scratch" else mode
        key = {
            "model": name,
            "mode": mode,
            "k": k,
            "reused_up_to": self.unit_names[k - 1] if k > 0 else None,
        }
        return seeded_row(key, lambda seed: self.run(base, k, run_mode, seed), range(self.seeds))

    def run(self, base: nn.Module, k: int, mode: str, seed: int) -> tuple[float, int]:
        """Train one copy of ``base`` reusing its first ``k`` units (``"surgical"``: every
        unit, tuning only unit ``k``); return (val acc, trained parameters)."""
        model = copy.deepcopy(base)
        unfreeze(model)
        new_head = _head_outputs(model) not in (None, self.num_classes)
        if new_head:
            replace_head(model, self.num_classes)
        if mode == "surgical":
            # a new head has nothing to keep: it is trained with the unit tuned
            tuned = self.units[k - 1] + ([find_head(model)[0]] if new_head else [])
            train_only(model, tuned)
        else:
            later = [n for names in self.units[k:] for n in names]
            if later:
                reinit(model, later, seed=seed)
            if mode == "frozen" and k > 0:
                freeze(model, [n for names in self.units[:k] for n in names])
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        fit(model, self.train, seed=seed, cache="auto", quiet=self.quiet, **self.budget)
        batch_size = max(64, 2 * self.budget["batch_size"])
        return float(evaluate(model, self.val, batch_size=batch_size)["acc"]), trained


def _recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best row by mean accuracy, or — among rows within one std of it — the one training
    the fewest parameters (equally good and cheaper)."""
    candidates = [r for r in rows if r["model"] != "control"]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: r["acc_mean"])
    close = [r for r in candidates if r["acc_mean"] >= best["acc_mean"] - best["acc_std"]]
    pick = min(close, key=lambda r: (r["trained_params"], -r["acc_mean"]))
    if pick["mode"] == "scratch":
        reason = (
            f"train from scratch: no reuse beats it by more than its spread "
            f"(acc {pick['acc_mean']:.4f} ± {pick['acc_std']:.4f})"
        )
    else:
        what = (
            f"tune only unit {pick['k']} ({pick['reused_up_to']}), keeping every other"
            if pick["mode"] == "surgical"
            else f"reuse {pick['k']} unit(s) up to {pick['reused_up_to']} {pick['mode']}"
        )
        reason = f"{what} (acc {pick['acc_mean']:.4f} ± {pick['acc_std']:.4f}"
        reason += (
            f", {pick['trained_params']:,} trained parameters; best {best['mode']} k={best['k']} "
            f"acc {best['acc_mean']:.4f})"
            if pick is not best
            else ", the best)"
        )
    return {
        **{k: pick[k] for k in ("model", "mode", "k", "reused_up_to", "acc_mean")},
        "reason": reason,
    }


def _check_choices(modes: Sequence[str], unit: str, seeds: int) -> None:
    unknown = [m for m in modes if m not in STUDY_MODES]
    if unknown or not modes:
        raise NetgraftError(f"modes must be some of {', '.join(STUDY_MODES)}; found {list(modes)}")
    if unit not in UNITS:
        raise NetgraftError(f"unit must be one of {', '.join(UNITS)}; found {unit!r}")
    if not isinstance(seeds, int) or seeds < 1:
        raise NetgraftError(f"seeds must be a positive integer; found {seeds!r}")


def _check_control(control: nn.Module | None, unit: str, n_units: int) -> None:
    if control is not None and len(_units(control, unit, None)) != n_units:
        raise NetgraftError(
            f"the control model must have the source's architecture: {n_units} {unit}s "
            f"expected, found {len(_units(control, unit, None))}"
        )


def _plan(
    source: nn.Module,
    control: nn.Module | None,
    modes: Sequence[str],
    ks: Mapping[str, list[int]],
    baseline: bool,
) -> list[tuple[str, nn.Module, str, int]]:
    """The settings to run, in table order: ``(model name, model, mode, k)``; from scratch
    first (with ``baseline`` or when ``k = 0`` is asked for), then the source, then the
    control, each per mode and its ``ks``."""
    plan: list[tuple[str, nn.Module, str, int]] = []
    if baseline or any(0 in counts for counts in ks.values()):
        plan.append(("scratch", source, "scratch", 0))
    for name, model in (("source", source), ("control", control)):
        if model is None:
            continue
        plan += [(name, model, mode, k) for mode in modes for k in ks[mode] if k > 0]
    return plan


def _sweep_rows(
    sweep: _Sweep, plan: list[tuple[str, nn.Module, str, int]], say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """One row per planned setting, each said to ``say`` once its seeds are done."""
    rows = []
    for name, model, mode, k in plan:
        row = sweep.row(name, model, mode, k)
        rows.append(row)
        say(
            f"{name:<7} {mode:<10} k={k:<2} acc {row['acc_mean']:.4f} ± {row['acc_std']:.4f} "
            f"· {row['trained_params']:,} trained · {row['seconds']:.2f}s/run"
        )
    return rows


def study(
    source_model: nn.Module,
    target_train: Any,
    target_val: Any,
    *,
    reuse: Iterable[int] | None = None,
    modes: Sequence[str] = MODES,
    baseline: bool = True,
    control: nn.Module | None = None,
    seeds: int = 3,
    budget: int | Mapping[str, Any] = 5,
    unit: str = "block",
    num_classes: int | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    quiet: bool = True,
) -> StudyResult:
    """For each ``k`` in ``reuse`` and each mode, train ``seeds`` copies of ``source_model``
    whose first ``k`` units (``unit="block"``: :func:`netgraft.blocks`; ``"layer"``: the layer
    table) keep their weights and the rest is re-initialised, frozen (``"frozen"``) or not
    (``"fine-tuned"``), and measure accuracy on ``target_val``; return a :class:`StudyResult`.
    Mode ``"surgical"`` keeps every unit's weights and tunes only unit ``k`` (1-based, the
    head's units included), every other unit frozen; a head replaced for another number of
    classes is trained with it.

    ``reuse`` defaults to every count from 1 to the unit before the head (the head is always
    new; it is replaced when the target has another number of classes), and for
    ``"surgical"`` to every unit. ``baseline`` adds
    ``k = 0`` (from scratch); ``control`` (a model trained on the target task itself) is
    reused the same way. ``budget`` is the epochs of every run, or a dict of
    :func:`netgraft.fit` arguments (``epochs``, ``lr``, ``batch_size``, ``optimizer``, ...).
    Data are ``(x, y)`` tensors or datasets. With ``out_dir`` the JSON, CSV and PNG are
    written there.
    """
    _check_choices(modes, unit, seeds)
    settings = _budget(budget)
    num_classes = num_classes or _num_classes(target_train)
    units = _units(source_model, unit, _example(target_train))
    unit_names = _unit_names(source_model, unit, units)
    ks = _mode_ks(source_model, units, unit, unit_names, modes, reuse)
    _check_control(control, unit, len(units))
    sweep = _Sweep(units, unit_names, num_classes, target_train, target_val, settings, seeds, quiet)
    plan = _plan(source_model, control, modes, ks, baseline)
    rows = _sweep_rows(sweep, plan, progress or (lambda line: log.info(line)))
    result = StudyResult(
        rows=rows,
        unit=unit,
        units=unit_names,
        recommended=_recommend(rows),
        settings={**settings, "seeds": seeds, "modes": list(modes), "num_classes": num_classes},
    )
    if out_dir is not None:
        result.save(out_dir)
    return result
