"""``transfer``: copy every weight that fits from a source into a destination model.

The source is a module, a state dict, or a file (``.safetensors``, ``.pt/.pth/.bin``
weights-only, Keras ``.h5``/``.keras``, ``.onnx``); the destination is a module. Tensors are
paired by :mod:`netgraft.transfer.match` (mapping, exact names, suffixes, structural
alignment), shape mismatches follow ``on_mismatch``, and the returned
:class:`~netgraft.transfer.report.TransferReport` says what happened to every tensor.
The destination is changed only after the whole plan is known to be valid: an error leaves
it untouched. Never loads a file that needs unpickling unless ``trust_pickle=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import NetgraftError, ShapeMismatchError, WeightsError
from ..layers import layers
from ..reinit import reinit_module
from ..select import Selector, select
from .adapt import adapt_tensor
from .formats.keras import read_keras
from .formats.onnx import read_onnx
from .formats.torch_files import load_state_dict_file
from .match import STEPS, DstLayer, Source, group_layers, name_matches, plan_pairs
from .report import Mismatch, TensorRecord, TransferReport

__all__ = ["load_source", "transfer"]

log = logging.getLogger(__name__)

POLICIES = ("error", "skip", "adapt")
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


def load_source(
    src: nn.Module | Mapping[str, torch.Tensor] | str | Path,
    *,
    example_input: Any = None,
    trust_pickle: bool = False,
) -> Source:
    """Read ``src`` into torch-layout tensors grouped into layers in execution order.

    A module's order is traced with ``example_input`` when given (else remembered or
    registration order); files keep their own order (Keras config, ONNX graph order).
    """
    if isinstance(src, nn.Module):
        order = layers(src, example_input).names
        return Source.from_state_dict(src.state_dict(), f"module {type(src).__name__}", order)
    if isinstance(src, Mapping):
        bad = [k for k, v in src.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightsError(
                f"a source state dict must map names to tensors; {bad[0]!r} holds "
                f"{type(src[bad[0]]).__name__}"
            )
        return Source.from_state_dict(src, "state dict")
    if isinstance(src, (str, Path)):
        path = Path(src)
        suffix = path.suffix.lower()
        if not path.exists():
            raise WeightsError(f"weights file {str(path)!r} does not exist")
        if suffix in KERAS_SUFFIXES:
            return read_keras(path)
        if suffix == ".onnx":
            return read_onnx(path)
        state = load_state_dict_file(path, trust_pickle=trust_pickle)
        return Source.from_state_dict(state, f"file {path.name}")
    raise NetgraftError(
        f"transfer source must be a module, a state dict or a file path; found {type(src).__name__}"
    )


@dataclass
class _Destination:
    """What ``transfer`` needs to know about the destination: its layers in execution order,
    its tensors (as variables, written in place) and which layer owns each tensor."""

    model: nn.Module
    layers: list[DstLayer]
    state: dict[str, torch.Tensor]
    modules: dict[str, nn.Module] = field(init=False)
    shapes: dict[str, tuple[int, ...]] = field(init=False)
    owner: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.modules = dict(self.model.named_modules())
        self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        self.owner = {full: x.name for x in self.layers for full in x.tensors.values()}

    @classmethod
    def read(cls, dst: nn.Module, example_input: Any) -> _Destination:
        state = dst.state_dict(keep_vars=True)
        order = layers(dst, example_input).names
        groups = group_layers(list(state), order)
        return cls(dst, [DstLayer(name, t) for name, t in groups], state)

    def last_of(self, kind: type) -> str | None:
        found = [x.name for x in self.layers if isinstance(self.modules.get(x.name), kind)]
        return found[-1] if found else None

    def first_of(self, kind: type) -> str | None:
        found = [x.name for x in self.layers if isinstance(self.modules.get(x.name), kind)]
        return found[0] if found else None


def _selected(dst: nn.Module, include: Selector, exclude: Selector) -> set[str] | None:
    if include is None and exclude is None:
        return None
    chosen = set(select(dst, include))
    if exclude is not None:
        chosen -= set(select(dst, exclude))
    return chosen


def transfer(
    src: nn.Module | Mapping[str, torch.Tensor] | str | Path,
    dst: nn.Module,
    *,
    include: Selector = None,
    exclude: Selector = None,
    mapping: Mapping[str, str] | None = None,
    on_mismatch: str = "error",
    match: Sequence[str] = STEPS,
    example_input: Any = None,
    src_example_input: Any = None,
    classes: Sequence[int] | None = None,
    adopt_epsilon: bool = False,
    trust_pickle: bool = False,
) -> TransferReport:
    """Copy into ``dst`` (in place) every source tensor that fits and report every tensor.

    Pairs are found by ``mapping`` (``{dst_regex: src_template}``, wins), then the steps in
    ``match``: exact names, dot-bounded suffixes, structural alignment of layers in execution
    order (traced with ``example_input`` when given). ``include``/``exclude`` are selectors over
    ``dst``; unselected tensors are kept. Shape mismatches: ``"error"`` raises
    :class:`ShapeMismatchError` with names and shapes before anything is written, ``"skip"``
    re-initialises the mismatched tensors' layers, ``"adapt"`` applies the named adapters of
    :mod:`netgraft.transfer.adapt` (``classes`` picks classifier rows) and raises where none
    fits. Normalisation epsilons that differ from the source are noted and, with
    ``adopt_epsilon``, set on ``dst``.
    """
    _check_arguments(dst, on_mismatch)
    source = load_source(src, example_input=src_example_input, trust_pickle=trust_pickle)
    target = _Destination.read(dst, example_input)
    selected = _selected(dst, include, exclude)
    active = [x for x in target.layers if selected is None or x.name in selected]
    shapes_s = {k: tuple(v.shape) for k, v in source.tensors.items()}
    plan = plan_pairs(
        active, source.layers, target.shapes, shapes_s, mapping=mapping, steps=tuple(match)
    )
    values, mismatched = _values(plan, source, target, on_mismatch, classes)
    report = TransferReport(
        source=source.description, mismatched=mismatched, notes=list(source.notes)
    )
    skipped = {target.owner[m.name] for m in mismatched} if on_mismatch == "skip" else set()
    with torch.no_grad():
        reinitialised = _reinit_layers(target, skipped, report)
        _write(target, plan, values, shapes_s, selected, reinitialised, report)
    _epsilon_notes(report, plan.layer_pairs, source, target.modules, adopt_epsilon)
    _sort_leftovers(report, plan, source, target, selected)
    log.info("%s", report.summary())
    return report


def _check_arguments(dst: Any, on_mismatch: str) -> None:
    if on_mismatch not in POLICIES:
        raise NetgraftError(
            f"on_mismatch must be one of {', '.join(POLICIES)}; found {on_mismatch!r}"
        )
    if not isinstance(dst, nn.Module):
        raise NetgraftError(
            f"transfer destination must be a torch.nn.Module; found {type(dst).__name__}"
        )


def _values(
    plan: Any,
    source: Source,
    target: _Destination,
    on_mismatch: str,
    classes: Sequence[int] | None,
) -> tuple[dict[str, tuple[torch.Tensor, str | None]], list[Mismatch]]:
    """The value (and adapter rule, if any) each paired destination tensor will get, and the
    pairs whose shapes differ; raises before anything is written when the policy forbids them."""
    first_conv = target.first_of(nn.modules.conv._ConvNd)
    head = target.last_of(nn.Linear)
    values: dict[str, tuple[torch.Tensor, str | None]] = {}
    mismatched: list[Mismatch] = []
    unfit: list[Mismatch] = []
    for name, pair in plan.pairs.items():
        value = source.tensors[pair.src]
        if tuple(value.shape) == target.shapes[name]:
            values[name] = (value, None)
            continue
        miss = Mismatch(name, target.shapes[name], pair.src, tuple(value.shape), pair.how)
        mismatched.append(miss)
        if on_mismatch != "adapt":
            continue
        owner = target.owner[name]
        found = adapt_tensor(
            name,
            target.state[name],
            value,
            first_conv=owner == first_conv,
            head=owner == head,
            classes=classes,
        )
        if found is None:
            unfit.append(miss)
        else:
            values[name] = found
    if mismatched and on_mismatch == "error":
        raise ShapeMismatchError(
            _mismatch_message(
                mismatched, source.description, "on_mismatch='skip' or 'adapt' (CLI --on-mismatch)"
            )
        )
    if unfit:
        raise ShapeMismatchError(
            _mismatch_message(
                unfit, source.description, "on_mismatch='skip', or a mapping", adapt=True
            )
        )
    return values, mismatched


def _reinit_layers(target: _Destination, names: set[str], report: TransferReport) -> set[str]:
    """Re-initialise the layers whose tensors were skipped for a shape mismatch; the names of
    those that could be (the others are kept as they were, with a note)."""
    done: set[str] = set()
    for name in names:
        try:
            reinit_module(target.modules[name])
            done.add(name)
        except NetgraftError as exc:
            report.notes.append(f"{name}: kept as it was, not re-initialised: {exc}")
    return done


def _write(
    target: _Destination,
    plan: Any,
    values: dict[str, tuple[torch.Tensor, str | None]],
    shapes_s: dict[str, tuple[int, ...]],
    selected: set[str] | None,
    reinitialised: set[str],
    report: TransferReport,
) -> None:
    """Copy every planned value into the destination and give every tensor its record."""
    params = {n for n, _ in target.model.named_parameters(remove_duplicate=False)}
    for layer in target.layers:
        for full in layer.tensors.values():
            tensor = target.state[full]
            record = TensorRecord(
                name=full,
                status="kept",
                shape=target.shapes[full],
                numel=tensor.numel(),
                is_parameter=full in params,
            )
            pair = plan.pairs.get(full)
            if pair is not None:
                record.source, record.how = pair.src, pair.how
                record.source_shape = shapes_s[pair.src]
            if full in values:
                value, rule = values[full]
                tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
                record.status = "adapted" if rule else "copied"
                record.rule = rule
                if rule:
                    log.info(
                        "adapted %s from %s %s by %s", full, pair.src, record.source_shape, rule
                    )
            elif layer.name in reinitialised:
                record.status = "reinitialised"
                record.note = "shape mismatch" if pair is not None else "layer re-initialised"
            elif selected is not None and layer.name not in selected:
                record.note = "not selected"
            else:
                record.note = "shape mismatch" if pair is not None else "no source"
            report.records[full] = record


def _sort_leftovers(
    report: TransferReport,
    plan: Any,
    source: Source,
    target: _Destination,
    selected: set[str] | None,
) -> None:
    """Source tensors nothing used: ``not_selected`` when their partner lies outside the
    selection, ``unexpected`` otherwise."""
    used = {p.src for p in plan.pairs.values()}
    leftover = [name for name in source.tensors if name not in used]
    outside = [
        full
        for layer in target.layers
        if selected is not None and layer.name not in selected
        for full in layer.tensors.values()
    ]
    partners: set[str] = set()
    if outside and leftover:
        try:
            partners = {src for src, _ in name_matches(outside, leftover, STEPS).values()}
        except NetgraftError:  # an ambiguous name outside the selection is not an error
            partners = set()
    for name in leftover:
        (report.not_selected if name in partners else report.unexpected).append(name)


def _epsilon_notes(
    report: TransferReport,
    layer_pairs: list[tuple[str, str]],
    source: Source,
    modules: dict[str, nn.Module],
    adopt: bool,
) -> None:
    eps_of = {layer.name: layer.eps for layer in source.layers if layer.eps is not None}
    for dst_name, src_name in layer_pairs:
        if src_name not in eps_of:
            continue
        module = modules.get(dst_name)
        have = getattr(module, "eps", None)
        if not isinstance(have, float):
            continue
        want = eps_of[src_name]
        if abs(have - want) <= 1e-12:
            continue
        if adopt:
            module.eps = want
            report.notes.append(f"{dst_name}: epsilon set to the source's {want:g} (was {have:g})")
        else:
            report.notes.append(
                f"{dst_name}: epsilon {have:g} differs from the source's {want:g} "
                f"(outputs will differ; pass adopt_epsilon=True to set it)"
            )


def _mismatch_message(items: list[Mismatch], source: str, hint: str, *, adapt: bool = False) -> str:
    shown = "; ".join(str(m) for m in items[:8])
    more = f"; … (+{len(items) - 8})" if len(items) > 8 else ""
    what = "no adapter fits" if adapt else "shapes differ"
    return (
        f"transfer from {source}: {len(items)} tensor pair(s) where {what} "
        f"(destination <- source, expected equal shapes): {shown}{more}; "
        f"nothing was changed. Use {hint}."
    )
