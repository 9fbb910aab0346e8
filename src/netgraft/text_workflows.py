"""Text classifiers end to end, as :mod:`netgraft.workflows` does for image folders: fine-tune
a Hugging Face model (``hf:PATH``) on a text table (CSV or JSONL with ``text`` and ``label``;
:mod:`netgraft.data.tables`), save it servable, evaluate it on a table and predict a table's
texts. The tokenizer is the model folder's own; texts are cut or padded to a fixed
``max_length``, so the feature cache applies to a frozen encoder. The saved folder's
``data.json`` holds the class names, ``max_length`` and the tokenizer's folder.

Every check on the input (the spec, the table's columns and rows, the classes against
``num_classes`` or the trained head) runs before anything is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .data.tables import labelled_texts, read_text_table, text_table
from .data.text import TokenizedTexts
from .deprecation import legacy
from .errors import DataError
from .options import RunOptions, run_options
from .saved import load as load_saved
from .saved import save
from .train import History, evaluate, fine_tune, predict
from .train.finetune import FineTuneConfig
from .zoo import load_model, parse_spec

TEXT_TASK = "sequence-classification"


@dataclass
class TextFinetuneResult:
    """What :func:`finetune_table` made: the saved folder, the history, the class names."""

    folder: Path
    history: History
    classes: list[str]

    def summary(self) -> str:
        """One line: epochs trained, the last validation (else training) accuracy, where."""
        last = self.history.last
        score = (
            f"val_acc {last['val_acc']:.4f}"
            if "val_acc" in last
            else f"acc {last.get('acc', 0):.4f}"
        )
        return f"fine-tuned {len(self.history)} epochs, {score}; saved to {self.folder}"


def tokenizer_of(path: str | os.PathLike) -> Any:
    """The Hugging Face tokenizer saved in the model folder ``path`` (never downloaded)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"no tokenizer in {str(path)!r}: {str(exc).splitlines()[0]}") from exc


def _hf_folder(model: Any) -> str:
    kind, rest = parse_spec(model) if isinstance(model, str) else (None, None)
    if kind != "hf":
        raise DataError(
            "a text table needs a Hugging Face model spec hf:PATH (its tokenizer is read from "
            f"that folder); found {model!r}"
        )
    return str(Path(rest).resolve())


@legacy(cache="run=RunOptions(cache=...)", quiet="run=RunOptions(progress=not quiet)")
def finetune_table(
    model: str,
    table: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_classes: int | None = None,
    config: FineTuneConfig | None = None,
    epochs: int = 3,
    max_length: int = 128,
    batch_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    run: RunOptions | None = None,
    **legacy_kwargs: Any,
) -> TextFinetuneResult:
    """Fine-tune the Hugging Face model ``model`` (``hf:PATH``) as a sequence classifier on
    the text table ``table`` and save it, servable, to ``out``.

    The table is tokenized by the folder's tokenizer to ``max_length`` tokens and split per
    class (``val_fraction`` held out, seeded); the classifier gets one output per class
    (``num_classes``, when given, must be that count: another is a :class:`DataError`), then
    :func:`netgraft.fine_tune` trains it as ``config`` says for ``epochs`` after the head
    stage, run as ``run`` says (:class:`~netgraft.RunOptions`: device, cache, progress, ...).
    ``out`` gets the weights and recipe, ``history.json``/``.png`` and ``data.json``. The old
    ``cache=`` and ``quiet=`` still work and warn.
    """
    run = run_options(run, legacy_kwargs)
    folder = _hf_folder(model)
    split = text_table(
        table, tokenizer_of(folder), max_length=max_length, val_fraction=val_fraction, seed=seed
    )
    n = num_classes if num_classes is not None else len(split.classes)
    if n != len(split.classes):
        raise DataError(
            f"--num-classes {n} does not match the {len(split.classes)} labels in {str(table)!r}: "
            f"{split.classes}"
        )
    torch.manual_seed(seed)
    net = load_model(f"hf:{folder}", task=TEXT_TASK, num_labels=n)
    history = fine_tune(net, split.train, split.val, epochs=epochs, config=config,
                        batch_size=batch_size, seed=seed, run=run)  # fmt: skip
    saved = save(net, out)
    history.save(saved)
    write_text_info(saved, split.classes, max_length, folder)
    return TextFinetuneResult(saved, history, split.classes)


def write_text_info(folder: Path, classes: list[str], max_length: int, tokenizer: str) -> Path:
    """``data.json`` of a text model: class names, token length and the tokenizer's folder."""
    text = json.dumps(
        {"classes": classes, "text": {"max_length": max_length, "tokenizer": tokenizer}}, indent=2
    )
    return atomic_write(Path(folder) / "data.json", lambda p: p.write_text(text))


def read_text_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``{"classes", "max_length", "tokenizer"}`` of a text model folder; None when the
    folder's ``data.json`` is missing or describes an image model."""
    try:
        data = json.loads((Path(folder) / "data.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("text"), dict):
        return None
    return {"classes": list(data["classes"]), **data["text"]}


def _text_info(folder: str | os.PathLike) -> dict[str, Any]:
    info = read_text_info(folder)
    if info is None:
        raise DataError(
            f"{str(folder)!r} is not a text model written by netgraft finetune on a text table "
            "(its data.json names no tokenizer); give it an image folder"
        )
    return info


def evaluate_table(
    folder: str | os.PathLike, table: str | os.PathLike, *, batch_size: int = 64
) -> dict[str, Any]:
    """Loss, accuracy and count (``{"loss", "acc", "n"}``) of the text model in ``folder`` on
    every row of the labelled ``table``; a label the model was not trained on is a
    :class:`DataError`."""
    info = _text_info(folder)
    data = labelled_texts(
        table, tokenizer_of(info["tokenizer"]), info["classes"], info["max_length"]
    )
    return evaluate(load_saved(folder), data, batch_size=batch_size)


def predict_table(
    folder: str | os.PathLike, table: str | os.PathLike, *, k: int = 3, batch_size: int = 64
) -> dict[str, list[dict[str, Any]]]:
    """The top-``k`` classes of the text model in ``folder`` for each row of ``table`` (its
    ``label`` column, if any, is ignored): ``{"TABLE:ROW": [{"class", "prob"}, ...]}`` with
    rows numbered from 1, most probable first, probabilities rounded to 6 digits."""
    info = _text_info(folder)
    texts, _ = read_text_table(table, need_labels=False)
    data = TokenizedTexts(texts, torch.zeros(len(texts), dtype=torch.long),
                          tokenizer_of(info["tokenizer"]), info["max_length"])  # fmt: skip
    model = load_saved(folder)
    out: dict[str, list[dict[str, Any]]] = {}
    for start in range(0, len(texts), batch_size):
        batch = {k_: v[start : start + batch_size] for k_, v in data.columns.items()}
        probs, indices = predict(model, batch, k=k)
        for row, (pr, ix) in enumerate(zip(probs.tolist(), indices.tolist(), strict=True)):
            out[f"{table}:{start + row + 1}"] = [
                {"class": info["classes"][i], "prob": round(float(q), 6)}
                for q, i in zip(pr, ix, strict=True)
            ]
    return out
