"""The record of a training run: one row per epoch, saved as JSON and drawn as a PNG.

Each row holds ``epoch`` (1-based, counted over the whole run), optionally ``stage``,
the training ``loss`` and metrics, their ``val_`` counterparts, ``lr`` (the learning
rate of every optimizer group during the epoch's last step, by group name) and
``time`` in seconds. This module never trains anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..deprecation import legacy
from ..errors import NetgraftError

__all__ = ["History"]


class History:
    """Epoch rows of a training run, with JSON and PNG output."""

    def __init__(self, rows: list[dict[str, Any]] | None = None):
        self.rows: list[dict[str, Any]] = list(rows or [])
        # what fine_tune's search chose and every candidate's held-out score (None: none)
        self.search: dict[str, Any] | None = None

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch's row."""
        self.rows.append(dict(row))

    def extend(self, other: History, stage: str | None = None) -> None:
        """Append the rows of ``other``, renumbering epochs after ours and tagging ``stage``."""
        offset = len(self.rows)
        for i, row in enumerate(other.rows):
            row = dict(row)
            row["epoch"] = offset + i + 1
            if stage is not None:
                row["stage"] = stage
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, key: str) -> list[Any]:
        """The values of ``key`` over epochs (None where an epoch has none)."""
        return [row.get(key) for row in self.rows]

    @property
    def last(self) -> dict[str, Any]:
        """The latest row (empty when nothing was trained)."""
        return self.rows[-1] if self.rows else {}

    def best(self, monitor: str = "val_acc", mode: str = "max") -> dict[str, Any]:
        """The row with the best value of ``monitor`` (``mode`` ``"max"`` or ``"min"``)."""
        rows = [r for r in self.rows if isinstance(r.get(monitor), (int, float))]
        if not rows:
            raise NetgraftError(f"no epoch recorded {monitor!r}; recorded: {self.keys()}")
        pick = max if mode == "max" else min
        return pick(rows, key=lambda r: r[monitor])

    def keys(self) -> list[str]:
        """Every key recorded in some row, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"epochs": [row, ...]}``, one row per epoch, and ``"search"`` when
        :func:`netgraft.fine_tune` chose its setting on held-out data."""
        out: dict[str, Any] = {"epochs": [dict(r) for r in self.rows]}
        if self.search is not None:
            out["search"] = self.search
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """The history :meth:`to_dict` wrote."""
        history = cls(list(data.get("epochs", [])))
        history.search = data.get("search")
        return history

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a ``history.json`` (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "history.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise NetgraftError(f"cannot read training history {str(path)!r}: {exc}") from exc

    @legacy(folder="out_dir")
    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``history.json`` and ``history.png`` into ``out_dir`` atomically; return both
        paths."""
        folder = Path(out_dir)
        js = atomic_write(folder / "history.json", lambda p: p.write_text(self.to_json(indent=2)))
        png = self.plot(folder / "history.png")
        return js, png

    def plot(self, path: str | Path) -> Path:
        """Draw the loss, metric and learning-rate curves to a PNG file (written atomically)."""
        # a bare Figure draws through its own Agg canvas: the caller's pyplot backend is
        # never touched
        from matplotlib.figure import Figure

        epochs = self["epoch"]
        metrics = [
            k
            for k in self.keys()
            if k not in ("epoch", "stage", "lr", "time", "loss", "val_loss")
            and not k.startswith("val_")
            and all(isinstance(v, (int, float)) or v is None for v in self[k])
        ]
        panels = ["loss", *metrics, "lr"]
        fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, name in zip(axes, panels, strict=True):
            if name == "lr":
                groups: dict[str, None] = {}
                for row in self.rows:
                    groups.update(dict.fromkeys(row.get("lr") or {}))
                for g in groups:
                    ys = [(row.get("lr") or {}).get(g, math.nan) for row in self.rows]
                    ax.plot(epochs, ys, linewidth=1, label=g if len(groups) <= 6 else None)
                ax.set_yscale("log")
                if 0 < len(groups) <= 6:
                    ax.legend(fontsize=7)
            else:
                for key, style in ((name, "-o"), (f"val_{name}", "--s")):
                    ys = [math.nan if v is None else v for v in self[key]]
                    if any(not math.isnan(v) for v in ys):
                        ax.plot(epochs, ys, style, markersize=3, label=key)
                ax.legend(fontsize=8)
            self._mark_stages(ax)
            ax.set_title(name)
            ax.set_xlabel("epoch")
        return atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=90))

    def _mark_stages(self, ax: Any) -> None:
        stages = self["stage"]
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(self.rows[i]["epoch"] - 0.5, color="grey", linewidth=0.6, linestyle=":")

    def __repr__(self) -> str:
        return f"History({len(self.rows)} epochs, keys={self.keys()})"
