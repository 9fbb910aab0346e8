"""The study's steps: check the arguments, plan the settings and their trials, read back
the trials an earlier run finished, share one frozen pass among the frozen trials, run the
rest (here, in worker processes or on Ray) with a progress bar, and gather the rows.

:func:`study` is the public entry point (see :mod:`netgraft.study`). This module never
changes the source or control model and writes only into ``out_dir`` (results, trial
files, shared features) or the ``cache_dir`` it is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn
from torch.utils.data import default_collate

from ..data.batches import input_of, split_example
from ..deprecation import legacy
from ..errors import NetgraftError
from ..heads import find_head
from ..layers import blocks, head_block_index, layers
from ..options import BACKENDS, RunOptions, run_options
from ..results import seeded_row
from .lora import LORA_MODE, check_lora, lora_block_names, split_lora_budget
from .result import StudyResult, recommend
from .resume import TrialStore, study_key
from .runners import connect_ray, run_trials
from .shared import share_frozen_pass, share_lora_bottoms
from .trials import MODES, STUDY_MODES, Trial, TrialContext, TrialResult

__all__ = ["BACKENDS", "study"]

log = logging.getLogger("netgraft.study")

UNITS = ("block", "layer")
# the RunOptions fields a study reads, also taken as keywords the old way
_STUDY_RUN = ("workers", "backend", "ray_address", "threads", "shared_pass", "cache_dir")
_BUDGET_DEFAULTS: dict[str, Any] = {"epochs": 5, "lr": 1e-3, "batch_size": 32}
Setting = tuple[str, str, int]


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


def _num_classes(train: Any, val: Any) -> int:
    """The target's number of classes: ``train.classes``, else the largest label of the
    training and validation data + 1 (the second item of an example, or its ``labels``)."""
    classes = getattr(train, "classes", None)
    if classes is not None:
        return len(classes)
    found = []
    for data in (train, val):
        labels = _labels(data)
        if labels is None:  # an example is (x, y), or a Hugging Face dict with its labels
            labels = torch.as_tensor([int(split_example(item)[1]) for item in data])
        found.append(labels)
    if found[0].numel() == 0:
        raise NetgraftError("the target training data is empty; the study needs examples")
    return int(max(int(labels.max()) for labels in found if labels.numel())) + 1


def _budget(budget: int | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(budget, bool) or not isinstance(budget, (int, Mapping)):
        raise NetgraftError(
            f"budget must be a number of epochs or a dict of fit arguments; found {budget!r}"
        )
    out = dict(_BUDGET_DEFAULTS)
    out.update({"epochs": budget} if isinstance(budget, int) else dict(budget))
    reserved = {"seed", "cache", "quiet", "progress", "resume", "run"} & set(out)
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
    """The counts ``k`` each mode but ``"lora"`` runs: units reused before the head (frozen,
    fine-tuned), or the unit tuned, the head's units included (surgical)."""
    limit = head_block_index(units, find_head(model)[0])
    out = {}
    for mode in (m for m in modes if m != LORA_MODE):
        surgical = mode == "surgical"
        top = len(units) if surgical else limit
        asked = range(1, top + 1) if reuse is None else reuse
        what = "one of which is tuned" if surgical else "before the head"
        out[mode] = _check_reuse(asked, top, unit, unit_names, what)
    return out


def _example(data: Any) -> Any:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return torch.as_tensor(data[0][:1])
    return default_collate([input_of(data[0])])  # a Hugging Face example: a dict


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


def _settings(
    modes: Sequence[str], ks: Mapping[str, list[int]], baseline: bool, control: bool
) -> list[Setting]:
    """The settings to run, in table order: ``(model name, mode, k)``; from scratch first
    (with ``baseline`` or when ``k = 0`` is asked for), then the source, then the control,
    each per mode and its ``ks``."""
    plan: list[Setting] = []
    if baseline or any(0 in counts for counts in ks.values()):
        plan.append(("scratch", "scratch", 0))
    for name in ("source", "control") if control else ("source",):
        plan += [(name, mode, k) for mode in modes for k in ks[mode] if k > 0]
    return plan


class _Tracker:
    """Records finished trials: the trial file, the progress bar, and a line per row once
    all its seeds are in."""

    def __init__(self, results, store, seeds, progress_bar, say):
        self.results: dict[Trial, TrialResult] = results
        self.store: TrialStore | None = store
        self.seeds, self.bar, self.say = seeds, progress_bar, say
        self.task = progress_bar.add_task("study trials", total=None, info="")

    def start(self, total: int) -> None:
        self.bar.update(self.task, total=total, completed=0)

    def __call__(self, trial: Trial, result: TrialResult) -> None:
        self.results[trial] = result
        if self.store is not None:
            self.store.save(trial, result)
        self.bar.update(self.task, advance=1, info=f"{trial.name} acc {result.acc:.4f}")
        if all(Trial(*trial.setting, seed) in self.results for seed in range(self.seeds)):
            row = _row(trial.setting, self.results, self.seeds, None)
            self.say(
                f"{trial.model:<7} {trial.mode:<10} k={trial.k:<2} acc {row['acc_mean']:.4f} ± "
                f"{row['acc_std']:.4f} · {row['trained_params']:,} trained · "
                f"{row['seconds']:.2f}s/run"
            )


def _row(
    setting: Setting,
    results: Mapping[Trial, TrialResult],
    seeds: int,
    names: Mapping[str, list[str]] | None,
) -> dict[str, Any]:
    """The row of ``setting`` over its seeds; ``reused_up_to`` (with ``names``, the names
    each mode's ``k`` counts, by mode) is the name of unit ``k``."""
    model, mode, k = setting
    key = {"model": model, "mode": mode, "k": k}
    if names is not None:
        key["reused_up_to"] = names[mode][k - 1] if k > 0 else None
    got = [results[Trial(*setting, seed)] for seed in range(seeds)]
    row = seeded_row(key, lambda seed: (got[seed].acc, got[seed].trained_params), range(seeds))
    row["seconds"] = round(sum(r.seconds for r in got) / seeds, 3)  # the trials' own times
    return row


@contextlib.contextmanager
def _trial_bar(quiet: bool) -> Iterator[Progress]:
    """A transient progress bar over trials with the time left (disabled when quiet)."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True, highlight=False),
        transient=True,
        disable=quiet,
    )
    with bar:
        yield bar


def _lines(bar: Progress, show: bool) -> Callable[[str], None]:
    """Where a study's lines go: the ``netgraft.study`` log, and above the bar when shown."""

    def say(line: str) -> None:
        log.info(line)
        if show:
            bar.console.print(line, markup=False, highlight=False, soft_wrap=True)

    return say


@contextlib.contextmanager
def _features_dir(cache_dir: Any, out_dir: Any) -> Iterator[Path]:
    """Where the shared features go: ``cache_dir``, else ``out_dir/features`` (kept for a
    resumed run), else a temporary folder removed afterwards."""
    if cache_dir is not None or out_dir is not None:
        yield Path(cache_dir) if cache_dir is not None else Path(out_dir) / "features"
        return
    with tempfile.TemporaryDirectory(prefix="netgraft-study-") as tmp:
        yield Path(tmp)


def _share(ctx: TrialContext, todo: list[Trial], root: Path) -> None:
    """Run the shared passes for the trials still to run and record them in ``ctx``: the
    frozen pass (frozen and surgical trials), the bottoms of the lora settings."""
    if any(t.mode == LORA_MODE for t in todo):
        ctx.features_dir = str(root)
        ctx.stores = share_lora_bottoms(ctx, todo, root)
        log.info("shared lora bottoms: %d feature store(s)", len(ctx.stores))
    if not any(t.mode in ("frozen", "surgical") for t in todo):
        return
    shared = share_frozen_pass(ctx, todo, root)
    ctx.features_dir, ctx.cuts, ctx.val_cached = str(root), shared.cuts, shared.val_cached
    ctx.stores = sorted({*ctx.stores, *shared.stores})
    log.info(
        "shared frozen pass: %d cut point(s) for %d setting(s) in %d pass(es), %.2fs "
        "(finding the cut points %.2fs)",
        len(set(shared.cuts.values())),
        len(shared.cuts),
        shared.passes,
        shared.pass_seconds,
        shared.probe_seconds,
    )


def _run(
    ctx: TrialContext,
    plan: list[Setting],
    seeds: int,
    key_settings: dict[str, Any],
    where: tuple[Any, RunOptions, Any],
    say: Callable[[str], None] | None,
) -> tuple[dict[Trial, TrialResult], int]:
    """Every trial of ``plan``: read back from ``out_dir`` where an earlier run of the same
    study finished it, else run (after the shared frozen pass); return the results and how
    many were read back. Lines go to ``say`` when given, else to the log and (with
    ``run.progress``) above the bar."""
    out_dir, run, ray = where
    trials = [Trial(*setting, seed) for setting in plan for seed in range(seeds)]
    store, results = None, {}
    if out_dir is not None:
        key = study_key(ctx.models, ctx.train, ctx.val, key_settings)
        store = TrialStore(out_dir, key)
        results = store.load(trials)
        if results:
            line = f"resuming: {len(results)} of {len(trials)} trials already done ({store.folder})"
            (say or log.info)(line)
    reused = len(results)
    todo = [t for t in trials if t not in results]
    with _features_dir(run.cache_dir, out_dir) as root:
        if run.shared_pass and todo:
            _share(ctx, todo, root)
        with _trial_bar(not run.progress) as bar:
            tracker = _Tracker(results, store, seeds, bar, say or _lines(bar, run.progress))
            tracker.start(len(todo))
            run_trials(ctx, todo, tracker, workers=run.workers, ray=ray, threads=run.threads)
    return results, reused


_RUN = "run=RunOptions({}=...)"


@legacy(
    source_model="model",
    target_train="train",
    target_val="val",
    quiet="run=RunOptions(progress=not quiet)",
    progress="a handler on the 'netgraft.study' logger (the lines go there)",
    num_classes="training data with a `classes` attribute (or labels 0..N-1)",
    **{name: _RUN.format(name) for name in _STUDY_RUN},
)
def study(
    model: nn.Module,
    train: Any,
    val: Any,
    *,
    reuse: Iterable[int] | None = None,
    modes: Sequence[str] = MODES,
    baseline: bool = True,
    control: nn.Module | None = None,
    seeds: int = 3,
    budget: int | Mapping[str, Any] = 5,
    unit: str = "block",
    out_dir: str | os.PathLike | None = None,
    run: RunOptions | None = None,
    **legacy_kwargs: Any,
) -> StudyResult:
    """For each ``k`` in ``reuse`` and each mode, train ``seeds`` copies of ``model`` (the
    source) whose first ``k`` units (``unit="block"``: :func:`netgraft.blocks`; ``"layer"``:
    the layer table) keep their weights, frozen (``"frozen"``) or not (``"fine-tuned"``), the
    rest re-initialised, and measure accuracy on ``val``; return a :class:`StudyResult`.
    ``"surgical"`` keeps every unit and tunes only unit ``k`` (1-based, heads included);
    ``"lora"`` trains LoRA (PEFT) on the top ``k`` blocks of the main stack and the head,
    every weight frozen, with ``budget["lora"]``'s options (:mod:`netgraft.study.lora`).

    ``reuse`` defaults to every count from 1 to the unit before the head (the head is new,
    replaced when the target has another number of classes: ``train.classes``, else the
    largest label + 1), for ``"surgical"`` every unit, for ``"lora"`` every stack block.
    ``baseline`` adds ``k = 0`` (from scratch); ``control`` (a model trained on the target)
    is reused the same way. ``budget``: epochs, or :func:`netgraft.fit` arguments (``epochs``,
    ``lr``, ``batch_size``, ...). A setting's runs use seeds 0 to ``seeds - 1``.

    With ``out_dir`` every trial is saved as it finishes (a rerun skips them), then the JSON,
    CSV and PNG. ``run`` (:class:`~netgraft.RunOptions`): ``workers`` or ``backend="ray"``,
    ``threads`` per trial (same rows on every backend), ``shared_pass`` (one shared forward
    pass, :mod:`netgraft.study.shared`), ``progress``. Old keywords still work and warn.
    """
    say = legacy_kwargs.pop("progress", None)
    num_classes = legacy_kwargs.pop("num_classes", None) or _num_classes(train, val)
    run = run_options(run, legacy_kwargs)
    _check_choices(modes, unit, seeds)
    settings = _budget(budget)
    ctx, unit_names = _context((model, control), (train, val), unit, num_classes, settings)
    ks, names = _counts(ctx, unit, unit_names, modes, reuse)
    plan = _settings(modes, ks, baseline, control is not None)
    key = {"budget": settings, "unit": unit, "num_classes": num_classes}
    results, reused = _run_on(run, ctx, plan, seeds, key, out_dir, say)
    result = _gather(plan, results, seeds, (unit, unit_names, names), reused)
    result.settings = {**settings, "seeds": seeds, "modes": list(modes), "num_classes": num_classes}
    if out_dir is not None:
        result.save(out_dir)
    return result


def _context(
    source_control: tuple[nn.Module, nn.Module | None],
    data: tuple[Any, Any],
    unit: str,
    num_classes: int,
    settings: dict[str, Any],
) -> tuple[TrialContext, list[str]]:
    """What every trial needs (the source and control models, their units, the data, fit's
    budget and the lora options) and the units' names; the control, when given, must have
    the source's units."""
    source, control = source_control
    models = {"source": source, **({"control": control} if control is not None else {})}
    units = _units(source, unit, _example(data[0]))
    _check_control(control, unit, len(units))
    budget, lora = split_lora_budget(settings)
    ctx = TrialContext(models, units, num_classes, data[0], data[1], budget, lora=lora)
    return ctx, _unit_names(models["source"], unit, units)


def _counts(
    ctx: TrialContext,
    unit: str,
    unit_names: list[str],
    modes: Sequence[str],
    reuse: Iterable[int] | None,
) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """The counts ``k`` each mode runs and, per mode, the names its ``k`` count (unit ``k``
    at index ``k - 1``: the units, or for ``"lora"`` the stack's blocks from the top),
    every mode checked before any training."""
    model = ctx.models["source"]
    ks = _mode_ks(model, ctx.units, unit, unit_names, modes, reuse)
    names = {mode: unit_names for mode in (*modes, "scratch")}
    if LORA_MODE in modes:
        ks[LORA_MODE], stack = check_lora(model, unit, reuse, ctx.lora)
        names[LORA_MODE] = lora_block_names(stack)
    elif ctx.lora:
        raise NetgraftError("budget['lora'] sets the adapters of mode 'lora', which modes lacks")
    return ks, names


def _run_on(run: RunOptions, ctx: TrialContext, plan: list[Setting], seeds: int,
            key_settings: dict[str, Any], out_dir: Any, say: Any):  # fmt: skip
    """:func:`_run` on the backend ``run`` names (a Ray started here is shut down after)."""
    ray, started = connect_ray(run.ray_address) if run.backend == "ray" else (None, False)
    try:
        return _run(ctx, plan, seeds, key_settings, (out_dir, run, ray), say)
    finally:
        if started:
            ray.shutdown()


def _gather(
    plan: list[Setting],
    results: Mapping[Trial, TrialResult],
    seeds: int,
    units: tuple[str, list[str], dict[str, list[str]]],
    reused: int,
) -> StudyResult:
    """The study's result from its trials: one row per setting, in plan order; ``units``
    is the unit, its names and the names each mode's ``k`` count."""
    unit, unit_names, names = units
    rows = [_row(setting, results, seeds, names) for setting in plan]
    return StudyResult(
        rows=rows,
        unit=unit,
        units=unit_names,
        recommended=recommend(rows),
        trials_run=len(plan) * seeds - reused,
        trials_reused=reused,
    )
