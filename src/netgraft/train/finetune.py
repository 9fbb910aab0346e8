"""Fine-tuning schedules: train the head first, then unfreeze with discriminative rates.

:func:`fine_tune` is fastai's one-line happy path built from pieces a user can also call
one by one (:func:`netgraft.train_only`, :func:`netgraft.fit`, :func:`netgraft.unfreeze`,
:func:`netgraft.param_groups`). What to do is one :class:`FineTuneConfig` (head, stages,
rates, norm policy), shared by ``fine_tune``, ``netgraft finetune``, the folder workflow
and the Lightning and Hugging Face callbacks; :func:`schedule` turns it into one
:class:`Stage` per epoch, which ``fine_tune`` and the callbacks run. Frozen norm layers
follow ``bn`` at every stage; parameters outside the current stage are never handed to the
optimizer, so they get no momentum or weight-decay update. This module never changes the
architecture.

Example::

    >>> netgraft.replace_head(model, num_classes=10)
    >>> config = netgraft.FineTuneConfig(head_epochs=1, unfreeze="gradual")
    >>> history = netgraft.fine_tune(model, train, val, epochs=3, config=config)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from ..adapted import is_peft_model
from ..adapters import adapter_blocks, check_adapters
from ..deprecation import LEGACY, warn_deprecated, warn_old_keywords
from ..errors import NetgraftError
from ..freeze import NORM_POLICIES, freeze, train_only
from ..freeze import unfreeze as unfreeze_layers
from ..heads import find_head, head_names
from ..layers import blocks, head_block_index, is_norm
from ..options import RunOptions
from ..select import Selector, select
from .history import History
from .loop import fit_flat
from .optimizers import SCHEDULERS
from .search import apply, candidates, folds, pick, pool, size
from .search import log as search_log
from .search import score as held_out_score

__all__ = [
    "FineTuneConfig",
    "Stage",
    "fine_tune",
    "head_name",
    "hold",
    "schedule",
    "with_batch_norms",
]

UNFREEZE_MODES = ("all", "gradual")


@dataclass(frozen=True, kw_only=True)
class FineTuneConfig:
    """What a fine-tuning run does, shared by :func:`fine_tune`, ``netgraft finetune``,
    :func:`netgraft.workflows.finetune_folder` and the trainer callbacks
    (:class:`netgraft.integrations.lightning.FineTune`,
    :class:`netgraft.integrations.hf.FineTuneCallback`). Checked when built: a bad value is a
    :class:`NetgraftError` naming the field. Immutable; ``config.replace(field=value)``
    gives a changed copy.

    - ``head``: what trains in the head stage, a layer name or selector (or a list); None:
      the model's heads (:func:`netgraft.heads.head_names`).
    - ``head_epochs``: epochs training the head alone, before any unfreezing.
    - ``head_lr``: the head stage's rate (None: ``base_lr``).
    - ``base_lr``: after the head stage, every stage trains at ``base_lr / 2`` for the top
      block, spread geometrically down to ``base_lr / 2 / lr_mult`` for the first block.
    - ``lr_mult``: the ratio (>= 1) of the top block's rate to the first block's.
    - ``unfreeze``: ``"all"`` unfreezes everything after the head stage; ``"gradual"`` adds
      one block per epoch from the top (ULMFiT), then trains all of it.
    - ``bn``: the mode of frozen norm layers (``"eval"``, ``"train"``, ``"frozen"``; see
      :func:`netgraft.freeze`).
    - ``train_bn``: False keeps batch norms (norm layers with running statistics) outside
      the head frozen in every stage; LayerNorm and GroupNorm unfreeze with the rest.
    - ``keep_frozen``: a selector that stays frozen throughout.
    - ``scheduler``: the per-stage schedule of :func:`netgraft.fit` (``"onecycle"``,
      ``"cosine"``, ``"constant"``, None or a function); the trainer callbacks use the
      trainer's own scheduler instead.
    - ``search``: True makes :func:`fine_tune` choose how much of the body to train on the
      training data itself: it trains copies of the model on four fifths of it with each
      setting of :func:`netgraft.train.search.candidates` (the head alone; the body at
      ``base_lr``; everything at one rate from the start with batch norms trained),
      scores them on the fifth held out (on small data the next fifths in turn, until 100
      examples are scored: :func:`netgraft.train.search.folds`), and fine-tunes on
      all of it with the config's own setting unless another is clearly better there
      (:func:`netgraft.train.search.pick`). About three times the compute of the run alone
      from 500 examples (one held-out fifth), eight to twelve times on a few hundred or
      fewer (three to five fifths; measured on the suite); the validation data is never
      used to choose.
      ``base_lr`` scales the candidates, and each runs ``head_epochs + epochs`` epochs in
      all, divided its own way (the head alone for all of them, the head stage then the
      body, or one rate from the start); any other field the caller changed from its
      default is kept in every candidate (a field left at its default may change). False:
      exactly the settings given. The trainer callbacks and :func:`schedule` do not own
      the data and run the settings given.

    The default values live here only; everything that fine-tunes follows them. The held-out
    transfer suite (``bench/suite.py``; real tasks, images and text, leave-one-task-out)
    found no fixed setting within 2 points of the best everywhere: full fine-tuning at one
    rate 3e-4 wins on SMS spam (0.953 against 0.893 at ``base_lr`` 1e-3, 10 per class, mean
    of 3 seeds), tweets and MNIST and collapses EfficientNet-Lite0 on small grey images
    (animal silhouettes 0.34 against 0.58 for the head alone); ``base_lr`` 1e-4 (picked
    earlier on three tasks) left the body untouched; 1e-3 undoes the head on 200
    MobileNetV2 digits (0.835 to 0.625). Hence ``search=True``: :func:`fine_tune` tries the
    head alone, the body at ``base_lr`` 1e-3 (``lr_mult`` 10, batch norms frozen) and
    everything at 3e-4 from the start with norms trained, on held-out training data
    (further fifths in turn until 100 examples are scored), and keeps 1e-3 ×10 unless
    another is clearly better there; ``head_lr`` 3e-3 and the rest are fixed. On the suite
    (18 task and budget rows, 3 seeds each) it has the smallest mean regret of the four
    (0.008 against 0.022 for the fixed 1e-3 ×10) and the best average rank, ranks first of
    the suite's eleven methods, and is picked in every leave-one-task-out fold, but is not
    within 2 points of the best everywhere (15 of 18 rows; not on elpv, 5-6 points, nor on
    the convention speeches at 100 per class, 3 points: ``docs/benchmarks.md``).
    """

    head: str | list[str] | None = None
    head_epochs: int = 1
    head_lr: float | None = 3e-3
    base_lr: float = 1e-3
    lr_mult: float = 10.0
    unfreeze: str = "all"
    bn: str = "eval"
    train_bn: bool = False
    keep_frozen: Selector = None
    scheduler: Any = "onecycle"
    search: bool = True

    def __post_init__(self) -> None:
        _check_choice("unfreeze", self.unfreeze, UNFREEZE_MODES)
        _check_choice("bn", self.bn, NORM_POLICIES)
        if isinstance(self.head_epochs, bool) or not isinstance(self.head_epochs, int):
            raise NetgraftError(f"head_epochs must be an integer; found {self.head_epochs!r}")
        if self.head_epochs < 0:
            raise NetgraftError(f"head_epochs must be >= 0; found {self.head_epochs}")
        _check_rate("base_lr", self.base_lr)
        if self.head_lr is not None:
            _check_rate("head_lr", self.head_lr)
        if not isinstance(self.lr_mult, (int, float)) or self.lr_mult < 1:
            raise NetgraftError(
                f"lr_mult must be a number >= 1 (the first block's rate is the top's / "
                f"lr_mult); found {self.lr_mult!r}"
            )
        for name in ("train_bn", "search"):
            if not isinstance(getattr(self, name), bool):
                raise NetgraftError(f"{name} must be True or False; found {getattr(self, name)!r}")
        if not (self.scheduler is None or self.scheduler in SCHEDULERS or callable(self.scheduler)):
            raise NetgraftError(
                f"scheduler must be one of {', '.join(SCHEDULERS)}, None or a function"
                f"(optimizer, total_steps); found {self.scheduler!r}"
            )

    def replace(self, **changes: Any) -> FineTuneConfig:
        """A copy with ``changes`` (field names), checked like a new config."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (a callable scheduler as its name)."""
        out = dataclasses.asdict(self)
        if callable(self.scheduler):
            out["scheduler"] = getattr(self.scheduler, "__name__", repr(self.scheduler))
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(FineTuneConfig))


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise NetgraftError(f"{name} must be one of {', '.join(choices)}; found {value!r}")


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise NetgraftError(f"{name} must be a positive number; found {value!r}")


def resolve_config(
    config: FineTuneConfig | None,
    options: dict[str, Any],
    where: str,
    renamed: dict[str, str] | None = None,
    strict: bool = True,
) -> FineTuneConfig:
    """``config`` (None: ``FineTuneConfig()``, built now so it has today's defaults) with
    the old keyword arguments of ``where`` that are config fields (or ``renamed`` ones: old
    name -> field) moved out of ``options``; each warns once as deprecated, naming the new
    spelling. ``strict``: anything else left in ``options`` is a TypeError."""
    config = FineTuneConfig() if config is None else config
    if not isinstance(config, FineTuneConfig):
        raise NetgraftError(f"config must be a netgraft.FineTuneConfig; found {config!r}")
    names = {name: name for name in FIELDS} | (renamed or {})
    given = [name for name in names if name in options]
    for name in given:
        new = f"{where}(config=FineTuneConfig({names[name]}=...))"
        warn_deprecated(f"{where}({name}=...)", new)
    old = {names[name]: options.pop(name) for name in given}
    if strict and options:
        raise TypeError(f"{where}() got unexpected keyword arguments {', '.join(options)}")
    return config.replace(**old) if old else config


def head_name(model: nn.Module) -> str:
    """Deprecated: the dotted name of the model's head; use ``netgraft.find_head(model)[0]``
    (or :func:`netgraft.heads.head_names` for every head)."""
    warn_deprecated("netgraft.train.head_name(model)", "netgraft.find_head(model)[0]")
    return find_head(model)[0]


def _top_block(model: nn.Module, selectors: list[list[str]], heads: list[Any]) -> int:
    """The index of the first block holding a layer of the heads (names or any selector)."""
    return min(head_block_index(selectors, h) for h in select(model, heads) or heads)


def unfreeze_order(model: nn.Module, top: int) -> list[int]:
    """The blocks a gradual schedule unfreezes, one per epoch: those below block ``top``
    (the head's) from the top down; on a PEFT model only the blocks holding adapters, whose
    adapters are what unfreezing trains there."""
    order = list(range(top - 1, -1, -1))
    if is_peft_model(model):
        held = adapter_blocks(model)
        order = [i for i in order if i in held]
    return order


class Stage(NamedTuple):
    """One stage of a fine-tuning schedule: its ``name`` (``"head"``, ``"unfreeze BLOCK"``,
    ``"all"``), the layer names it trains (``trainable``; None: every layer), and the rate
    ``lr`` spread over blocks by ``lr_mult`` (None: ``lr`` for every block)."""

    name: str
    trainable: list[str] | None
    lr: float
    lr_mult: float | None


def schedule(
    model: nn.Module, epochs: int, config: FineTuneConfig | None = None, **old: Any
) -> list[Stage]:
    """The :class:`Stage` of every epoch of ``fine_tune(model, epochs=epochs,
    config=config)``: ``config.head_epochs + epochs`` entries, which :func:`fine_tune` and
    the trainer callbacks run. ``old`` takes the config's fields as deprecated keyword
    arguments."""
    config = resolve_config(config, old, "schedule")
    heads = head_names(model, config.head)
    out = [Stage("head", heads, config.head_lr or config.base_lr, None)] * config.head_epochs
    lr, lr_mult = config.base_lr / 2, config.lr_mult
    if config.unfreeze == "gradual":
        found = blocks(model)
        selectors = [[n for n in b.layer_names if n] for b in found]
        top = _top_block(model, selectors, heads)
        for first in unfreeze_order(model, top)[: max(epochs, 0)]:
            names = [n for names in selectors[first:] for n in names] + heads
            out.append(Stage(f"unfreeze {found[first].name}", names, lr, lr_mult))
    return out + [Stage("all", None, lr, lr_mult)] * (config.head_epochs + epochs - len(out))


def hold(model: nn.Module, trainable: Selector | None, bn: str, keep_frozen: Selector) -> None:
    """Train only ``trainable`` (every layer when None), ``keep_frozen`` kept frozen; frozen
    norm layers follow ``bn`` (see :func:`netgraft.freeze`)."""
    if trainable is None:
        unfreeze_layers(model)
    else:
        train_only(model, trainable, bn=bn)
    if keep_frozen is not None:
        freeze(model, keep_frozen, bn=bn)


class _Stages:
    """Runs the stages of one fine-tuning: each holds the trainable part, then calls
    :func:`fit` with the shared arguments; the rows go into one history."""

    def __init__(
        self,
        model: nn.Module,
        data: tuple[Any, Any],
        bn: str,
        keep_frozen: Selector,
        seed: int | None,
        fit_kwargs: dict[str, Any],
    ):
        self.model, self.data, self.bn, self.keep_frozen = model, data, bn, keep_frozen
        self.seed, self.fit_kwargs = seed, fit_kwargs
        self.history = History()
        self.index = 0

    def hold(self, trainable: Selector | None) -> None:
        """Train only ``trainable`` (everything when None), ``keep_frozen`` kept frozen."""
        hold(self.model, trainable, self.bn, self.keep_frozen)

    def run(self, name: str, n_epochs: int, **kwargs: Any) -> None:
        """Fit ``n_epochs`` epochs as stage ``name`` (nothing when ``n_epochs <= 0``)."""
        if n_epochs <= 0:
            return
        options = dict(self.fit_kwargs)
        run = options.get("run")
        if name != "head":
            # cache=True insists for the head stage; later stages may have nothing frozen
            if options.get("cache") is True:
                options["cache"] = "auto"
            if run is not None and run.cache is True:
                options["run"] = run.replace(cache="auto")
        part = fit_flat(
            self.model,
            *self.data,
            epochs=n_epochs,
            seed=None if self.seed is None else self.seed + self.index,
            stage=name,
            **kwargs,
            **options,
        )
        self.history.extend(part, stage=name)
        self.index += 1


def with_batch_norms(model: nn.Module, keep_frozen: Selector, head: Selector = None) -> Selector:
    """``keep_frozen`` plus every norm layer with running statistics (BatchNorm, tracked
    InstanceNorm) outside ``head``: what :func:`fine_tune` keeps frozen unless ``train_bn``."""
    in_head = set(select(model, head)) if head is not None else set()
    found = [
        name
        for name, m in model.named_modules()
        if is_norm(m) and getattr(m, "running_mean", None) is not None
        and name not in in_head and not any(name.startswith(h + ".") for h in in_head)
    ]  # fmt: skip
    if not found:
        return keep_frozen
    if keep_frozen is None:
        return found
    return [*keep_frozen, *found] if isinstance(keep_frozen, list) else [keep_frozen, *found]


def fine_tune(
    model: nn.Module,
    train: Any,
    val: Any = None,
    *,
    epochs: int,
    config: FineTuneConfig | None = None,
    callbacks: Sequence[Any] = (),
    seed: int | None = 0,
    run: RunOptions | None = None,
    **fit_kwargs: Any,
) -> History:
    """Fine-tune ``model`` in place as ``config`` says (a :class:`FineTuneConfig`; None: the
    defaults): train only its head for ``config.head_epochs`` at ``config.head_lr``, then
    ``epochs`` more with every block unfrozen at once (``unfreeze="all"``) or one more per
    epoch from the top (``"gradual"``), at rates spread over blocks from ``base_lr / 2 /
    lr_mult`` (first block) to ``base_lr / 2`` (top). The stages are :func:`schedule`'s.

    ``config.keep_frozen`` stays frozen throughout, and so do batch norms outside the head
    unless ``config.train_bn`` (:func:`with_batch_norms`); frozen norm layers follow
    ``config.bn``. Each stage builds a fresh optimizer over its trainable parameters only.
    ``callbacks``, ``seed`` (stage ``i`` is seeded ``seed + i``), ``run`` (a
    :class:`~netgraft.RunOptions`: device, precision, progress, cache, ...; ``cache=True``
    insists for the head stage only) and other keyword arguments go to :func:`netgraft.fit`
    (``optimizer``, ``batch_size``, ...). Returns one :class:`History` whose rows carry
    their ``stage``.

    With ``config.search`` (the default) the settings above are chosen first on the
    training data itself: copies of ``model`` train on four fifths of ``train`` with each
    candidate of :func:`netgraft.train.search.candidates` (possibly the head alone for every
    epoch), are scored on the fifth held out (the next fifths in turn until 100 examples are
    scored: :func:`netgraft.train.search.folds`), and ``model`` then trains on all of ``train``
    with the config's own setting unless another is clearly better there
    (:func:`netgraft.train.search.pick`); ``history.search`` records the choice and every
    score (None when no
    search ran: fewer than 20 examples, data that cannot be split, a model that cannot be
    copied). ``val`` is never used to choose.

    The config's fields are also accepted as keyword arguments (``head_epochs=2``,
    ``base_lr=...``), and so are fit's old keywords (``quiet=``, ``cache=``, ``device=``,
    ``weight_decay=``, ...): deprecated spellings that warn once, naming the new one.
    """
    config = resolve_config(config, fit_kwargs, "fine_tune", strict=False)
    warn_old_keywords("fine_tune", LEGACY["fit"], fit_kwargs)  # fit_flat folds them in silently
    if "resume" in fit_kwargs or (run is not None and run.resume is not None):
        raise NetgraftError(
            "fine_tune cannot resume; resume a stage with fit(..., run=RunOptions(resume=...))"
        )
    check_adapters(model, config.keep_frozen)
    found = None
    if config.search and epochs > 0:
        config, epochs, found = _search(model, train, epochs, config, seed, run, fit_kwargs)
    history = _run_stages(model, (train, val), epochs, config, callbacks, seed, run, fit_kwargs)
    history.search = found
    return history


def _run_stages(
    model: nn.Module,
    data: tuple[Any, Any],
    epochs: int,
    config: FineTuneConfig,
    callbacks: Sequence[Any],
    seed: int | None,
    run: RunOptions | None,
    fit_kwargs: dict[str, Any],
) -> History:
    """Every stage of :func:`schedule` for ``config`` (its settings as given), in place."""
    heads = head_names(model, config.head)
    keep = config.keep_frozen
    if not config.train_bn:
        keep = with_batch_norms(model, keep, heads)
    shared = {"scheduler": config.scheduler, "callbacks": callbacks, "run": run, **fit_kwargs}
    stages = _Stages(model, data, config.bn, keep, seed, shared)
    for name, group in itertools.groupby(schedule(model, epochs, config), key=lambda s: s.name):
        epochs_in_stage = list(group)
        first = epochs_in_stage[0]
        stages.hold(first.trainable)
        stages.run(name, len(epochs_in_stage), lr=first.lr, lr_mult=first.lr_mult)
    return stages.history


def _search(
    model: nn.Module,
    train: Any,
    epochs: int,
    config: FineTuneConfig,
    seed: int | None,
    run: RunOptions | None,
    fit_kwargs: dict[str, Any],
) -> tuple[FineTuneConfig, int, dict[str, Any] | None]:
    """``config.search``: the setting that scores best on held-out parts of ``train``
    (:func:`.search.folds`: one fifth, or every fifth in turn on small data) as the config
    (``search=False``) and epochs :func:`_run_stages` runs, and what was found (None when
    ``train`` cannot be split or ``model`` cannot be copied: the settings given). On each
    split the body candidates share one head stage; ``model`` is untouched."""
    fixed = config.replace(search=False)
    splits = folds(train, seed)
    if splits is None:
        search_log.info("fine_tune search: the training data cannot be split; no search")
        return fixed, epochs, None
    try:
        copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001  (whatever keeps a model from being copied)
        search_log.warning("fine_tune search: the model cannot be copied (%s); no search", exc)
        return fixed, epochs, None
    # base_lr scales the candidates and how the epochs divide between the head stage and
    # the body is what they choose (each runs head_epochs + epochs in all); any other field
    # the caller changed is kept in each
    keep = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != f.default and f.name not in ("base_lr", "head_epochs")
    }
    options = candidates(config.base_lr, config.lr_mult, keep)
    own = next(label for label, ch in options.items() if ch == {"base_lr": config.base_lr})
    parts: dict[str, list] = {label: [] for label in options}
    for split in splits:  # one split at a time: one copy with a trained head held at once
        for label, found in _trials(model, split, options, epochs, fixed, seed, run, fit_kwargs):
            parts[label].append(found)
    held_out = sum(n for _, n in parts[own])
    best, scores = pick({label: pool(found) for label, found in parts.items()}, own, held_out)
    found = {"chosen": best, "scores": scores, "held_out": held_out, "folds": len(splits)}
    return (*apply(fixed, epochs, options[best]), found)


def _trials(
    model: nn.Module,
    split: tuple[Any, Any],
    options: dict[str, dict[str, Any]],
    epochs: int,
    fixed: FineTuneConfig,
    seed: int | None,
    run: RunOptions | None,
    fit_kwargs: dict[str, Any],
):
    """For each candidate (label -> changes to ``fixed``), a copy of ``model`` trained on
    ``split``'s first part, yielded as (label, (held-out score, held-out size)). The body
    candidates after a head stage start from one copy whose head stage ran once."""
    fit_part, held = split
    quiet = {k: v for k, v in fit_kwargs.items() if k != "quiet"} | {"progress": False}
    loss, batch_size = fit_kwargs.get("loss"), fit_kwargs.get("batch_size", 64)

    def train_copy(of: nn.Module, setting: FineTuneConfig, n: int) -> nn.Module:
        trained = copy.deepcopy(of)
        _run_stages(trained, (fit_part, None), n, setting, (), seed, run, quiet)
        return trained

    headed = functools.cache(lambda: train_copy(model, fixed, 0))  # the shared head stage
    for label, changes in options.items():
        setting, n = apply(fixed, epochs, changes)
        if changes and setting.head_epochs == fixed.head_epochs:  # after the shared head stage
            trained = train_copy(headed(), setting.replace(head_epochs=0), n)
        else:  # the head alone, or no head stage: from the model as given
            trained = train_copy(model, setting, n)
        yield label, (held_out_score(trained, held, loss, batch_size), size(held))
