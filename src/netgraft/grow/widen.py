"""Widen a trained Linear or Conv2d without changing what the network computes (Net2WiderNet).

:func:`widen` grows a layer from ``n`` to ``width`` output units by copying randomly chosen
units, carries the copy through what consumes them — a BatchNorm right after (affine
parameters and running statistics copied through the same replication map), channel-wise
activations, dropout and pooling, a ``Flatten`` whose ``Linear`` sees each channel as a
block of columns — and divides the consumer's incoming weights among each unit's copies,
so their contributions add up to the original one. Names in the state dict stay the same;
only shapes grow.

The consumer is found on the ``torch.fx`` graph of the model: the output must flow through
nothing but those channel-wise steps into exactly one Linear or Conv2d. Anything else — a
residual addition, a concatenation, a reshape across channels — is refused with
:class:`SurgeryError`, because the widened units would reach places this module does not
rewrite. This module never approximates; ``noise`` only changes how each unit's weight is
split among its copies (the split still sums to one), which breaks their symmetry exactly.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import NetgraftError, SurgeryError
from ..layers import layers
from ..recipe import PROBE_ARGUMENTS, Resolved, recorded
from ..select import Selector, resolve_module
from .carry import record_growth
from .verify import apply_growth, growth_probe

__all__ = ["widen"]

log = logging.getLogger(__name__)

# modules and functions that act on each unit (channel) on its own: widened units pass through
_CHANNELWISE_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.elu,
    F.hardswish,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.sigmoid,
}
_CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_FLATTEN_METHODS = {"view", "reshape", "flatten"}
_METADATA_METHODS = {"size", "dim"}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _describe(node: Any) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "output":
        return "the model's output"
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} {target!r}"


def _consumer_from_graph(model: nn.Module, name: str) -> tuple[str | None, str]:
    """``(norm, consumer)`` found by following ``name``'s output on the fx graph; raises
    :class:`SurgeryError` when the flow is not a single channel-wise path to one layer."""
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        raise SurgeryError(
            f"cannot widen {name!r}: the forward calls it {len(calls)} times; widening needs "
            f"exactly one use"
        )
    node, norm = calls[0], None
    while True:
        user = _only_user(name, node)
        if user.op == "call_module":
            module = modules[user.target]
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                return norm, user.target
            if isinstance(module, _NORMS) and norm is None:
                norm = user.target
            elif not isinstance(module, (*_CHANNELWISE_MODULES, nn.Flatten)):
                raise SurgeryError(
                    f"cannot widen {name!r}: its output passes through {user.target!r} "
                    f"({type(module).__name__}), which netgraft cannot widen exactly"
                )
        else:
            _check_channelwise(name, user)
        node = user


def _only_user(name: str, node: torch.fx.Node) -> torch.fx.Node:
    """The one operation that reads ``node`` (shape queries aside), which must not be the
    model's output."""
    users = [
        u
        for u in node.users
        if not (u.op == "call_method" and u.target in _METADATA_METHODS)
        and not (u.op == "call_function" and u.target is getattr and u.args[1] == "shape")
    ]
    if len(users) != 1:
        found = ", ".join(_describe(u) for u in users) or "nothing"
        raise SurgeryError(
            f"cannot widen {name!r}: its output must flow into exactly one layer, but "
            f"{_describe(node)} feeds {len(users)} operations ({found}), e.g. a residual "
            f"addition; the consumer cannot be determined unambiguously"
        )
    if users[0].op == "output":
        raise SurgeryError(
            f"cannot widen {name!r}: its units are the model's output, whose shape must "
            f"not change (replace the head to change the number of outputs)"
        )
    return users[0]


def _check_channelwise(name: str, user: torch.fx.Node) -> None:
    """Refuse a function or method call on the widened units that is not channel-wise."""
    if user.op == "call_function" and (
        user.target in _CHANNELWISE_FUNCTIONS or user.target is torch.flatten
    ):
        return
    if user.op == "call_method" and user.target in _CHANNELWISE_METHODS | _FLATTEN_METHODS:
        return
    if user.op == "call_function" and user.target in (operator.add, torch.add, torch.cat):
        raise SurgeryError(
            f"cannot widen {name!r}: its output reaches {_describe(user)} (a residual "
            f"addition or concatenation); the consumer cannot be determined unambiguously"
        )
    raise SurgeryError(
        f"cannot widen {name!r}: its output reaches {_describe(user)}, which netgraft "
        f"cannot widen exactly"
    )


def _consumer_from_table(model: nn.Module, name: str, inputs: Any) -> tuple[str | None, str]:
    """``(norm, consumer)`` guessed from the execution-ordered layer table (used when the
    model cannot be traced with fx; the result is then verified, never trusted)."""
    table = layers(model, inputs)
    names = table.names
    if name not in names:
        raise SurgeryError(f"cannot widen {name!r}: the forward pass never calls it")
    rest = table[names.index(name) + 1 :]
    norm = None
    if rest and isinstance(rest[0].module, _NORMS):
        norm, rest = rest[0].name, rest[1:]
    if not rest or not isinstance(rest[0].module, (nn.Linear, nn.Conv2d)):
        raise SurgeryError(
            f"cannot widen {name!r}: the layer consuming its output cannot be determined; "
            f"pass next_layer="
        )
    return norm, rest[0].name


def _split_fractions(
    mapping: torch.Tensor, n: int, noise: float, generator: torch.Generator
) -> torch.Tensor:
    """How much of unit ``mapping[j]``'s outgoing weight copy ``j`` carries; the fractions of
    one unit's copies sum to one (equal without noise)."""
    share = torch.ones(len(mapping), dtype=torch.float64)
    if noise > 0:
        share = torch.exp(
            noise * torch.randn(len(mapping), generator=generator, dtype=torch.float64)
        )
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, mapping, share)
    return share / total[mapping]


def _replace(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))
    else:
        module._buffers[attr] = value.to(old.dtype)


def _state(module: nn.Module) -> tuple[dict, dict, dict]:
    attrs = {
        k: getattr(module, k)
        for k in ("out_features", "in_features", "out_channels", "in_channels", "num_features")
        if hasattr(module, k)
    }
    return dict(module._parameters), dict(module._buffers), attrs


def _restore(module: nn.Module, saved: tuple[dict, dict, dict]) -> None:
    params, buffers, attrs = saved
    module._parameters.update(params)
    module._buffers.update(buffers)
    for k, v in attrs.items():
        setattr(module, k, v)


@recorded("widen", omit=PROBE_ARGUMENTS)
def widen(
    model: nn.Module,
    layer: Selector,
    width: int,
    *,
    noise: float = 0.0,
    seed: int = 0,
    next_layer: str | None = None,
    norm: str | None = None,
    example_input: Any = None,
    verify: bool = True,
    atol: float | None = None,
) -> Resolved[nn.Module]:
    """Widen the Linear or Conv2d ``layer`` picks to ``width`` output units (Net2WiderNet)
    so the model computes exactly what it computed before; return the model, changed in
    place (parameters are replaced: build the optimizer after growing, or grow with
    :class:`netgraft.Grow` / :func:`netgraft.grow.grow_with_optimizer`, which carry its
    state).

    New units copy randomly chosen existing ones (``seed``); a BatchNorm right after is
    widened with the same map; the next Linear/Conv2d (through activations, pooling and a
    Flatten) divides each unit's incoming weights among its copies — equally, or in random
    shares summing to one with ``noise`` > 0. The consumer is found on the fx graph unless
    ``next_layer`` (and ``norm``, None meaning no norm) name them. Anything it cannot
    determine or rewrite exactly raises :class:`SurgeryError`. Verification works as in
    :func:`netgraft.deepen`.
    """
    name, target, n = _widened_layer(model, layer, width)
    if noise < 0:
        raise NetgraftError(f"noise must be >= 0; found {noise}")
    probe = growth_probe(model, example_input, what="widen", verify=verify, atol=atol)
    if next_layer is None:
        norm, next_layer = _find_consumer(model, name, probe.inputs)
    bn, consumer, block = _checked_consumer(model, name, target, n, next_layer, norm)
    generator = torch.Generator().manual_seed(seed)
    mapping = torch.cat([torch.arange(n), torch.randint(0, n, (width - n,), generator=generator)])
    fractions = _split_fractions(mapping, n, noise, generator)
    units = _Units(mapping, fractions, block)
    apply_growth(model, probe, lambda: _widen_in_place(target, bn, consumer, units))
    log.info("widen: %r from %d to %d outputs, carried into %r", name, n, width, next_layer)
    return Resolved(model, {"layer": name, "next_layer": next_layer, "norm": norm})


@dataclass(frozen=True)
class _Units:
    """The copy map of a widening: the old unit each new unit copies, each copy's share of
    its unit's outgoing weights, and the consumer's columns per unit."""

    mapping: torch.Tensor
    fractions: torch.Tensor
    block: int


def _widen_in_place(
    target: nn.Module, bn: nn.Module | None, consumer: nn.Module, units: _Units
) -> Callable[[], None]:
    """Copy ``target``'s units (and ``bn``'s) and divide ``consumer``'s inputs among the
    copies; return what puts the three modules back as they were."""
    saved = [(m, _state(m)) for m in (target, bn, consumer) if m is not None]
    with torch.no_grad():
        _widen_outputs(target, units.mapping, units.fractions)
        if bn is not None:
            _widen_norm(bn, units.mapping, units.fractions)
        _split_inputs(consumer, units.mapping, units.fractions, units.block)

    def undo() -> None:
        for module, state in saved:
            _restore(module, state)

    return undo


def _widened_layer(model: nn.Module, layer: Selector, width: int) -> tuple[str, nn.Module, int]:
    """``(name, module, outputs)`` of the layer to widen, checked to be widenable to ``width``."""
    name, target = resolve_module(model, layer, what="widen layer")
    if not isinstance(target, (nn.Linear, nn.Conv2d)):
        raise SurgeryError(
            f"widen works on a Linear or Conv2d; {name!r} is a {type(target).__name__}"
        )
    if isinstance(target, nn.Conv2d) and target.groups != 1:
        raise SurgeryError(
            f"cannot widen {name!r}: it is a grouped convolution (groups={target.groups})"
        )
    n = target.out_features if isinstance(target, nn.Linear) else target.out_channels
    if not isinstance(width, int) or width <= n:
        raise SurgeryError(
            f"widen grows a layer: {name!r} has {n} outputs, so width must be an integer "
            f"above {n}; found {width!r}"
        )
    return name, target, n


def _find_consumer(model: nn.Module, name: str, inputs: Any) -> tuple[str | None, str]:
    """``(norm, consumer)`` from the fx graph, or, where fx cannot trace the model, guessed
    from the layer table on ``inputs`` (then verified, never trusted)."""
    try:
        return _consumer_from_graph(model, name)
    except SurgeryError:
        raise
    except Exception as exc:  # fx cannot trace data-dependent Python: fall back, verified
        if inputs is None:
            raise SurgeryError(
                f"cannot trace {type(model).__name__} with torch.fx to find the layer "
                f"consuming {name!r} ({type(exc).__name__}); pass next_layer= (and norm=), "
                f"or keep verify=True so a guess from the layer table can be checked"
            ) from exc
        return _consumer_from_table(model, name, inputs)


def _checked_consumer(
    model: nn.Module,
    name: str,
    target: nn.Module,
    n: int,
    next_layer: str,
    norm: str | None,
) -> tuple[nn.Module | None, nn.Module, int]:
    """``(norm module, consumer module, block)``: checked to read the ``n`` units of ``name``,
    ``block`` columns per unit for a Linear after a Flatten (1 otherwise)."""
    modules = dict(model.named_modules())
    for what, key in (("next_layer", next_layer), ("norm", norm)):
        if key is not None and key not in modules:
            raise SurgeryError(f"widen {what} {key!r} is not a module of {type(model).__name__}")
    consumer = modules[next_layer]
    bn = modules[norm] if norm is not None else None
    if bn is not None and (not isinstance(bn, _NORMS) or bn.num_features != n):
        raise SurgeryError(
            f"cannot widen {name!r}: {norm!r} should be a BatchNorm over its {n} outputs; "
            f"found {bn}"
        )
    if isinstance(consumer, nn.Conv2d):
        if consumer.groups != 1 or consumer.in_channels != n:
            raise SurgeryError(
                f"cannot widen {name!r}: the next layer {next_layer!r} should read its {n} "
                f"channels with groups=1; found {consumer}"
            )
        return bn, consumer, 1
    if isinstance(consumer, nn.Linear):
        block, rest = divmod(consumer.in_features, n)
        if rest or block < 1 or (isinstance(target, nn.Linear) and block != 1):
            raise SurgeryError(
                f"cannot widen {name!r}: the next layer {next_layer!r} reads "
                f"{consumer.in_features} features, not {n} units (or {n} flattened channels)"
            )
        return bn, consumer, block
    raise SurgeryError(
        f"the next layer {next_layer!r} must be a Linear or Conv2d; found {consumer}"
    )


def _copy_units(
    module: nn.Module, attr: str, mapping: torch.Tensor, fractions: torch.Tensor
) -> None:
    """Replace ``module.attr`` by its units copied through ``mapping``. A copy's gradient is
    its consumer's fraction of the original's (recorded for :class:`netgraft.Grow`)."""
    old = getattr(module, attr)
    _replace(module, attr, old[mapping])
    if isinstance(old, nn.Parameter):
        grad = fractions.view(-1, *(1,) * (old.dim() - 1))
        record_growth(getattr(module, attr), old, lambda t: t[mapping], grad=grad)


def _widen_outputs(target: nn.Module, mapping: torch.Tensor, fractions: torch.Tensor) -> None:
    """Give ``target`` one output unit per entry of ``mapping``, copying that unit."""
    _copy_units(target, "weight", mapping, fractions)
    if target.bias is not None:
        _copy_units(target, "bias", mapping, fractions)
    if isinstance(target, nn.Linear):
        target.out_features = len(mapping)
    else:
        target.out_channels = len(mapping)


def _widen_norm(bn: nn.Module, mapping: torch.Tensor, fractions: torch.Tensor) -> None:
    """Copy a BatchNorm's affine parameters and running statistics through ``mapping``."""
    for attr in ("weight", "bias", "running_mean", "running_var"):
        if getattr(bn, attr, None) is not None:
            _copy_units(bn, attr, mapping, fractions)
    bn.num_features = len(mapping)


def _split_inputs(
    consumer: nn.Module, mapping: torch.Tensor, fractions: torch.Tensor, block: int
) -> None:
    """Give ``consumer`` one input unit (``block`` columns for a Linear after a Flatten) per
    entry of ``mapping``, each carrying its fraction of the original unit's weights."""
    w = consumer.weight
    width = len(mapping)
    if isinstance(consumer, nn.Conv2d):
        factor = fractions.view(1, -1, 1, 1)

        def select(t: torch.Tensor) -> torch.Tensor:
            return t[:, mapping]

        consumer.in_channels = width
    else:
        n = w.shape[1] // block
        factor = fractions.view(1, -1, 1).expand(w.shape[0], width, block).reshape(w.shape[0], -1)

        def select(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], n, block)[:, mapping].reshape(t.shape[0], width * block)

        consumer.in_features = width * block
    _replace(consumer, "weight", select(w).to(torch.float64) * factor)
    record_growth(consumer.weight, w, select, factor=factor)
