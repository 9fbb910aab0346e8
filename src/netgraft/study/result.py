"""The results of a study: its rows, the recommended row, and the table, JSON, CSV and PNG
they are shown as.

A row is one setting (model, mode, ``k``) over its seeds (see
:mod:`netgraft.experiments.results`). The recommended row is the best by mean accuracy or,
among rows within one standard deviation of it, the one training the fewest parameters.
This module never trains and writes only into the folder :meth:`StudyResult.save` is
given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from ..results import errorbars, mean_std, results_table, rows_csv, write_results
from .trials import STUDY_MODES

__all__ = ["StudyResult", "recommend"]

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
    recommended row and the settings used; ``trials_run`` and ``trials_reused`` say how
    many trials this call trained and how many it read back from an earlier run."""

    rows: list[dict[str, Any]]
    unit: str
    units: list[str]
    recommended: dict[str, Any] | None
    settings: dict[str, Any] = field(default_factory=dict)
    # how this run got its trials: trained now, or read back from an earlier run's files
    trials_run: int = 0
    trials_reused: int = 0

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
    if row["mode"] == "lora" and row["reused_up_to"]:
        return f"all, LoRA down to {row['reused_up_to']}"
    return row["reused_up_to"] and f"… {row['reused_up_to']}" or "none"


def _same_run(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["model"] == b["model"] and a["mode"] == b["mode"] and a["k"] == b["k"]


def _what(pick: Mapping[str, Any]) -> str:
    """What the recommended (non-scratch) row does, for its reason."""
    if pick["mode"] == "surgical":
        return f"tune only unit {pick['k']} ({pick['reused_up_to']}), keeping every other"
    if pick["mode"] == "lora":
        return (
            f"LoRA on the top {pick['k']} block(s), down to {pick['reused_up_to']}, every "
            "weight kept frozen"
        )
    return f"reuse {pick['k']} unit(s) up to {pick['reused_up_to']} {pick['mode']}"


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
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
        what = _what(pick)
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
