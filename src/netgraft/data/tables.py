"""Text classification tables: a CSV file or JSON Lines file with a ``text`` and a ``label``
column, read into tokenized examples as ``fit`` takes them.

A CSV has a header row naming its columns (others are ignored); a JSONL file holds one JSON
object per line. Labels are class names (a number is read as its text); the classes of a
table are its distinct labels in sorted order. A file that cannot be used (missing, empty,
without the ``text`` or ``label`` column, a bad line) is one :class:`DataError` that says
what was expected and what was found; nothing here writes anything.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .text import TokenizedTexts

TABLE_SUFFIXES = (".csv", ".jsonl")
COLUMNS = ("text", "label")


def is_text_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a text table by its suffix (``.csv`` or ``.jsonl``)."""
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _jsonl_rows(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    rows, columns = [], {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{str(path)!r} line {number} is not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise DataError(f"{str(path)!r} line {number} is not a JSON object")
            columns.update(dict.fromkeys(row))
            rows.append(row)
    return list(columns), rows


def read_text_table(
    path: str | os.PathLike, *, need_labels: bool = True
) -> tuple[list[str], list[str] | None]:
    """The texts of a table and their labels as strings (None when the table has no
    ``label`` column and ``need_labels`` is False, as for prediction)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text table {str(path)!r} does not exist")
    if not is_text_table(path):
        raise DataError(f"{str(path)!r} is not a text table: expected a .csv or .jsonl file")
    try:
        columns, rows = (_csv_rows if path.suffix.lower() == ".csv" else _jsonl_rows)(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{str(path)!r} is not a readable UTF-8 table: {exc}") from exc
    if not rows:
        raise DataError(f"text table {str(path)!r} is empty: expected rows with text and label")
    wanted = COLUMNS if need_labels else COLUMNS[:1]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataError(
            f"text table {str(path)!r} has no {' or '.join(repr(c) for c in missing)} column; "
            f"expected {', '.join(repr(c) for c in wanted)}, found {columns}"
        )
    _check_cells(path, rows, wanted)
    texts = [str(r["text"]) for r in rows]
    labels = [str(r["label"]) for r in rows] if "label" in columns else None
    return texts, labels


def _check_cells(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    for number, row in enumerate(rows, start=1):
        empty = [c for c in columns if row.get(c) in (None, "")]
        if empty:
            raise DataError(f"text table {str(path)!r} row {number} has no {empty[0]!r}")


def label_ids(labels: Sequence[str], classes: Sequence[str], source: str) -> torch.Tensor:
    """Class indices of ``labels``; a label outside ``classes`` is a :class:`DataError`."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise DataError(
            f"{source} has labels {unknown[:5]} the model does not know; its classes are "
            f"{list(classes)}"
        )
    return torch.tensor([index[lab] for lab in labels])


@dataclass
class TextSplit:
    """A table split for fine-tuning: tokenized ``train`` and ``val`` sets (``val`` None when
    nothing is held out), the class names in label order, the fixed token length."""

    train: TokenizedTexts
    val: TokenizedTexts | None
    classes: list[str]
    max_length: int


def _per_class_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices held out per class (``fraction`` of each class, at least one of a class with
    two or more examples), the rest for training; seeded."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in y.unique().tolist():
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)].tolist()
        n_val = max(1, round(fraction * len(members))) if fraction > 0 and len(members) > 1 else 0
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


def text_table(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    max_length: int = 128,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> TextSplit:
    """A labelled table tokenized by ``tokenizer`` to ``max_length`` tokens and split per
    class, ``val_fraction`` of each class held out (seeded). At least two classes."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1); found {val_fraction}")
    texts, labels = read_text_table(path)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"text table {str(path)!r} has one class ({classes[0]!r}); need two")
    y = label_ids(labels, classes, repr(str(path)))
    train, val = _per_class_split(y, val_fraction, seed)

    def tokenized(idx: list[int]) -> TokenizedTexts:
        return TokenizedTexts([texts[i] for i in idx], y[idx], tokenizer, max_length)

    return TextSplit(tokenized(train), tokenized(val) if val else None, classes, max_length)


def labelled_texts(
    path: str | os.PathLike, tokenizer: Any, classes: Sequence[str], max_length: int
) -> TokenizedTexts:
    """Every row of a labelled table, tokenized, labels as indices of ``classes`` (a label
    the model was not trained on is a :class:`DataError`)."""
    texts, labels = read_text_table(path)
    return TokenizedTexts(texts, label_ids(labels, classes, repr(str(path))), tokenizer, max_length)
