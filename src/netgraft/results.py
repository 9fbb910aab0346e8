"""Seeded runs -> mean ± std rows -> table, JSON, CSV, PNG: the one results helper that the
demo (:mod:`netgraft.experiments.demo`) and :func:`netgraft.study` share.

A *row* is a plain dict: the setting's own keys (``method`` and ``per_class``, or ``model``,
``mode`` and ``k``, ...) followed by ``acc_mean`` and ``acc_std`` (population std over seeds),
``accs`` (per seed), ``trained_params`` and ``seconds`` (mean per run). Each caller decides
which rows to run and how its table and plot are laid out; this module only turns runs into
rows and rows into files.

Why it lives here and points nowhere up: it imports nothing from netgraft but
:mod:`netgraft.atomic`, and ``netgraft.experiments`` imports none of its modules when imported,
so the core :mod:`netgraft.study` can use it without depending on the demo. Every arrow points
down to this leaf; the demo sits above both.

Plots are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``, so writing a PNG never changes the caller's matplotlib backend or figures.
This module never trains anything and writes only the files it is asked to.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.table import Table

from .atomic import atomic_write

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn
    from matplotlib.axes import Axes

__all__ = [
    "errorbars",
    "mean_std",
    "results_table",
    "rows_csv",
    "seeded_row",
    "write_png",
    "write_results",
]


def seeded_row(
    key: Mapping[str, Any], run: Callable[[int], tuple[float, int]], seeds: Iterable[int]
) -> dict[str, Any]:
    """Call ``run(seed) -> (accuracy, trained parameters)`` once per seed, timing each call,
    and return the row: ``key``'s items, then ``acc_mean``, ``acc_std`` (population std),
    ``accs`` (rounded to 4 digits), ``trained_params`` (of the last run) and ``seconds`` (mean
    wall time per run, rounded to 3 digits)."""
    accs: list[float] = []
    seconds: list[float] = []
    trained = 0
    for seed in seeds:
        started = time.perf_counter()
        acc, trained = run(seed)
        accs.append(acc)
        seconds.append(time.perf_counter() - started)
    values = torch.tensor(accs, dtype=torch.float64)
    return {
        **key,
        "acc_mean": round(float(values.mean()), 4),
        "acc_std": round(float(values.std(unbiased=False)), 4),
        "accs": [round(a, 4) for a in accs],
        "trained_params": trained,
        "seconds": round(sum(seconds) / len(seconds), 3),
    }


def mean_std(row: Mapping[str, Any], digits: int) -> str:
    """A row's accuracy as a table cell: ``"0.902 ± 0.016"`` with ``digits`` decimals."""
    return f"{row['acc_mean']:.{digits}f} ± {row['acc_std']:.{digits}f}"


def results_table(
    title: str,
    columns: Sequence[tuple[str, str]],
    cells: Iterable[Sequence[str]],
    caption: str | None = None,
) -> Table:
    """A rich table with ``columns`` (``(header, justify)`` pairs), one row per item of
    ``cells`` and an optional caption under it."""
    table = Table(title=title)
    for header, justify in columns:
        table.add_column(header, justify=justify)
    for row in cells:
        table.add_row(*row)
    if caption is not None:
        table.caption = caption
    return table


def rows_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The rows as CSV text with ``columns`` in that order; per-seed ``accs`` are joined by
    ``;`` with 4 decimals and a missing value (``None``) is an empty cell."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {c: row.get(c) for c in columns}
        if "accs" in out:
            out["accs"] = ";".join(f"{a:.4f}" for a in row["accs"])
        writer.writerow(out)
    return buf.getvalue()


def errorbars(ax: Axes, rows: Sequence[Mapping[str, Any]], x: str, **style: Any) -> None:
    """Draw the rows' ``acc_mean`` against their ``x`` key on ``ax``, with ``acc_std`` as
    error bars (``style`` goes to :meth:`~matplotlib.axes.Axes.errorbar`: label, linestyle)."""
    ax.errorbar(
        [r[x] for r in rows],
        [r["acc_mean"] for r in rows],
        yerr=[r["acc_std"] for r in rows],
        marker="o",
        capsize=3,
        **style,
    )


def write_png(path: Path, draw: Callable[[Axes], None], figsize: tuple[float, float]) -> None:
    """Let ``draw`` fill one axes of a ``figsize`` figure and write it to ``path`` as a PNG,
    on its own Agg canvas: the global matplotlib backend and pyplot's figures are untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    draw(fig.add_subplot())
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def write_results(
    out_dir: str | os.PathLike,
    stem: str,
    data: Any,
    *,
    csv_text: str | None = None,
    plot: Callable[[Axes], None] | None = None,
    figsize: tuple[float, float] = (6.4, 4.4),
) -> dict[str, Path]:
    """Write ``STEM.json`` (``data``, indented), with ``csv_text`` ``STEM.csv``, and with
    ``plot`` (a draw function, see :func:`write_png`) ``STEM.png`` into ``out_dir``, each
    atomically; return their paths by kind (``json``, ``csv``, ``png``)."""
    out = Path(out_dir)
    paths = {"json": out / f"{stem}.json"}
    text = json.dumps(data, indent=2)
    atomic_write(paths["json"], lambda p: p.write_text(text))
    if csv_text is not None:
        paths["csv"] = out / f"{stem}.csv"
        atomic_write(paths["csv"], lambda p: p.write_text(csv_text))
    if plot is not None:
        paths["png"] = out / f"{stem}.png"
        atomic_write(paths["png"], lambda p: write_png(p, plot, figsize))
    return paths
