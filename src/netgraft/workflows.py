"""End-to-end workflows, one library function per ``netgraft`` command that needs more than
one step: look inside a model spec, grow a model or transfer weights into one and save it,
study how many layers of a model to reuse on an image folder, fine-tune a model on an image
folder into a servable folder, and score or predict image files with such a folder.

Each function does exactly what its command does, so a script and the command line give the
same model, files and numbers; the command line only parses arguments and prints what these
return. A *servable folder* is a saved netgraft model (``weights.safetensors`` and its
recipe, :func:`netgraft.save`) with ``history.json``/``.png`` and ``data.json`` (class names
and input config), everything :func:`evaluate_folder` and :func:`predict_files` need.

Example::

    >>> result = fine_tune_folder("torchvision:mobilenet_v2", "photos/", "out/", epochs=2)
    >>> result.summary()
    'fine-tuned 3 epochs, val_acc 0.9200; saved to out'
    >>> predict_files("out/", ["cat.png"], k=1)
    {'cat.png': [{'class': 'cat', 'prob': 0.97}]}

This module never prints, never parses command-line text and writes only into the output
folders it is given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from .atomic import atomic_write
from .data import (
    image_folder,
    image_transform,
    labelled_images,
    load_image,
    read_data_info,
    write_data_info,
)
from .data.tables import is_text_table
from .deprecation import legacy, renamed_function, warn_deprecated
from .errors import DataError, NetgraftError
from .grow import deepen as deepen_op
from .grow import expand_blocks
from .grow import widen as widen_op
from .heads import replace_head
from .layers import Block, LayerTable, blocks, layers
from .options import RunOptions, run_options
from .pretrain import AuxiliaryTask, pretrain_auxiliary, pretrain_layerwise
from .recipe import recipe_of
from .saved import load as load_saved
from .saved import save
from .study import StudyResult, study
from .text_workflows import evaluate_table, finetune_table, predict_table, read_text_info
from .train import History, evaluate, fine_tune, predict
from .train.finetune import FineTuneConfig, resolve_config
from .transfer import TransferReport, transfer
from .zoo import input_for, load_model

__all__ = [
    "FineTuneResult",
    "GrowResult",
    "Inspection",
    "PRETRAIN_TASKS",
    "PretrainResult",
    "TransferResult",
    "blocks_table",
    "evaluate_folder",
    "fine_tune_folder",
    "finetune_folder",
    "grow_folder",
    "inspect_model",
    "predict_files",
    "pretrain_folder",
    "study_folder",
    "transfer_folder",
]


def blocks_table(rows: Sequence[Block], title: str) -> Table:
    """The blocks as a rich table: index, name, parameters and the first six modules each
    holds (``…`` when there are more)."""
    table = Table(title=title)
    for col in ("#", "block", "params", "modules"):
        table.add_column(col)
    for b in rows:
        mods = ", ".join(b.modules[:6]) + (" …" if len(b.modules) > 6 else "")
        table.add_row(str(b.index), b.name, f"{b.params:,}", mods)
    return table


@dataclass
class Inspection:
    """What ``netgraft inspect`` shows of a model spec: its layer table and, when asked for,
    its blocks instead."""

    spec: str
    layers: LayerTable
    blocks: list[Block] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The blocks (``{"spec", "blocks"}``) when asked for, else the layer table with the
        spec, as plain data."""
        if self.blocks is not None:
            return {"spec": self.spec, "blocks": [b.to_dict() for b in self.blocks]}
        return {"spec": self.spec, **self.layers.to_dict()}

    def rich_table(self) -> Table:
        """The blocks or the layer table as a rich table titled with the spec."""
        if self.blocks is not None:
            return blocks_table(self.blocks, f"{self.spec} · {len(self.blocks)} blocks")
        return self.layers.rich_table(title=self.spec)


def inspect_model(
    spec: str,
    *,
    input_shape: Sequence[int] | None = None,
    weights: str | os.PathLike | None = None,
    task: str | None = None,
    trust_pickle: bool = False,
    show_blocks: bool = False,
) -> Inspection:
    """Load ``spec`` (:func:`netgraft.load_model`) and return its layer table, traced in
    execution order with output shapes when ``input_shape`` (one example's shape) is given;
    with ``show_blocks`` the :func:`netgraft.blocks` too, which the inspection then shows."""
    model = load_model(spec, weights=weights, trust_pickle=trust_pickle, task=task)
    example = input_for(model, tuple(input_shape)) if input_shape is not None else None
    table = layers(model, example)
    return Inspection(spec, table, blocks(model) if show_blocks else None)


def study_folder(
    model: str | nn.Module,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    control: str | nn.Module | None = None,
    size: int | None = None,
    run: RunOptions | None = None,
    **study_kwargs: Any,
) -> StudyResult:
    """:func:`netgraft.study` of ``model`` (a spec for :func:`netgraft.load_model`, with
    ``weights``, or a module) on the images in ``data_dir`` (``DIR/CLASS/*`` split per class,
    or ``DIR/train`` and ``DIR/val``), resized as the model expects or to ``size``, with
    ``control`` (a spec or a module) reused the same way; the results (and every finished
    trial, so a rerun resumes) are written to ``out_dir``. ``run`` and the other keywords
    (``reuse``, ``modes``, ``baseline``, ``seeds``, ``budget``, ``unit``) go to
    :func:`netgraft.study` as they are. A folder giving no validation images is a
    :class:`NetgraftError`."""
    if isinstance(model, str):
        model = load_model(model, weights=weights, trust_pickle=trust_pickle)
    split = image_folder(data_dir, model, size=size)
    if split.val is None:
        raise NetgraftError(
            f"{data_dir} gives no validation images; add DIR/val or more images per class"
        )
    if isinstance(control, str):
        control = load_model(control, trust_pickle=trust_pickle)
    return study(model, split.train, split.val, control=control, out_dir=out_dir, run=run,
                 **study_kwargs)  # fmt: skip


@dataclass
class GrowResult:
    """What :func:`grow_folder` did: the recorded operation (``{"op", "args"}``, as in the
    recipe) and the folder the grown model was saved to."""

    operation: dict[str, Any]
    folder: Path

    def summary(self) -> str:
        """One line: the operation with its recorded arguments, verified, and where it went."""
        args = ", ".join(
            f"{k}={v!r}" for k, v in self.operation["args"].items() if k != "output_shapes"
        )
        return f"{self.operation['op']}({args}) verified; saved to {self.folder}"


def grow_folder(
    model: str | nn.Module,
    out: str | os.PathLike,
    *,
    deepen: Any = None,
    widen: tuple[str, int] | None = None,
    expand_every: int | None = None,
    mode: str = "auto",
    activation: str | None = None,
    input_shape: Sequence[int] | None = None,
    weights: str | os.PathLike | None = None,
    task: str | None = None,
    trust_pickle: bool = False,
) -> GrowResult:
    """Grow ``model`` (a spec for :func:`netgraft.load_model`, or a module) by exactly one of:
    :func:`netgraft.deepen` after the ``deepen`` selector (``mode``, ``activation``),
    :func:`netgraft.widen` of ``widen = (layer, width)``, or
    :func:`netgraft.expand_blocks` copying every ``expand_every``-th block; each verifies
    that the function is unchanged (on a batch of two examples of ``input_shape`` when
    given). The grown model is saved to ``out``."""
    chosen = [
        name
        for name, v in (("deepen", deepen), ("widen", widen), ("expand_every", expand_every))
        if v is not None
    ]
    if len(chosen) != 1:
        raise NetgraftError(
            f"grow needs exactly one of deepen, widen, expand_every; found "
            f"{', '.join(chosen) or 'none'}"
        )
    if isinstance(model, str):
        model = load_model(model, weights=weights, trust_pickle=trust_pickle, task=task)
    example = input_for(model, tuple(input_shape), batch=2) if input_shape is not None else None
    if deepen is not None:
        deepen_op(model, deepen, mode=mode, activation=activation, example_input=example)
    elif widen is not None:
        widen_op(model, widen[0], widen[1], example_input=example)
    else:
        expand_blocks(model, every=expand_every, example_input=example)
    operation = recipe_of(model).operations[-1]
    return GrowResult(operation, save(model, out))


@dataclass
class TransferResult:
    """What :func:`transfer_folder` did: the transfer report and where the model went."""

    report: TransferReport
    folder: Path


def transfer_folder(
    src: str | os.PathLike | nn.Module,
    dst: str | nn.Module,
    out: str | os.PathLike,
    *,
    include: Any = None,
    exclude: Any = None,
    mapping: Mapping[str, str] | None = None,
    on_mismatch: str = "error",
    classes: Sequence[int] | None = None,
    input_shape: Sequence[int] | None = None,
    adopt_epsilon: bool = False,
    trust_pickle: bool = False,
    report_path: str | os.PathLike | None = None,
) -> TransferResult:
    """:func:`netgraft.transfer` from ``src`` (a weights file, a model spec or a module) into
    ``dst`` (a spec or a module), whose execution order is traced on one example of
    ``input_shape`` when given; the report is also written to ``report_path`` as JSON, then
    the destination is saved to ``out``."""
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        src = load_model(str(src), trust_pickle=trust_pickle)
    if isinstance(dst, str):
        dst = load_model(dst, trust_pickle=trust_pickle)
    report = transfer(
        src,
        dst,
        include=include,
        exclude=exclude,
        mapping=mapping,
        on_mismatch=on_mismatch,
        example_input=input_for(dst, tuple(input_shape)) if input_shape is not None else None,
        classes=classes,
        adopt_epsilon=adopt_epsilon,
        trust_pickle=trust_pickle,
    )
    if report_path is not None:
        report.to_json(report_path)
    return TransferResult(report, save(dst, out))


@dataclass
class FineTuneResult:
    """What :func:`fine_tune_folder` made: the saved folder, the training history and the
    class names (in label order)."""

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


@legacy(
    out="out_dir",
    weights="a module from netgraft.load_model(spec, weights=...)",
    trust_pickle="a module from netgraft.load_model(spec, trust_pickle=...)",
    cache="run=RunOptions(cache=...)",
    quiet="run=RunOptions(progress=not quiet)",
)
def fine_tune_folder(
    model: str | nn.Module,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_classes: int | None = None,
    config: FineTuneConfig | None = None,
    epochs: int = 3,
    augment: bool = False,
    size: int | None = None,
    batch_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_length: int = 128,
    run: RunOptions | None = None,
    **deprecated: Any,
) -> FineTuneResult:
    """Fine-tune ``model`` (a module, or a spec for :func:`netgraft.load_model`) on the
    class-per-folder images in ``data_dir`` and save it, servable, to ``out_dir``.

    ``seed`` seeds everything, the initial weights of the new head and of random layers
    included, so one seed gives one model. The images are split per class (``val_fraction``
    held out unless ``data_dir`` has ``train``/``val``), the head is replaced by one with
    ``num_classes`` outputs (default: one per class folder; another number is a
    :class:`DataError`), then :func:`netgraft.fine_tune` trains it as ``config`` says
    (a :class:`netgraft.FineTuneConfig`; None: the defaults) for ``epochs`` after the head
    stage, run as ``run`` says (:class:`~netgraft.RunOptions`: device, cache, progress,
    ...). ``out_dir`` gets the weights and recipe, ``history.json``/``.png`` and
    ``data.json``. ``data_dir`` may instead be a text table (``.csv``/``.jsonl`` with
    ``text`` and ``label``) for an ``hf:PATH`` model, tokenized to ``max_length``
    (:func:`netgraft.text_workflows.finetune_table`). The config's fields (and ``lr``:
    ``base_lr``), ``out``, ``weights``, ``trust_pickle``, ``cache`` and ``quiet`` as
    keywords are deprecated aliases.
    """
    torch.manual_seed(seed)  # before the model is built: its random layers too
    model, run = _old_fine_tune_keywords(model, run, deprecated, load=not is_text_table(data_dir))
    config = resolve_config(config, deprecated, "fine_tune_folder", renamed={"lr": "base_lr"})
    if is_text_table(data_dir):  # a CSV/JSONL text table: netgraft.text_workflows
        return finetune_table(model, data_dir, out_dir, num_classes=num_classes, config=config,
                              epochs=epochs, max_length=max_length, batch_size=batch_size,
                              val_fraction=val_fraction, seed=seed, run=run)  # fmt: skip
    split = image_folder(
        data_dir, model, size=size, augment=augment, val_fraction=val_fraction, seed=seed
    )
    replace_head(model, _head_size(num_classes, split.classes, data_dir))
    history = fine_tune(model, split.train, split.val, epochs=epochs, config=config,
                        batch_size=batch_size, seed=seed, run=run)  # fmt: skip
    folder = save(model, out_dir)
    history.save(folder)
    write_data_info(folder, split.classes, split.config)
    return FineTuneResult(folder, history, list(split.classes))


def _head_size(num_classes: int | None, classes: list[str], data_dir: Any) -> int:
    """The new head's outputs: one per class folder; ``num_classes`` must agree."""
    n = num_classes if num_classes is not None else len(classes)
    if n != len(classes):
        raise DataError(
            f"--num-classes {n} does not match the {len(classes)} class folders in {data_dir}"
        )
    return n


def _old_fine_tune_keywords(
    model: str | nn.Module, run: RunOptions | None, old: dict[str, Any], load: bool = True
) -> tuple[Any, RunOptions]:
    """The model (loaded from its spec when ``load``) and the run options with
    :func:`fine_tune_folder`'s old keywords folded in (the config's fields are left for the
    config)."""
    loading = {k: old.pop(k) for k in ("weights", "trust_pickle") if k in old}
    model = load_model(model, **loading) if load and isinstance(model, str) else model
    run = run_options(run, {k: old.pop(k) for k in ("cache", "quiet") if k in old})
    return model, run


finetune_folder = renamed_function(fine_tune_folder, "finetune_folder")


def evaluate_folder(
    folder: str | os.PathLike, data_dir: str | os.PathLike, *, batch_size: int = 64
) -> dict[str, Any]:
    """Loss, accuracy and count (``{"loss", "acc", "n"}``, :func:`netgraft.evaluate`) of the
    model in a servable ``folder`` on every image of the class-per-folder ``data_dir``; a
    class folder the model was not trained on is a :class:`DataError`. A text table
    (``.csv``/``.jsonl``) scores a text model (:func:`netgraft.text_workflows.evaluate_table`)."""
    if is_text_table(data_dir):
        return evaluate_table(folder, data_dir, batch_size=batch_size)
    classes, config = read_data_info(folder)
    model = load_saved(folder)
    return evaluate(model, labelled_images(data_dir, config, classes), batch_size=batch_size)


def predict_files(
    folder: str | os.PathLike, images: Sequence[str | os.PathLike], *, k: int = 3
) -> dict[str, list[dict[str, Any]]]:
    """The top-``k`` classes of the model in a servable ``folder`` for each image file, read
    and transformed as at training time: ``{path: [{"class": name, "prob": p}, ...]}`` in the
    order of ``images``, most probable first, probabilities rounded to 6 digits. A text
    model takes text tables instead: one entry per row, ``TABLE:ROW``
    (:func:`netgraft.text_workflows.predict_table`)."""
    if read_text_info(folder) is not None:
        return {key: top for t in images for key, top in predict_table(folder, t, k=k).items()}
    classes, config = read_data_info(folder)
    model = load_saved(folder)
    tf = image_transform(config)
    batch = torch.stack([tf(load_image(p, config.input_size[0])) for p in images])
    probs, indices = predict(model, batch, k=k)
    return {
        str(p): [
            {"class": classes[i], "prob": round(float(q), 6)}
            for q, i in zip(pr.tolist(), ix.tolist(), strict=True)
        ]
        for p, pr, ix in zip(images, probs, indices, strict=True)
    }


PRETRAIN_TASKS = ("pairs", "corrupt", "layerwise")


@dataclass
class PretrainResult:
    """What :func:`pretrain_folder` made: the saved folder, the task and what it reached
    (``details``: the auxiliary result's data, or the layer-wise records)."""

    folder: Path
    task: str
    details: dict[str, Any]

    def summary(self) -> str:
        """One line: the task, its last scores, where the model was saved."""
        if self.task == "layerwise":
            layers_done = self.details["layers"]
            what = f"layer-wise pretrained {len(layers_done)} layers"
            if layers_done:
                last = layers_done[-1]
                what += f" (last {last['layer']}: loss {last['first_loss']:.4f} → {last['last_loss']:.4f})"
        else:
            last = self.details.get("last", {})
            scores = ", ".join(f"{k} {last[k]:.4f}" for k in ("acc", "val_acc") if k in last)
            what = (
                f"auxiliary {self.task} ({self.details['aux_head']}) on "
                f"{self.details['examples']:,} examples: {scores}"
            )
        return f"{what}; saved to {self.folder}"


@legacy(
    out="out_dir",
    weights="a module from netgraft.load_model(spec, weights=...)",
    trust_pickle="a module from netgraft.load_model(spec, trust_pickle=...)",
    aux_head="task=AuxiliaryTask(..., aux_head=...)",
    pairs="task=AuxiliaryTask(..., pairs=...)",
    copies="task=AuxiliaryTask(..., copies=...)",
    quiet="run=RunOptions(progress=not quiet)",
)
def pretrain_folder(
    model: str | nn.Module,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    task: str | AuxiliaryTask,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    run: RunOptions | None = None,
    **legacy_kwargs: Any,
) -> PretrainResult:
    """Pretrain ``model`` (a module, or a spec for :func:`netgraft.load_model`) on the images
    of the class-per-folder ``data_dir`` and save it to ``out_dir`` (weights and recipe,
    with ``pretrain.json`` and, for auxiliary tasks, ``history.json``/``.png``).

    ``task="pairs"``: the folders are the groups (same folder or not,
    :func:`netgraft.pretrain_auxiliary`); ``"corrupt"``: folders are ignored, each image is
    told from copies with shuffled patches (an :class:`~netgraft.AuxiliaryTask` gives
    either its own settings); ``"layerwise"``: each layer as an autoencoder
    (:func:`netgraft.pretrain_layerwise`, ``epochs`` per layer). ``val_fraction`` of each
    folder is held out to measure the auxiliary task. ``run`` says how to run
    (:class:`~netgraft.RunOptions`). The head is kept as it is, ready for
    ``netgraft finetune OUT``.
    """
    name = task.name if isinstance(task, AuxiliaryTask) else task
    if name not in PRETRAIN_TASKS:
        raise NetgraftError(f"task must be one of {', '.join(PRETRAIN_TASKS)}; found {task!r}")
    torch.manual_seed(seed)  # before the model is built: its random layers too
    model, task, run = _old_pretrain_keywords(model, task, run, legacy_kwargs)
    split = image_folder(data_dir, model, size=size, val_fraction=val_fraction, seed=seed)
    if name == "layerwise":
        records = pretrain_layerwise(model, split.train, epochs_per_layer=epochs, lr=lr,
                                     batch_size=batch_size, seed=seed, run=run)  # fmt: skip
        details: dict[str, Any] = {"task": name, **records.to_dict()}
        history = None
    else:
        result = pretrain_auxiliary(model, split.train, split.val, task=task, epochs=epochs,
                                    lr=lr, batch_size=batch_size, seed=seed, run=run)  # fmt: skip
        details, history = result.to_dict(), result.history
    folder = save(model, out_dir)
    if history is not None:
        history.save(folder)
    text = json.dumps(details, indent=2, default=str)
    atomic_write(Path(folder) / "pretrain.json", lambda p: p.write_text(text))
    return PretrainResult(Path(folder), name, details)


def _old_pretrain_keywords(
    model: str | nn.Module, task: Any, run: RunOptions | None, old: dict[str, Any]
) -> tuple[nn.Module, Any, RunOptions]:
    """The model (loaded from its spec), the task and the run options with
    :func:`pretrain_folder`'s old keywords folded in."""
    loading = {k: old.pop(k) for k in ("weights", "trust_pickle") if k in old}
    fields = {k: old.pop(k) for k in ("aux_head", "pairs", "copies") if k in old}
    if fields and task != "layerwise":
        spec = task if isinstance(task, AuxiliaryTask) else AuxiliaryTask(task)
        task = dataclasses.replace(spec, **fields)
    model = load_model(model, **loading) if isinstance(model, str) else model
    return model, task, run_options(run, old)


def __getattr__(name: str) -> Any:
    """``FinetuneResult``, the old name of :class:`FineTuneResult`, warns and resolves."""
    if name == "FinetuneResult":
        warn_deprecated("netgraft.workflows.FinetuneResult", "FineTuneResult")
        return FineTuneResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
