"""The shared frozen pass: one forward pass of a source model over the target data feeds
every frozen trial of a study.

A frozen trial reusing ``k`` units trains only what comes after its frozen prefix; the
prefix's output does not depend on the trial's seed, and the prefixes of different ``k``
are nested, so one pass of the source model with a forward hook on each cut point
captures the features of every setting at once. Each setting's features are then stored
as the feature cache that :func:`netgraft.fit` would build for that trial (on disk, under
the cache's own key and shard checksums, :mod:`netgraft.cache`): the trial's own cache
plan finds them there, so a trial computes exactly what it computes alone, without running
the prefix. Cut points come from the cache plan itself (:func:`netgraft.train.cached.plan`
on one example) and each is checked on that example against the prefix it stands for; a
setting whose cut cannot be shared (random data pipeline, a cut by substitution, a module
called twice) falls back to its own pass, and says why in the ``netgraft.study`` log.

When the features of every cut point would not fit in memory together (2 GiB), the cut
points are captured in as few passes as fit.

The ``"lora"`` settings share less (:func:`share_lora_bottoms`): their frozen bottom, below
the lowest adapter, is a cut of the PEFT model by substitution whose output is not one
tensor a hook can capture, so each ``k`` runs its own bottom once, here, into the feature
cache its trials' ``fit(run=RunOptions(cache="auto"))`` then finds (under the same key: the
bottom holds no adapter, so every seed's trial has the same one); the seeds of a ``k``
share it, the ``k`` do not share with each other or with the frozen settings.

This module never changes a model's weights, never leaves its train/eval modes or the
global random streams changed, and writes only into the features folder it is given.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..cache import FeatureCache, cache_key
from ..data import as_dataset, input_of, to_device
from ..errors import NetgraftError
from ..layers import call_model, device_of, evaluating
from ..rng import forked
from ..train.cached import plan
from .lora import LORA_MODE
from .trials import Trial, TrialContext, build_trial_model, lora_run, set_trainable

__all__ = ["FrozenPass", "share_frozen_pass", "share_lora_bottoms"]

log = logging.getLogger("netgraft.study")

_BATCH = 64  # the feature cache's own batch size: the same batches, the same numbers
_MEMORY_BYTES = 2 << 30
_SHARED_MODES = ("frozen", "surgical")


class _Done(Exception):
    """Every hooked module of this batch has run: the rest of the forward is not needed."""


class FrozenPass:
    """What the shared pass did: the cut point per setting, the seconds the pass took and
    the passes over the data it needed (per model and dataset)."""

    def __init__(self) -> None:
        self.cuts: dict[tuple[str, str, int], str] = {}
        self.probe_seconds = 0.0  # finding and checking each setting's cut point
        self.pass_seconds = 0.0  # the passes over the data, and storing their features
        self.passes = 0
        self.val_cached = False
        self.stores: list[str] = []  # the store folders (under the features folder) trials read


def _capture(
    model: nn.Module, data: Dataset, names: list[str], batch_size: int = _BATCH
) -> dict[str, list[torch.Tensor]]:
    """The outputs of the modules ``names`` over ``data``, batch by batch, from one
    forward pass per batch that stops once all of them have run."""
    found: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise NetgraftError(f"{name!r} returns {type(output).__name__}, not a tensor")
            found[name] = output.detach().cpu().contiguous()
            if len(found) == len(names):
                raise _Done

        return hook

    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    device = device_of(model)
    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0)
    )
    try:
        with evaluating(model), forked():
            for batch in loader:
                found.clear()
                with contextlib.suppress(_Done):
                    call_model(model, to_device(input_of(batch), device))
                for name in names:
                    out[name].append(found[name])
    finally:
        for handle in handles:
            handle.remove()
    return out


@contextlib.contextmanager
def _replaying(prefix: nn.Module, batches: list[torch.Tensor]) -> Iterator[nn.Module]:
    """``prefix`` answering its calls with the captured ``batches`` in order (then computing
    again), so the feature cache stores what the shared pass computed."""
    pending = iter(batches)
    real = prefix.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        captured = next(pending, None)
        return captured if captured is not None else real(*args, **kwargs)

    prefix.forward = forward  # type: ignore[method-assign]
    try:
        yield prefix
    finally:
        del prefix.forward


def _probe_cut(
    ctx: TrialContext, setting: tuple[str, str, int], probe: Dataset, model: nn.Module
) -> tuple[str, nn.Module] | None:
    """The cut point and frozen prefix the cache plan picks for ``setting`` (on ``model``, a
    copy of the setting's base made trainable as the setting trains it; the cut depends on
    that, not on the weights the trial re-initialises), checked against the base model's
    hooked output on one example; None (logged) when it cannot be shared."""
    trial = Trial(*setting, seed=0)
    set_trainable(model, ctx.units, trial.mode, trial.k)
    try:
        cached = plan(model, probe, cache=True)
        assert cached is not None
        hooked = _capture(ctx.models[trial.base()], probe, [cached.cut_point])[cached.cut_point]
        expected = cached.train.tensors()[0]
    except (NetgraftError, AttributeError) as exc:
        log.info("shared frozen pass: %s %s k=%d runs its own pass (%s)", *setting, exc)
        return None
    if not isinstance(expected, torch.Tensor) or not torch.equal(hooked[0], expected):
        log.info(
            "shared frozen pass: %s %s k=%d runs its own pass (the output of %r is not what "
            "its prefix computes)",
            *setting,
            cached.cut_point,
        )
        return None
    return cached.cut_point, cached.prefix


def _store_name(prefix: nn.Module, data: Dataset, cut_at: str) -> str:
    """The folder (under the features folder) the feature cache keeps these features in."""
    return cache_key(prefix, data, cut_point=cut_at)[:32]


def _stored(prefix: nn.Module, data: Dataset, cut_at: str, root: Path) -> bool:
    return (root / _store_name(prefix, data, cut_at) / "manifest.json").is_file()


def _chunks(
    model: nn.Module, data: Dataset, names: list[str], probe: Dataset
) -> Iterable[list[str]]:
    """``names`` in groups whose features over ``data`` fit in memory together."""
    first = _capture(model, probe, names)
    size = {n: first[n][0].numel() * first[n][0].element_size() * len(data) for n in names}  # type: ignore[arg-type]
    group: list[str] = []
    total = 0
    for name in names:
        if group and total + size[name] > _MEMORY_BYTES:
            yield group
            group, total = [], 0
        group.append(name)
        total += size[name]
    if group:
        yield group


def _store_pass(
    model: nn.Module, data: Dataset, prefixes: dict[str, nn.Module], root: Path, probe: Dataset
) -> int:
    """Capture the features of every cut in ``prefixes`` not stored yet and store each as
    its feature cache; return the passes over ``data`` it took."""
    missing = [c for c, p in prefixes.items() if not _stored(p, data, c, root)]
    passes = 0
    for names in _chunks(model, data, missing, probe) if missing else ():
        captured = _capture(model, data, names)
        passes += 1
        for name in names:
            with _replaying(prefixes[name], captured.pop(name)) as prefix:
                FeatureCache(prefix, data, cache_dir=root, cut_point=name, batch_size=_BATCH)
    return passes


def share_frozen_pass(ctx: TrialContext, trials: Iterable[Trial], root: str | Path) -> FrozenPass:
    """Run the shared frozen pass for the frozen and surgical ``trials`` into the features
    folder ``root``: one pass (per model, over the training and the validation data)
    captures every cut point; settings that cannot share fall back to their own pass."""
    result = FrozenPass()
    root = Path(root)
    if isinstance(ctx.train, DataLoader):  # read as it is, never cached (as fit does)
        log.info("shared frozen pass: not run (the training data is a DataLoader)")
        return result
    train = as_dataset(ctx.train)
    probe = Subset(train, [0])
    started = time.perf_counter()
    wanted: dict[str, dict[str, nn.Module]] = {}
    copies: dict[str, nn.Module] = {}
    for setting in sorted({t.setting for t in trials if t.mode in _SHARED_MODES}):
        base = Trial(*setting, seed=0).base()
        if base not in copies:  # one copy per model: its prefixes hold the model's weights
            copies[base] = copy.deepcopy(ctx.models[base])
        found = _probe_cut(ctx, setting, probe, copies[base])
        if found is not None:
            result.cuts[setting] = found[0]
            wanted.setdefault(base, {})[found[0]] = found[1]
    result.probe_seconds = time.perf_counter() - started
    datasets = {"train": train}
    with contextlib.suppress(NetgraftError):
        datasets["val"] = as_dataset(ctx.val)
    for name, prefixes in wanted.items():
        for kind in list(datasets):
            try:
                result.passes += _store_pass(
                    ctx.models[name], datasets[kind], prefixes, root, probe
                )
            except NetgraftError as exc:
                if kind == "train":
                    raise
                log.info("shared frozen pass: the validation data is not shared (%s)", exc)
                del datasets[kind]
    result.val_cached = "val" in datasets and bool(result.cuts)
    names = {
        _store_name(prefix, data, cut)
        for prefixes in wanted.values()
        for cut, prefix in prefixes.items()
        for data in datasets.values()
    }
    result.stores = sorted(n for n in names if (root / n / "manifest.json").is_file())
    result.pass_seconds = time.perf_counter() - started - result.probe_seconds
    return result


def share_lora_bottoms(ctx: TrialContext, trials: Iterable[Trial], root: str | Path) -> list[str]:
    """For each ``"lora"`` setting of ``trials``, build in the features folder ``root`` the
    feature cache that its trials' ``fit`` builds below the lowest adapter (the cache plan
    of the setting's model with seed 0's adapters, which the bottom does not hold), so the
    seeds of a setting run its frozen bottom once; return the store folders written. A
    setting whose cache does not apply is logged and left to its trials."""
    root = Path(root)
    if isinstance(ctx.train, DataLoader):
        return []
    train = as_dataset(ctx.train)
    stores = []
    run = lora_run(ctx).replace(cache_dir=str(root))
    for setting in sorted({t.setting for t in trials if t.mode == LORA_MODE}):
        model = build_trial_model(ctx, Trial(*setting, seed=0))
        found = plan(model, train, cache=run.cache, **run.cache_options())
        if found is None:
            log.info("shared pass: %s %s k=%d runs without a feature cache", *setting)
            continue
        name = _store_name(found.prefix, train, found.cut_point)
        if (root / name / "manifest.json").is_file():
            stores.append(name)
    return sorted(set(stores))
