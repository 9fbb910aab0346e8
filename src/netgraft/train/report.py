"""What a training run shows: a progress bar, and one line per event (the cache plan,
each epoch's losses, metrics and learning rates, a callback's decision).

Lines go to the ``netgraft.train`` logger and, unless quiet, to a rich console on stderr
above the progress bar. This module never decides anything about training.
"""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["Reporter", "epoch_line", "format_lrs"]

log = logging.getLogger("netgraft.train")
_NOT_SHOWN = ("epoch", "stage", "lr", "time")


class Reporter:
    """One line per event to the ``netgraft.train`` logger and, unless quiet, to a rich
    console on stderr (above the progress bar). Only the main process of a data-parallel
    run (``main``) reports; the others stay silent."""

    def __init__(self, quiet: bool, main: bool = True):
        self.quiet = quiet or not main
        self.main = main
        self.console = Console(stderr=True, highlight=False)
        self.progress: Any = None

    def __call__(self, line: str) -> None:
        if not self.main:
            return
        log.info(line)
        if not self.quiet:
            target = self.progress.console if self.progress is not None else self.console
            target.print(line, markup=False, highlight=False, soft_wrap=True)

    def bar(self) -> Progress:
        """A transient progress bar (disabled when quiet); lines printed while it runs go
        above it."""
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=True,
            disable=self.quiet,
        )
        return self.progress


def format_lrs(lrs: dict[str, float]) -> str:
    """Learning rates by group for a log line; neighbouring groups with the same rate are
    shown as one range (``lr features.0…features.3=1e-05, classifier=0.001``)."""
    parts: list[str] = []
    suffix = " (no decay)"
    # a block's no-decay group at the block's own rate says nothing new: show the block once
    items = [
        (name, rate)
        for name, rate in lrs.items()
        if not (name.endswith(suffix) and lrs.get(name[: -len(suffix)]) == rate)
    ]
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1][1] == items[i][1]:
            j += 1
        names = items[i][0] if i == j else f"{items[i][0]}…{items[j][0]}"
        parts.append(f"{names}={items[i][1]:.3g}")
        i = j + 1
    return "lr " + ", ".join(parts)


def epoch_line(logs: dict[str, Any], epoch: int, epochs: int, stage: str | None) -> str:
    """The line an epoch ends with: ``[stage · ]epoch E/N · loss … · val_acc … · lr … · Ts``
    (``epoch`` is 0-based)."""
    prefix = f"{stage} · " if stage else ""
    shown = " · ".join(f"{k} {v:.4f}" for k, v in logs.items() if k not in _NOT_SHOWN)
    return (
        f"{prefix}epoch {epoch + 1}/{epochs} · {shown} · {format_lrs(logs['lr'])} · "
        f"{logs['time']:.1f}s"
    )
