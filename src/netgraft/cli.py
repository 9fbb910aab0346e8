"""The ``netgraft`` command line: thin commands over the library, no logic of their own.

Each command parses its arguments, calls one library function (most live in
:mod:`netgraft.workflows`) and prints what it returns. Library modules are imported at the
top: this module lives inside the package, so ``netgraft/__init__`` (torch and all) is
imported before it anyway, and command-local imports would save nothing (measured: about
10 ms of ``netgraft --help``'s 1.5 s import time is this module's own).

Every error a user can cause is printed as one line (``netgraft: error: ...``) with a
non-zero exit code, never a traceback (set ``NETGRAFT_DEBUG=1`` to see one).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from .demo import run_demo
from .errors import NetgraftError
from .options import RunOptions
from .pretrain import AuxiliaryTask
from .train import FineTuneConfig
from .workflows import (
    evaluate_folder,
    fine_tune_folder,
    grow_folder,
    inspect_model,
    predict_files,
    pretrain_folder,
    study_folder,
    transfer_folder,
)
from .zoo import load_model

try:  # recent typer vendors its own click; its exceptions are the ones raised
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer uses click itself
    import click

app = typer.Typer(
    name="netgraft",
    help="Reuse trained neural networks without breaking them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# options several commands share, declared once so their flags and help never drift apart
_WEIGHTS_OPTION = typer.Option(None, "--weights", help=".safetensors or .pt/.pth weights file")
_TRUST_PICKLE_OPTION = typer.Option(
    False, "--trust-pickle", help="allow weights files that need full unpickling"
)


@app.callback()
def _root() -> None:
    """Reuse trained neural networks without breaking them."""


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"3,224,224"`` -> ``(3, 224, 224)``; a clear error for anything else."""
    if text is None:
        return None
    text = text.strip()
    if not re.fullmatch(r"\d+([,x]\d+)*", text) or any(int(p) <= 0 for p in re.split("[,x]", text)):
        raise NetgraftError(
            f"--input-shape must be positive integers like 3,224,224; found {text!r}"
        )
    shape = tuple(int(p) for p in re.split("[,x]", text))
    return shape


@app.command()
def inspect(
    spec: str = typer.Argument(
        ..., help="torchvision:NAME, timm:NAME, hf:PATH, gguf:PATH, file.py:fn or a saved folder"
    ),
    input_shape: str | None = typer.Option(
        None,
        "--input-shape",
        help="per-example input shape, e.g. 3,224,224 (or a token count for text models)",
    ),
    weights: Path | None = _WEIGHTS_OPTION,
    show_blocks: bool = typer.Option(
        False, "--blocks", help="list the blocks (coarse units) instead of layers"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    task: str | None = typer.Option(
        None, "--task", help="Hugging Face task model, e.g. sequence-classification"
    ),
    trust_pickle: bool = _TRUST_PICKLE_OPTION,
) -> None:
    """Print the layer table (execution order and output shapes with --input-shape) or the blocks."""
    view = inspect_model(
        spec,
        input_shape=parse_shape(input_shape),
        weights=weights,
        task=task,
        trust_pickle=trust_pickle,
        show_blocks=show_blocks,
    )
    if as_json:
        print(json.dumps(view.to_dict(), indent=2))
        return
    _console().print(view.rich_table())


@app.command()
def grow(
    spec: str = typer.Argument(
        ..., help="torchvision:NAME, timm:NAME, hf:PATH, gguf:PATH, file.py:fn or a saved folder"
    ),
    out: Path = typer.Option(..., "-o", "--out", help="folder to save the grown model to"),
    deepen: str | None = typer.Option(
        None, "--deepen", help="insert a function-preserving layer after this module (selector)"
    ),
    widen: str | None = typer.Option(
        None, "--widen", help="widen a Linear/Conv2d: LAYER:WIDTH, e.g. features.0.0:48"
    ),
    expand_every: int | None = typer.Option(
        None, "--expand-every", help="copy every K-th transformer block (zeroed or gated)"
    ),
    mode: str = typer.Option("auto", "--mode", help="deepen mode: auto, identity or residual"),
    activation: str | None = typer.Option(
        None, "--activation", help="deepen: activation after the new layer (relu, gelu, ...)"
    ),
    input_shape: str | None = typer.Option(
        None, "--input-shape", help="per-example input shape to trace and verify with, e.g. 3,64,64"
    ),
    weights: Path | None = _WEIGHTS_OPTION,
    task: str | None = typer.Option(None, "--task", help="Hugging Face task model, e.g. causal-lm"),
    trust_pickle: bool = _TRUST_PICKLE_OPTION,
) -> None:
    """Grow a model without changing what it computes (verified), then save it to OUT."""
    chosen = [
        flag
        for flag, v in (("--deepen", deepen), ("--widen", widen), ("--expand-every", expand_every))
        if v is not None
    ]
    if len(chosen) != 1:
        raise NetgraftError(
            f"grow needs exactly one of --deepen, --widen, --expand-every; found "
            f"{', '.join(chosen) or 'none'}"
        )
    widen_to = None
    if widen is not None:
        layer, _, width = widen.rpartition(":")
        if not layer or not width.strip().isdigit():
            raise NetgraftError(f"--widen takes LAYER:WIDTH, e.g. fc1:64; found {widen!r}")
        widen_to = (layer, int(width))
    result = grow_folder(
        spec,
        out,
        deepen=deepen,
        widen=widen_to,
        expand_every=expand_every,
        mode=mode,
        activation=activation,
        input_shape=parse_shape(input_shape),
        weights=weights,
        task=task,
        trust_pickle=trust_pickle,
    )
    _console().print(result.summary(), markup=False)


@app.command("transfer")
def transfer_cmd(
    src: str = typer.Argument(
        ..., help="weights file (.safetensors/.pt/.pth/.bin/.h5/.keras/.onnx) or a model spec"
    ),
    dst_spec: str = typer.Argument(..., help="destination model spec, e.g. torchvision:resnet18"),
    out: Path = typer.Option(..., "-o", "--out", help="folder to save the destination model to"),
    include: list[str] | None = typer.Option(
        None, "--include", help="destination selector to load (repeatable)"
    ),
    exclude: list[str] | None = typer.Option(
        None, "--exclude", help="destination selector to leave as initialised (repeatable)"
    ),
    maps: list[str] | None = typer.Option(
        None, "--map", help="explicit pairing DST=SRC (regexes, \\1 groups; repeatable)"
    ),
    on_mismatch: str = typer.Option("error", "--on-mismatch", help="error, skip or adapt"),
    classes: str | None = typer.Option(
        None, "--classes", help="adapt: source classifier rows to keep, e.g. 3,7,9"
    ),
    report_path: Path | None = typer.Option(
        None, "--report", help="also write the transfer report as JSON"
    ),
    input_shape: str | None = typer.Option(
        None, "--input-shape", help="trace the destination's execution order, e.g. 3,224,224"
    ),
    adopt_epsilon: bool = typer.Option(
        False, "--adopt-epsilon", help="set normalisation epsilons to the source's"
    ),
    trust_pickle: bool = _TRUST_PICKLE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the summary line"),
) -> None:
    """Copy every weight that fits from SRC into DST_SPEC, print the report, save to OUT."""
    result = transfer_folder(
        src,
        dst_spec,
        out,
        include=include or None,
        exclude=exclude or None,
        mapping=_mapping(maps),
        on_mismatch=on_mismatch,
        classes=_int_list(classes, "--classes"),
        input_shape=parse_shape(input_shape),
        adopt_epsilon=adopt_epsilon,
        trust_pickle=trust_pickle,
        report_path=report_path,
    )
    console = _console()
    if quiet:
        console.print(result.report.summary(), markup=False)
    else:
        console.print(result.report.table())
    console.print(f"saved to {result.folder}", markup=False)


def _mapping(maps: list[str] | None) -> dict[str, str] | None:
    """``--map DST=SRC`` options as transfer's mapping (None when none was given)."""
    mapping: dict[str, str] = {}
    for item in maps or []:
        dst_pat, sep, src_pat = item.partition("=")
        if not sep or not dst_pat:
            raise NetgraftError(f"--map takes DST=SRC, e.g. fc=head; found {item!r}")
        mapping[dst_pat] = src_pat
    return mapping or None


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NetgraftError(f"{flag} takes integers like 1,2,3; found {text!r}") from None


_WORKERS_OPTION = typer.Option(
    None, "--workers", help="run the trials in N local processes (default: one by one)"
)
_RAY_OPTION = typer.Option(
    None,
    "--ray",
    metavar="ADDRESS",
    help="run the trials as Ray tasks: 'local' (a local Ray, or RAY_ADDRESS when set), "
    "'auto' (the running cluster) or HOST:PORT / ray://HOST:PORT",
)


@app.command("study")
def study_cmd(
    spec: str = typer.Argument(
        ..., help="the trained source model: file.py:fn, a saved folder, torchvision:NAME, ..."
    ),
    data: Path = typer.Option(
        ..., "--data", help="target images: DIR/CLASS/*.png, or DIR/train and DIR/val"
    ),
    out: Path = typer.Option(Path("study-out"), "-o", "--out", help="folder for the results"),
    reuse: str | None = typer.Option(
        None, "--reuse", help="counts of units to reuse, e.g. 1,2,3 (default: all before the head)"
    ),
    modes: str = typer.Option(
        "frozen,fine-tuned", "--modes", help="frozen, fine-tuned, surgical (unit k), lora (top k)"
    ),
    unit: str = typer.Option("block", "--unit", help="count blocks or layers"),
    control: str | None = typer.Option(
        None, "--control", help="a model trained on the target task, reused the same way"
    ),
    seeds: int = typer.Option(3, "--seeds", help="runs per setting (mean and std)"),
    epochs: int = typer.Option(5, "--epochs", help="training epochs of every run (the budget)"),
    lr: float = typer.Option(1e-3, "--lr", help="learning rate of every run"),
    batch_size: int = typer.Option(32, "--batch-size", help="batch size"),
    size: int | None = typer.Option(None, "--size", help="input image side (default: the model's)"),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="skip the from-scratch runs"),
    weights: Path | None = _WEIGHTS_OPTION,
    trust_pickle: bool = _TRUST_PICKLE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the table"),
    workers: int | None = _WORKERS_OPTION,
    ray: str | None = _RAY_OPTION,
) -> None:
    """How many layers to reuse: train copies of SPEC reusing its first k blocks (frozen or
    fine-tuned) on the images in --data; print the table, write study.json/.csv/.png.
    Finished trials are kept in --out: running the same study again resumes it."""
    address = None if ray in (None, "local") else ray
    backend = "ray" if ray is not None else "local"
    run = RunOptions(progress=not quiet, workers=workers, backend=backend, ray_address=address)
    result = study_folder(
        spec,
        data,
        out,
        weights=weights,
        trust_pickle=trust_pickle,
        control=control,
        size=size,
        run=run,
        reuse=_int_list(reuse, "--reuse"),
        modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
        baseline=not no_baseline,
        seeds=seeds,
        budget={"epochs": epochs, "lr": lr, "batch_size": batch_size},
        unit=unit,
    )
    console = _console()
    console.print(result.rich_table(title=f"{spec} → {data}"))
    console.print(f"wrote {out}/study.json, study.csv, study.png", markup=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "-o", "--out", help="folder for the results"),
    quick: bool = typer.Option(False, "--quick", help="a small run (one size, two seeds)"),
    threads: int = typer.Option(1, "--threads", help="CPU threads for torch"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the table"),
) -> None:
    """Reuse a CNN trained on MNIST digits 0–4 to learn 5–9 from 10, 30 and 100 images per
    class: scratch vs frozen vs fine-tuned vs grown, with and without the feature cache."""
    err = Console(stderr=True, highlight=False)
    started = time.perf_counter()
    result = run_demo(
        out,
        quick=quick,
        threads=threads,
        progress=None if quiet else (lambda line: err.print(line, markup=False)),
    )
    console = _console()
    console.print(result.rich_table())
    console.print(
        f"wrote {out}/results.json and {out}/results.png in {time.perf_counter() - started:.0f}s",
        markup=False,
    )


# fine-tuning options: one per FineTuneConfig field; None takes the config's default, so the
# defaults live in the dataclass only (the help shows them)
_FT = FineTuneConfig()
_HEAD_OPTION = typer.Option(None, "--head", help="selector of the head (default: found)")
_HEAD_EPOCHS_OPTION = typer.Option(
    None, "--head-epochs", help=f"epochs training only the head (default: {_FT.head_epochs})"
)
_BASE_LR_OPTION = typer.Option(
    None, "--lr", "--base-lr", help=f"base rate, halved after the head (default: {_FT.base_lr})"
)
_HEAD_LR_OPTION = typer.Option(
    None, "--head-lr", help=f"rate of the head stage (default: {_FT.head_lr})"
)
_LR_MULT_OPTION = typer.Option(
    None, "--lr-mult", help=f"top/bottom learning-rate ratio (default: {_FT.lr_mult})"
)
_UNFREEZE_OPTION = typer.Option(
    None, "--unfreeze", help=f"all or gradual (default: {_FT.unfreeze})"
)
_BN_OPTION = typer.Option(
    None, "--bn", help=f"frozen norm layers: eval, train or frozen (default: {_FT.bn})"
)
_TRAIN_BN_OPTION = typer.Option(
    None, "--train-bn/--no-train-bn", help=f"unfreeze batch norms too (default: {_FT.train_bn})"
)
_FREEZE_OPTION = typer.Option(
    None, "--freeze", help="selector of layers that stay frozen throughout"
)
_SCHEDULER_OPTION = typer.Option(
    None, "--scheduler", help=f"onecycle, cosine or constant (default: {_FT.scheduler})"
)
_SEARCH_OPTION = typer.Option(
    None,
    "--search/--no-search",
    help="choose the setting on a held-out fifth of the training data, every fifth in turn "
    "until 100 examples are scored (about 3x the compute, up to 12x on small data); "
    f"--no-search runs the rates given (default: {'--search' if _FT.search else '--no-search'})",
)
_FT_DATA_OPTION = typer.Option(
    ...,
    "--data",
    help="image folder: DIR/CLASS/*.png, or DIR/train + DIR/val; or a text table "
    "(.csv/.jsonl with text and label columns) for an hf:PATH model",
)
_AUGMENT_OPTION = typer.Option(False, "--augment", help="random flips, crops, colour jitter")
_FT_EPOCHS_OPTION = typer.Option(3, "--epochs", help="epochs after the head is trained")
_MAX_LENGTH_OPTION = typer.Option(128, "--max-length", help="tokens per text (text tables)")
_NUM_CLASSES_OPTION = typer.Option(
    None, "--num-classes", help="classes of the new head (default: the class folders)"
)
_FINETUNE_CACHE_OPTION = typer.Option(
    None,
    "--cache/--no-cache",
    help="cache frozen-layer outputs: --cache insists (error if it cannot), --no-cache "
    "never; default: when it applies",
)


def finetune_config(**options: Any) -> FineTuneConfig:
    """A :class:`netgraft.FineTuneConfig` of the options given (None: the config's default)."""
    return FineTuneConfig(**{k: v for k, v in options.items() if v is not None})


@app.command()
def finetune(
    spec: str = typer.Argument(
        ..., help="torchvision:NAME, timm:NAME, hf:PATH, gguf:PATH, file.py:fn or a saved folder"
    ),
    data: Path = _FT_DATA_OPTION,
    out: Path = typer.Option(..., "-o", "--out", help="folder to save model, history, plot"),
    weights: Path | None = _WEIGHTS_OPTION,
    num_classes: int | None = _NUM_CLASSES_OPTION,
    epochs: int = _FT_EPOCHS_OPTION,
    head: str | None = _HEAD_OPTION,
    head_epochs: int | None = _HEAD_EPOCHS_OPTION,
    lr: float | None = _BASE_LR_OPTION,
    head_lr: float | None = _HEAD_LR_OPTION,
    lr_mult: float | None = _LR_MULT_OPTION,
    unfreeze: str | None = _UNFREEZE_OPTION,
    bn: str | None = _BN_OPTION,
    train_bn: bool | None = _TRAIN_BN_OPTION,
    freeze_sel: str | None = _FREEZE_OPTION,
    scheduler: str | None = _SCHEDULER_OPTION,
    search: bool | None = _SEARCH_OPTION,
    augment: bool = _AUGMENT_OPTION,
    size: int | None = typer.Option(None, "--size", help="input side in pixels (default: model's)"),
    batch_size: int = typer.Option(32, "--batch-size"),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="used without a val folder"),
    seed: int = typer.Option(0, "--seed"),
    cache: bool | None = _FINETUNE_CACHE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or epoch lines"),
    trust_pickle: bool = _TRUST_PICKLE_OPTION,
    max_length: int = _MAX_LENGTH_OPTION,
) -> None:
    """Fine-tune a model on an image folder or a text table (new head first, then unfreeze)
    and save it to OUT with its history (JSON + PNG) and class names."""
    config = finetune_config(
        head=head, head_epochs=head_epochs, base_lr=lr, head_lr=head_lr, lr_mult=lr_mult,
        unfreeze=unfreeze, bn=bn, train_bn=train_bn, keep_frozen=freeze_sel, scheduler=scheduler,
        search=search,
    )  # fmt: skip
    loaded = weights is not None or trust_pickle
    model = load_model(spec, weights=weights, trust_pickle=trust_pickle) if loaded else spec
    result = fine_tune_folder(
        model,
        data,
        out,
        config=config,
        epochs=epochs,
        augment=augment,
        size=size,
        batch_size=batch_size,
        val_fraction=val_fraction,
        seed=seed,
        num_classes=num_classes,
        run=RunOptions(cache="auto" if cache is None else cache, progress=not quiet),
        max_length=max_length,
    )
    _console().print(result.summary(), markup=False)


@app.command()
def pretrain(
    spec: str = typer.Argument(
        ..., help="torchvision:NAME, timm:NAME, hf:PATH, gguf:PATH, file.py:fn or a saved folder"
    ),
    data: Path = typer.Option(..., "--data", help="image folder DIR/CLASS/*.png"),
    out: Path = typer.Option(..., "-o", "--out", help="folder to save the pretrained model to"),
    task: str = typer.Option(
        ...,
        "--task",
        help="pairs (same folder or not?), corrupt (real or patches shuffled?) or layerwise "
        "(each layer as an autoencoder)",
    ),
    aux_head: str = typer.Option(
        "auto", "--aux-head", help="pairs: distance or concat; corrupt: binary or margin"
    ),
    epochs: int = typer.Option(3, "--epochs", help="epochs (per layer for layerwise)"),
    lr: float = typer.Option(1e-3, "--lr"),
    batch_size: int = typer.Option(64, "--batch-size"),
    pairs: int | None = typer.Option(None, "--pairs", help="pairs to draw (default: 2 per image)"),
    copies: int = typer.Option(1, "--copies", help="corrupted copies of each image"),
    size: int | None = typer.Option(None, "--size", help="input side in pixels (default: model's)"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="held out to measure the task"),
    seed: int = typer.Option(0, "--seed"),
    weights: Path | None = _WEIGHTS_OPTION,
    trust_pickle: bool = _TRUST_PICKLE_OPTION,
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or epoch lines"),
) -> None:
    """Pretrain a model's body on an auxiliary task from an image folder (the head is kept),
    then save it to OUT, ready for netgraft finetune OUT."""
    auxiliary = task in ("pairs", "corrupt")
    how = AuxiliaryTask(task, aux_head, pairs, copies=copies) if auxiliary else task
    loaded = weights is not None or trust_pickle  # else built inside, after seeding
    result = pretrain_folder(
        load_model(spec, weights=weights, trust_pickle=trust_pickle) if loaded else spec,
        data,
        out,
        task=how,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        size=size,
        val_fraction=val_fraction,
        seed=seed,
        run=RunOptions(progress=not quiet),
    )
    _console().print(result.summary(), markup=False)


@app.command("evaluate")
def evaluate_cmd(
    folder: Path = typer.Argument(..., help="a folder written by netgraft finetune"),
    data: Path = typer.Option(
        ..., "--data", help="image folder DIR/CLASS/*.png, or a text table, to score"
    ),
    batch_size: int = typer.Option(64, "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Loss and accuracy of a fine-tuned model on a class-per-folder image set."""
    scores = evaluate_folder(folder, data, batch_size=batch_size)
    if as_json:
        print(json.dumps(scores))
        return
    _console().print(
        f"{scores['n']} {'texts' if data.suffix.lower() in ('.csv', '.jsonl') else 'images'} · loss {scores['loss']:.4f} · acc {scores['acc']:.4f}",
        markup=False,
    )


@app.command("predict")
def predict_cmd(
    folder: Path = typer.Argument(..., help="a folder written by netgraft finetune"),
    images: list[Path] = typer.Argument(..., help="image files (text tables for a text model)"),
    top_k: int = typer.Option(3, "--top-k", "-k", help="how many classes to show per image"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Top-k classes (names and probabilities) of a fine-tuned model for each image."""
    result = predict_files(folder, images, k=top_k)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console = _console()
    for path, top in result.items():
        shown = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in top)
        console.print(f"{path}: {shown}", markup=False)


def main() -> None:
    """Console entry point: run the app, turning user errors into one line and exit code 1."""
    debug = bool(os.environ.get("NETGRAFT_DEBUG"))
    command = typer.main.get_command(app)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        code = command.main(prog_name="netgraft", standalone_mode=False)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("netgraft: aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("netgraft: interrupted")
        sys.exit(130)
    except NetgraftError as exc:
        if debug:
            raise
        err.print(f"netgraft: error: {exc}", markup=False)
        sys.exit(1)
    except Exception as exc:  # an unexpected failure is still one line for the user
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        err.print(
            f"netgraft: error: {type(exc).__name__}: {first} (set NETGRAFT_DEBUG=1 for a traceback)",
            markup=False,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
