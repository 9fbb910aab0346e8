"""The transfer report: what happened to every destination tensor, and to every source one.

A :class:`TransferReport` is returned by :func:`netgraft.transfer`. Each destination tensor
(parameters *and* buffers such as BatchNorm running statistics and ``num_batches_tracked``)
has one status: ``copied`` (from a named source tensor, found by a named matching step),
``adapted`` (copied through a named shape adapter), ``kept`` (left as it was initialised)
or ``reinitialised``. Source tensors that went nowhere are ``unexpected``; pairs whose
shapes differ are ``mismatched`` with both shapes. The report never changes a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..errors import WeightsError

__all__ = ["Mismatch", "TensorRecord", "TransferReport", "STATUSES"]

STATUSES = ("copied", "adapted", "kept", "reinitialised")
# A counter whose source has no value (Keras and ONNX have none) is not a weight.
_COUNTERS = ("num_batches_tracked",)


@dataclass
class TensorRecord:
    """What happened to one destination tensor."""

    name: str
    status: str
    shape: tuple[int, ...]
    numel: int
    is_parameter: bool
    source: str | None = None
    source_shape: tuple[int, ...] | None = None
    how: str | None = None  # exact | suffix | structure | mapping
    rule: str | None = None  # the adapter that changed the shape
    note: str | None = None

    def describe(self) -> str:
        """The status as one short phrase, e.g. ``adapted(conv1.weight, in_channels_sum)``."""
        if self.status == "copied":
            return f"copied({self.source})"
        if self.status == "adapted":
            return f"adapted({self.source}, {self.rule})"
        return self.status

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "shape": list(self.shape),
            "numel": self.numel,
            "is_parameter": self.is_parameter,
            "source": self.source,
            "source_shape": list(self.source_shape) if self.source_shape is not None else None,
            "how": self.how,
            "rule": self.rule,
            "note": self.note,
        }


@dataclass
class Mismatch:
    """A destination tensor paired with a source tensor of another shape."""

    name: str
    shape: tuple[int, ...]
    source: str
    source_shape: tuple[int, ...]
    how: str

    def __str__(self) -> str:
        return (
            f"{self.name} {_shape(self.shape)} <- {self.source} {_shape(self.source_shape)} "
            f"(paired by {self.how})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "source": self.source,
            "source_shape": list(self.source_shape),
            "how": self.how,
        }


def _shape(shape: tuple[int, ...] | None) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")" if shape is not None else "-"


@dataclass
class TransferReport:
    """For each destination tensor its status, plus unexpected source tensors, mismatched
    pairs and notes (epsilon differences, layout conversions)."""

    source: str
    records: dict[str, TensorRecord] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    not_selected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def names(self, status: str) -> list[str]:
        """Destination tensor names with ``status`` (one of copied, adapted, kept, reinitialised)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}; found {status!r}")
        return [n for n, r in self.records.items() if r.status == status]

    @property
    def copied(self) -> list[str]:
        return self.names("copied")

    @property
    def adapted(self) -> list[str]:
        return self.names("adapted")

    @property
    def kept(self) -> list[str]:
        return self.names("kept")

    @property
    def reinitialised(self) -> list[str]:
        return self.names("reinitialised")

    @property
    def counts(self) -> dict[str, int]:
        """Number of destination tensors per status."""
        out = dict.fromkeys(STATUSES, 0)
        for record in self.records.values():
            out[record.status] += 1
        return out

    @property
    def loaded_fraction(self) -> float:
        """Share of destination *parameters* (by element count) copied or adapted from the
        source; 1.0 when every parameter came from the source."""
        total = sum(r.numel for r in self.records.values() if r.is_parameter)
        loaded = sum(
            r.numel
            for r in self.records.values()
            if r.is_parameter and r.status in ("copied", "adapted")
        )
        return loaded / total if total else 1.0

    def incomplete(self) -> list[TensorRecord]:
        """Destination tensors that did not come from the source (counters such as
        ``num_batches_tracked`` excepted), and were not left out by the selection."""
        return [
            r
            for r in self.records.values()
            if r.status not in ("copied", "adapted")
            and r.note != "not selected"
            and not r.name.endswith(_COUNTERS)
        ]

    def assert_complete(self, *, allow_unexpected: bool = False) -> TransferReport:
        """Raise :class:`WeightsError` unless every selected destination tensor was copied or
        adapted and (unless ``allow_unexpected``) every source tensor was used."""
        missing = self.incomplete()
        problems = []
        if missing:
            shown = ", ".join(f"{r.name} ({r.status})" for r in missing[:6])
            more = f" … (+{len(missing) - 6})" if len(missing) > 6 else ""
            problems.append(f"{len(missing)} destination tensors not loaded: {shown}{more}")
        if self.unexpected and not allow_unexpected:
            shown = ", ".join(self.unexpected[:6])
            more = f" … (+{len(self.unexpected) - 6})" if len(self.unexpected) > 6 else ""
            problems.append(f"{len(self.unexpected)} source tensors unused: {shown}{more}")
        if problems:
            raise WeightsError(
                f"transfer from {self.source} is incomplete (expected every tensor loaded): "
                + "; ".join(problems)
            )
        return self

    def summary(self) -> str:
        """One line: counts per status, loaded fraction, unexpected and mismatched."""
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
        return (
            f"transfer from {self.source}: {counts or 'no tensors'}; "
            f"{self.loaded_fraction:.1%} of parameters loaded; "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched"
        )

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the source, the counts per status and every record, unexpected and
        mismatched tensor, as :meth:`to_json` writes them."""
        return {
            "source": self.source,
            "counts": self.counts,
            "loaded_fraction": self.loaded_fraction,
            "tensors": [r.to_dict() for r in self.records.values()],
            "unexpected": list(self.unexpected),
            "mismatched": [m.to_dict() for m in self.mismatched],
            "not_selected": list(self.not_selected),
            "notes": list(self.notes),
        }

    def to_json(self, path: str | Path | None = None, **kwargs: Any) -> str:
        """The report as JSON; also written atomically to ``path`` when given."""
        kwargs.setdefault("indent", 2)
        text = json.dumps(self.to_dict(), **kwargs)
        if path is not None:
            atomic_write(path, lambda tmp: tmp.write_text(text))
        return text

    def table(self, *, title: str | None = None, max_rows: int | None = None):
        """A rich ``Table`` with one row per destination tensor, then unexpected source tensors;
        the caption holds the summary and notes."""
        from rich.table import Table

        styles = {
            "copied": "green",
            "adapted": "cyan",
            "kept": "yellow",
            "reinitialised": "magenta",
        }
        table = Table(title=title or f"transfer from {self.source}")
        for col in ("destination", "shape", "status", "source", "matched by"):
            table.add_column(col)
        rows = list(self.records.values())
        shown = rows if max_rows is None else rows[:max_rows]
        for r in shown:
            source = r.source or ""
            if r.source_shape is not None and r.source_shape != r.shape:
                source += f" {_shape(r.source_shape)}"
            status = r.status if r.status != "adapted" else f"adapted ({r.rule})"
            if r.note and r.status in ("kept", "reinitialised"):
                status += f" – {r.note}"
            table.add_row(
                r.name,
                _shape(r.shape),
                f"[{styles[r.status]}]{status}[/]",
                source,
                r.how or "",
            )
        if len(shown) < len(rows):
            table.add_row(f"… {len(rows) - len(shown)} more", "", "", "", "")
        for name in self.unexpected:
            table.add_row("", "", "[red]unexpected[/]", name, "")
        caption = [self.summary()]
        caption += [f"mismatched: {m}" for m in self.mismatched]
        caption += self.notes
        table.caption = "\n".join(caption)
        return table
