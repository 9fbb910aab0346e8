"""One trial of a study: one copy of a model, one mode, one ``k``, one seed, trained and
measured.

A :class:`Trial` names what to run; a :class:`TrialContext` holds what every trial of one
study shares (the models, units, data, budget and, where the shared frozen pass applies,
the folder of its features and the cut point of each setting). :func:`run_trial` is a
plain function of the two, so a trial gives the same numbers in the study's process, in a
worker process or in a Ray task: everything random in it is seeded by the trial's seed.
This module never changes the models in the context (every trial trains a copy) and never
writes outside the shared features folder.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..cache import FeatureCache
from ..cut import cut
from ..data import as_dataset
from ..freeze import freeze, train_only, unfreeze
from ..heads import find_head, replace_head
from ..options import RunOptions, run_options
from ..reinit import reinit
from ..train import evaluate
from ..train.loop import fit_flat
from .lora import LORA_MODE, lora_model

__all__ = [
    "MODES",
    "STUDY_MODES",
    "Trial",
    "TrialContext",
    "TrialResult",
    "build_trial_model",
    "run_trial",
    "set_threads",
    "set_trainable",
]

MODES = ("frozen", "fine-tuned")  # the default sweep
# "surgical" (Lee et al., ICLR 2023): tune only unit k, every other unit frozen;
# "lora": LoRA (through PEFT) on the top k blocks of the main stack, every weight frozen
STUDY_MODES = (*MODES, "surgical", LORA_MODE)


@dataclass(frozen=True, order=True)
class Trial:
    """One training run: ``model`` (``"source"`` or ``"control"``; the from-scratch baseline
    runs the source), ``mode`` (``"scratch"`` or one of :data:`STUDY_MODES`), ``k`` and the
    ``seed``."""

    model: str
    mode: str
    k: int
    seed: int

    @property
    def setting(self) -> tuple[str, str, int]:
        """The row this trial belongs to: ``(model name, mode, k)``."""
        return (self.model, self.mode, self.k)

    @property
    def name(self) -> str:
        """A file-safe name: ``source-frozen-k2-s0``."""
        return f"{self.model}-{self.mode}-k{self.k}-s{self.seed}"

    def base(self) -> str:
        """The model it copies: the source for the from-scratch baseline."""
        return "source" if self.model == "scratch" else self.model


@dataclass(frozen=True)
class TrialResult:
    """What a trial measured: validation accuracy, trained parameters, seconds."""

    acc: float
    trained_params: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """As plain data (what a trial file holds)."""
        return {"acc": self.acc, "trained_params": self.trained_params, "seconds": self.seconds}


@dataclass
class TrialContext:
    """What every trial of one study shares. ``features_dir`` and ``cuts`` are set by the
    shared frozen pass (:mod:`netgraft.study.shared`): the folder holding the features and,
    per setting ``(model, mode, k)``, the cut point its frozen prefix ends at; ``stores``
    names the feature stores in that folder the trials read (what Ray ships to other
    nodes); ``lora`` holds the options of the ``"lora"`` mode's adapters (the budget's
    ``"lora"`` entry, which ``budget`` itself, fit's arguments, no longer holds)."""

    models: Mapping[str, nn.Module]
    units: list[list[str]]
    num_classes: int
    train: Any
    val: Any
    budget: dict[str, Any]
    features_dir: str | None = None
    cuts: dict[tuple[str, str, int], str] = field(default_factory=dict)
    val_cached: bool = False
    stores: list[str] = field(default_factory=list)  # the shared pass's folders in features_dir
    lora: dict[str, Any] = field(default_factory=dict)


def _head_outputs(model: nn.Module) -> int | None:
    _, head = find_head(model)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def set_trainable(
    model: nn.Module, units: list[list[str]], mode: str, k: int, also: list[str] | None = None
) -> None:
    """Make trainable what ``mode`` trains: unit ``k`` only (and ``also``) in
    ``"surgical"``, everything after the first ``k`` units in ``"frozen"``, everything
    otherwise."""
    unfreeze(model)
    if mode == "surgical":
        train_only(model, units[k - 1] + (also or []))
    elif mode == "frozen" and k > 0:
        freeze(model, [n for names in units[:k] for n in names])


def build_trial_model(ctx: TrialContext, trial: Trial) -> nn.Module:
    """The model ``trial`` trains: a copy of its base with a head for the target's classes;
    ``"surgical"`` keeps every unit and trains only unit ``k`` (and a replaced head, which has
    nothing to keep); ``"lora"`` keeps every unit and is the PEFT model of the copy with
    LoRA on the top ``k`` blocks of its main stack (the adapters and the head train, seeded
    by the trial's seed); the other modes keep the first ``k`` units, re-initialise the rest
    with the trial's seed and freeze the kept ones in ``"frozen"``."""
    model = copy.deepcopy(ctx.models[trial.base()])
    unfreeze(model)
    new_head = _head_outputs(model) not in (None, ctx.num_classes)
    if new_head:
        replace_head(model, ctx.num_classes)
    head = find_head(model)[0]
    if trial.mode in ("surgical", LORA_MODE):
        if new_head:
            reinit(model, head, seed=trial.seed)  # seeded: never drawn from the global stream
    else:
        later = [n for names in ctx.units[trial.k :] for n in names]
        if later:
            reinit(model, later, seed=trial.seed)
    if trial.mode == LORA_MODE:
        return lora_model(model, trial.k, ctx.lora, trial.seed)
    set_trainable(model, ctx.units, trial.mode, trial.k, [head] if new_head else None)
    return model


def _from_features(
    ctx: TrialContext, model: nn.Module, trial: Trial, cut_at: str
) -> tuple[nn.Module, FeatureCache, FeatureCache | None]:
    """The trainable suffix after ``cut_at`` with the shared features of the training data
    (and of the validation data when they were stored), found under the cache's own key."""
    prefix, suffix = cut(model, after=cut_at)
    train = FeatureCache(
        prefix, as_dataset(ctx.train), cache_dir=ctx.features_dir, cut_point=cut_at
    )
    val = None
    if ctx.val_cached:
        val = FeatureCache(
            prefix, as_dataset(ctx.val), cache_dir=ctx.features_dir, cut_point=cut_at
        )
    return suffix, train, val


def lora_run(ctx: TrialContext) -> RunOptions:
    """How a ``"lora"`` trial's ``fit`` runs: quiet, ``cache="auto"`` into the features
    folder (where :func:`netgraft.study.shared.share_lora_bottoms` built its bottom), with
    the budget's own RunOptions fields over these."""
    names = {f.name for f in fields(RunOptions)}
    own = {k: v for k, v in ctx.budget.items() if k in names}
    base = RunOptions(progress=False, cache="auto", cache_dir=ctx.features_dir)
    return run_options(base, own)


def run_trial(ctx: TrialContext, trial: Trial) -> TrialResult:
    """Build, train and measure one trial. A setting with a cut point trains its suffix on
    the shared features, as :func:`netgraft.fit` would from its own cache (the optimizer
    sees the same parameters; under discriminative rates, which depend on the whole model's
    blocks, ``fit`` itself runs on the whole model and finds the same features); any other
    trains as :func:`netgraft.fit` does with ``cache="auto"``."""
    started = time.perf_counter()
    model = build_trial_model(ctx, trial)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cut_at = ctx.cuts.get(trial.setting) if ctx.features_dir else None
    batch_size = max(64, 2 * ctx.budget["batch_size"])
    net, val = model, ctx.val
    quiet = RunOptions(progress=False)
    if trial.mode == LORA_MODE:
        fit_flat(model, ctx.train, seed=trial.seed, run=lora_run(ctx), **ctx.budget)
    elif cut_at is None:
        fit_flat(model, ctx.train, seed=trial.seed, run=quiet, **ctx.budget)
    elif {"lr_mult", "layer_decay"} & set(ctx.budget):
        run = quiet.replace(cache=True, cache_dir=ctx.features_dir)
        fit_flat(model, ctx.train, seed=trial.seed, run=run, **ctx.budget)
    else:
        suffix, features, val_features = _from_features(ctx, model, trial, cut_at)
        fit_flat(suffix, features, seed=trial.seed, run=quiet.replace(cache=False), **ctx.budget)
        if val_features is not None:
            net, val = suffix, val_features
    acc = float(evaluate(net, val, batch_size=batch_size)["acc"])
    return TrialResult(acc, trained, round(time.perf_counter() - started, 3))


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads when given; return the number before."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    return before
