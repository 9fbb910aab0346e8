"""Pair destination tensors with source tensors: mapping, names, then structure.

Works on *layers*: groups of tensors owned by one module (``features.3.conv.0`` with
``weight``; a BatchNorm with ``weight, bias, running_mean, running_var,
num_batches_tracked``). Steps, each recorded as the pair's ``how``:

1. ``mapping``: an explicit ``{dst_regex: src_template}`` (full match on a tensor name, or
   on a layer name for all its tensors); wins over every other step.
2. ``exact``: equal names after stripping wrapper prefixes (``module.``, ``model.``,
   ``_orig_mod.``) that every name of one side carries.
3. ``suffix``: one name is a dot-bounded suffix of the other, sharing at least module and
   tensor name; the longest shared suffix wins, a tie is an error naming the candidates.
4. ``structure``: both layer sequences in execution order, aligned with Needleman-Wunsch
   by tensor names and shapes (name agreement breaks ties), so an inserted, removed or
   renamed layer costs a gap instead of shifting everything after it.

This module only plans; it never reads or writes a model's values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import NetgraftError, closest

__all__ = [
    "DstLayer",
    "Pair",
    "Plan",
    "Source",
    "SourceLayer",
    "group_layers",
    "name_matches",
    "plan_pairs",
    "strip_wrappers",
]

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
COUNTERS = ("num_batches_tracked",)
STEPS = ("exact", "suffix", "structure")

# alignment scores: a gap must cost less than any compatible pair gains, and a name
# agreement must never outweigh a gap, or shifted names would pull the alignment apart
_MATCH = 10.0
_SAME_KIND = 0.0
_NAME_BONUS = 0.5
_GAP = -1.0


@dataclass
class SourceLayer:
    """A group of source tensors in torch layout: ``tensors`` maps the local name
    (``weight``, ``running_var``) to the full source tensor name."""

    name: str
    tensors: dict[str, str]
    eps: float | None = None


@dataclass
class Source:
    """Source tensors in torch layout, grouped into layers in execution order, with a
    description for the report and notes on conversions made while reading."""

    description: str
    tensors: dict[str, torch.Tensor]
    layers: list[SourceLayer]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], description: str, order: list[str] | None = None
    ) -> Source:
        """A source from a flat state dict; ``order`` lists module names in execution order."""
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        groups = group_layers(list(tensors), order)
        return cls(description, tensors, [SourceLayer(name, t) for name, t in groups])


@dataclass
class DstLayer:
    """A destination layer: its module name and its tensors (local -> full name)."""

    name: str
    tensors: dict[str, str]


@dataclass
class Pair:
    dst: str
    src: str
    how: str


@dataclass
class Plan:
    """Tensor pairs (destination name -> :class:`Pair`) and layer pairs (for epsilon notes)."""

    pairs: dict[str, Pair] = field(default_factory=dict)
    layer_pairs: list[tuple[str, str]] = field(default_factory=list)
    name_partner: dict[str, str] = field(default_factory=dict)


def strip_wrappers(names: list[str]) -> dict[str, str]:
    """Map each name to itself without the wrapper prefixes that *every* name carries."""
    out = {n: n for n in names}
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(v.startswith(prefix) for v in out.values()):
                out = {k: v[len(prefix) :] for k, v in out.items()}
                changed = True
    return out


def group_layers(
    names: list[str], order: list[str] | None = None
) -> list[tuple[str, dict[str, str]]]:
    """Group full tensor names by owning module (``a.b.weight`` -> ``a.b``), in ``order`` of
    module names when given (others after, in name order), else first-seen order."""
    groups: dict[str, dict[str, str]] = {}
    for full in names:
        owner, _, local = full.rpartition(".")
        groups.setdefault(owner, {})[local] = full
    if order is not None:
        rank = {n: i for i, n in enumerate(order)}
        seen = {n: i for i, n in enumerate(groups)}
        keys = sorted(groups, key=lambda n: (n not in rank, rank.get(n, 0), seen[n]))
    else:
        keys = list(groups)
    return [(k, groups[k]) for k in keys]


def _signature(tensors: dict[str, str], shapes: Mapping[str, tuple]) -> tuple:
    return tuple(
        sorted((loc, shapes[full]) for loc, full in tensors.items() if loc not in COUNTERS)
    )


def _kind(tensors: dict[str, str], shapes: Mapping[str, tuple]) -> tuple:
    return tuple(
        sorted((loc, len(shapes[full])) for loc, full in tensors.items() if loc not in COUNTERS)
    )


def _suffix_index(names: list[str]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) - 1):  # proper suffixes of at least two components
            index.setdefault(".".join(parts[i:]), []).append(name)
    return index


def _first(names) -> str | None:
    heads = {n.split(".", 1)[0] for n in names}
    if len(heads) != 1 or any("." not in n for n in names):
        return None
    return heads.pop()


def _strip_common(
    dst_norm: dict[str, str], by_norm: dict[str, str]
) -> tuple[dict[str, str], dict[str, str], bool]:
    """Strip a leading component every name of one side carries while that makes more names
    equal (a dot-bounded suffix match decided once for the whole model, not per tensor)."""
    stripped = False
    for _ in range(3):
        hits = len(set(dst_norm.values()) & set(by_norm))
        head_d, head_s = _first(dst_norm.values()), _first(by_norm)
        if head_d is not None:
            trial = {k: v[len(head_d) + 1 :] for k, v in dst_norm.items()}
            if len(set(trial.values()) & set(by_norm)) > hits:
                dst_norm, stripped = trial, True
                continue
        if head_s is not None:
            trial_s = {k[len(head_s) + 1 :]: v for k, v in by_norm.items()}
            if len(set(dst_norm.values()) & set(trial_s)) > hits:
                by_norm, stripped = trial_s, True
                continue
        break
    return dst_norm, by_norm, stripped


def name_matches(
    dst_names: list[str],
    src_names: list[str],
    steps: tuple[str, ...],
) -> dict[str, tuple[str, str]]:
    """dst full name -> (src full name, how) by exact and suffix names."""
    dst_norm = strip_wrappers(dst_names)
    src_norm = strip_wrappers(src_names)
    by_norm = {v: k for k, v in src_norm.items()}
    stripped = False
    if "suffix" in steps:  # a container around one side (nn.Sequential(backbone)): "0." on all
        dst_norm, by_norm, stripped = _strip_common(dst_norm, by_norm)
    longer = _suffix_index(list(by_norm)) if "suffix" in steps else {}
    out: dict[str, tuple[str, str]] = {}
    for full in dst_names:
        d = dst_norm[full]
        if ("exact" in steps or stripped) and d in by_norm:
            out[full] = (by_norm[d], "suffix" if stripped else "exact")
            continue
        if "suffix" not in steps or d.count(".") < 1:
            continue
        # a source name that ends with the whole destination name shares the longest suffix
        cands = longer.get(d, [])
        if len(cands) > 1:
            shown = ", ".join(sorted(by_norm[c] for c in cands)[:6])
            raise NetgraftError(
                f"destination tensor {full!r} matches several source tensors by suffix: {shown}; "
                f"pass mapping={{{full!r}: 'SOURCE_NAME'}} or leave suffix matching out with "
                f"match=('exact', 'structure')"
            )
        if cands:
            out[full] = (by_norm[cands[0]], "suffix")
            continue
        parts = d.split(".")
        for i in range(1, len(parts) - 1):
            tail = ".".join(parts[i:])
            if tail in by_norm:
                out[full] = (by_norm[tail], "suffix")
                break
    return out


def _mapping_pairs(
    mapping: Mapping[str, str],
    dst_layers: list[DstLayer],
    src_names: set[str],
) -> dict[str, Pair]:
    out: dict[str, Pair] = {}
    src_norm = strip_wrappers(sorted(src_names))
    by_norm = {v: k for k, v in src_norm.items()}

    def resolve(name: str) -> str | None:
        if name in src_names:
            return name
        return by_norm.get(name)

    for pattern, template in mapping.items():
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise NetgraftError(f"mapping key {pattern!r} is not a valid regex: {exc}") from exc
        hits = 0
        for layer in dst_layers:
            m_layer = rx.fullmatch(layer.name)
            for local, full in layer.tensors.items():
                m = rx.fullmatch(full)
                if m is not None:
                    target = m.expand(template)
                elif m_layer is not None:
                    base = m_layer.expand(template)
                    target = f"{base}.{local}" if base else local
                else:
                    continue
                src = resolve(target)
                if src is None:
                    if m is None and local in COUNTERS:
                        continue
                    near = closest(target, sorted(src_names), always=True)
                    raise NetgraftError(
                        f"mapping {pattern!r} -> {template!r} sends {full!r} to source tensor "
                        f"{target!r}, which does not exist; closest: "
                        f"{', '.join(repr(c) for c in near)}"
                    )
                out[full] = Pair(full, src, "mapping")
                hits += 1
        if hits == 0:
            raise NetgraftError(
                f"mapping key {pattern!r} matches no destination tensor or layer name "
                f"(full match; list them with netgraft.layers(model))"
            )
    return out


def _align(
    dst: list[DstLayer],
    src: list[SourceLayer],
    shapes_d: Mapping[str, tuple],
    shapes_s: Mapping[str, tuple],
    partner: dict[str, str],
) -> list[tuple[int, int]]:
    """Needleman-Wunsch over layer sequences; returns aligned (dst index, src index) pairs."""
    n, m = len(dst), len(src)
    sd, ss, kd, ks = _interned(dst, src, shapes_d, shapes_s)
    want = [partner.get(x.name) for x in dst]
    src_names = [x.name for x in src]
    neg = float("-inf")
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    back = [[0] * (m + 1) for _ in range(n + 1)]  # 0 diag, 1 up (dst gap), 2 left (src gap)
    for j in range(1, m + 1):
        score[0][j] = j * _GAP
        back[0][j] = 2
    for i in range(1, n + 1):
        score[i][0] = i * _GAP
        back[i][0] = 1
        row, prev = score[i], score[i - 1]
        brow = back[i]
        sdi, kdi, wi = sd[i - 1], kd[i - 1], want[i - 1]
        for j in range(1, m + 1):
            if ss[j - 1] == sdi:
                pair = _MATCH
            elif ks[j - 1] == kdi:
                pair = _SAME_KIND
            else:
                pair = neg
            if pair != neg and wi is not None and wi == src_names[j - 1]:
                pair += _NAME_BONUS
            diag = prev[j - 1] + pair
            up = prev[j] + _GAP
            left = row[j - 1] + _GAP
            if diag >= up and diag >= left:
                row[j], brow[j] = diag, 0
            elif up >= left:
                row[j], brow[j] = up, 1
            else:
                row[j], brow[j] = left, 2
    return _trace_back(back, n, m)


def _interned(
    dst: list[DstLayer],
    src: list[SourceLayer],
    shapes_d: Mapping[str, tuple],
    shapes_s: Mapping[str, tuple],
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Signatures and kinds of both sequences as small ints, so the inner loop of
    :func:`_align` compares ints: ``(dst signatures, src signatures, dst kinds, src kinds)``."""
    ids: dict[tuple, int] = {}
    sd = [ids.setdefault(_signature(x.tensors, shapes_d), len(ids)) for x in dst]
    ss = [ids.setdefault(_signature(x.tensors, shapes_s), len(ids)) for x in src]
    kd = [ids.setdefault(("kind", _kind(x.tensors, shapes_d)), len(ids)) for x in dst]
    ks = [ids.setdefault(("kind", _kind(x.tensors, shapes_s)), len(ids)) for x in src]
    return sd, ss, kd, ks


def _trace_back(back: list[list[int]], n: int, m: int) -> list[tuple[int, int]]:
    """The aligned (dst index, src index) pairs read back from the alignment's moves."""
    pairs = []
    i, j = n, m
    while i > 0 or j > 0:
        move = back[i][j]
        if move == 0:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    pairs.reverse()
    return pairs


def plan_pairs(
    dst_layers: list[DstLayer],
    src_layers: list[SourceLayer],
    shapes_d: Mapping[str, tuple],
    shapes_s: Mapping[str, tuple],
    *,
    mapping: Mapping[str, str] | None = None,
    steps: tuple[str, ...] = STEPS,
) -> Plan:
    """Pair destination tensors with source tensors (see the module docstring for the steps).

    ``dst_layers`` and ``src_layers`` are in execution order; only the given destination
    layers take part (the selection is applied by the caller).
    """
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise NetgraftError(f"match steps must be among {', '.join(STEPS)}; found {bad}")
    plan = Plan()
    src_names = {full for layer in src_layers for full in layer.tensors.values()}
    src_owner = {full: layer.name for layer in src_layers for full in layer.tensors.values()}
    if mapping:
        plan.pairs.update(_mapping_pairs(mapping, dst_layers, src_names))
    dst_names = [full for layer in dst_layers for full in layer.tensors.values()]
    named = name_matches(dst_names, sorted(src_names), steps)
    _vote_name_partners(plan, dst_layers, named, src_owner)
    mapped_dst = {
        layer.name for layer in dst_layers if any(f in plan.pairs for f in layer.tensors.values())
    }
    free_dst = [x for x in dst_layers if x.name not in mapped_dst]
    # a source layer a mapping used stays available: one source may feed several layers
    layer_pairs = _pair_layers(plan, free_dst, src_layers, (shapes_d, shapes_s), steps)
    src_by_name = {x.name: x for x in src_layers}
    for x in dst_layers:
        if x.name in layer_pairs:
            s_name, how = layer_pairs[x.name]
            plan.layer_pairs.append((x.name, s_name))
            _pair_tensors(plan, x, src_by_name[s_name], how, named, src_owner)
    for layer in dst_layers:  # mapped layers: remaining tensors by name only
        if layer.name in mapped_dst:
            for full in layer.tensors.values():
                if full not in plan.pairs and full in named:
                    plan.pairs[full] = Pair(full, *named[full])
    return plan


def _vote_name_partners(
    plan: Plan, dst_layers: list[DstLayer], named: Mapping[str, Any], src_owner: Mapping[str, str]
) -> None:
    """The name partner of each destination layer: the source layer most of its tensors name."""
    for layer in dst_layers:
        votes: dict[str, int] = {}
        for full in layer.tensors.values():
            if full in named:
                owner = src_owner[named[full][0]]
                votes[owner] = votes.get(owner, 0) + 1
        if votes:
            plan.name_partner[layer.name] = max(votes, key=votes.get)


def _pair_layers(
    plan: Plan,
    free_dst: list[DstLayer],
    src_layers: list[SourceLayer],
    shapes: tuple[Mapping[str, tuple], Mapping[str, tuple]],
    steps: tuple[str, ...],
) -> dict[str, tuple[str, str]]:
    """Destination layer -> (source layer, how): by name when every free layer has a distinct
    name partner of the same signature (or structure is not a step), else by aligning the
    two sequences, with layers the alignment could not place still paired by name."""
    shapes_d, shapes_s = shapes
    src_by_name = {x.name: x for x in src_layers}
    partner = plan.name_partner
    fast = all(
        partner.get(x.name) in src_by_name
        and _signature(x.tensors, shapes_d)
        == _signature(src_by_name[partner[x.name]].tensors, shapes_s)
        for x in free_dst
    ) and len({partner.get(x.name) for x in free_dst}) == len(free_dst)
    if fast or "structure" not in steps:
        return {x.name: (partner[x.name], "name") for x in free_dst if x.name in partner}
    layer_pairs: dict[str, tuple[str, str]] = {}
    for i, j in _align(free_dst, src_layers, shapes_d, shapes_s, dict(partner)):
        d, s = free_dst[i], src_layers[j]
        layer_pairs[d.name] = (s.name, "name" if partner.get(d.name) == s.name else "structure")
    taken = {s for s, _ in layer_pairs.values()}
    for x in free_dst:
        want = partner.get(x.name)
        if x.name not in layer_pairs and want is not None and want not in taken:
            layer_pairs[x.name] = (want, "name")
            taken.add(want)
    return layer_pairs


def _pair_tensors(
    plan: Plan,
    dst: DstLayer,
    src: SourceLayer,
    how: str,
    named: Mapping[str, Any],
    src_owner: Mapping[str, str],
) -> None:
    """Pair the tensors of two paired layers: by name where the name points into ``src``,
    else by local name (``weight`` with ``weight``)."""
    for local, full in dst.tensors.items():
        if full in plan.pairs:
            continue
        if how == "name" and full in named and src_owner[named[full][0]] == src.name:
            source, step = named[full]
        elif local in src.tensors:
            source, step = src.tensors[local], "structure"
        else:
            continue
        plan.pairs[full] = Pair(full, source, step)
