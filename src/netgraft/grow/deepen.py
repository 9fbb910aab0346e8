"""Deepen a trained network in the middle without changing what it computes.

:func:`deepen` inserts a new layer after a chosen module by *wrapping* that module, so it
works in any ``nn.Module`` (not only ``nn.Sequential``). The module at ``NAME`` is replaced
by a :class:`Deepened` container whose children are

- ``NAME.0``: the original module, called with the original arguments (its weights move
  from ``NAME.weight`` to ``NAME.0.weight`` in the state dict);
- ``NAME.1``: the new layer — an identity-initialised ``Linear``/Dirac ``Conv2d``, or a
  :class:`Residual` ``y = x + branch(x)`` whose branch is ``NAME.1.branch.0`` (new layer),
  ``NAME.1.branch.1`` (activation) and ``NAME.1.branch.2`` (zero-initialised projection);
- ``NAME.2``: the activation after an identity layer, when one was asked for.

So ``netgraft.train_only(model, "NAME.1")`` (or ``netgraft.grown_modules(model)``) trains
exactly the new layer. Outputs of shape
``(N, C, H, W)`` get a ``Conv2d`` acting on channels; every other output a ``Linear`` on its
last dimension. This module never approximates: what cannot be exact is refused with
:class:`SurgeryError`, and it never uses the ``x * conv_ones(x)`` trick, which changes the
function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import NetgraftError, SurgeryError
from ..layers import display_name, probe
from ..recipe import PROBE_ARGUMENTS, Resolved, is_replaying, recorded
from ..select import Selector, outermost, select_modules
from .grown import mark_grown
from .verify import apply_growth, growth_probe

__all__ = ["ACTIVATIONS", "Deepened", "Residual", "deepen"]

log = logging.getLogger(__name__)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

# Outputs of these modules lie where the activation is the identity (relu(x) = x for x >= 0;
# relu6(x) = x on [0, 6]), so an identity layer followed by it changes nothing.
_NON_NEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid)
_IDEMPOTENT_ON: dict[str, tuple[type, ...]] = {
    "relu": _NON_NEGATIVE,
    "leaky_relu": _NON_NEGATIVE,
    "relu6": (nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid),
}
MODES = ("auto", "identity", "residual")


@dataclass(frozen=True)
class _NewLayer:
    """What the caller asked the inserted layer to be."""

    activation: str | None
    width: int | None
    kernel_size: int
    stride: int


class Deepened(nn.Sequential):
    """What :func:`deepen` puts in place of a module: child ``0`` is the original, called with
    the original arguments; each following child runs on the previous one's output."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        children = iter(self._modules.values())
        out = next(children)(*args, **kwargs)
        for module in children:
            out = module(out)
        return out


class Residual(nn.Module):
    """``y = x + branch(x)``; :func:`deepen` zero-initialises the branch's last layer."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def _trace_outputs(
    model: nn.Module, targets: list[str], inputs: Any
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """For each target: its per-example output shape and whether its output is provably
    non-negative (it is itself, or is the very tensor returned by, a ReLU-like module)."""
    modules = dict(model.named_modules())
    outputs: dict[str, Any] = {}
    non_negative: dict[str, list[torch.Tensor]] = {t: [] for t in targets}

    def on_target(name: str):
        def hook(_m, _i, out):
            outputs.setdefault(name, out)

        return hook

    def on_inner(target: str):
        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor):
                non_negative[target].append(out)

        return hook

    hooks = []
    for t in targets:
        hooks.append((modules[t], on_target(t)))
        for sub_name, sub in modules[t].named_modules():
            if sub_name and isinstance(sub, _NON_NEGATIVE):
                hooks.append((sub, on_inner(t)))
    probe(model, inputs, purpose="find what the chosen modules output", hooks=hooks)
    result = {}
    for t in targets:
        if t not in outputs:
            raise SurgeryError(
                f"cannot insert after {t!r}: the forward pass on the example input never calls it"
            )
        out = outputs[t]
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            found = (
                type(out).__name__ if not isinstance(out, torch.Tensor) else f"{out.dim()}-d tensor"
            )
            raise SurgeryError(
                f"cannot insert after {t!r}: deepen needs a module returning one batched tensor "
                f"(N, ...); {t!r} returns a {found}"
            )
        proven = isinstance(modules[t], _NON_NEGATIVE) or any(
            out is inner for inner in non_negative[t]
        )
        result[t] = (tuple(out.shape[1:]), proven)
    return result


def _identity_refusal(
    name: str,
    module: nn.Module,
    shape: tuple[int, ...],
    non_negative: bool,
    *,
    activation: str | None,
    width: int | None,
    kernel_size: int,
    stride: int,
) -> str | None:
    """Why an identity-initialised layer after ``name`` would not be exact (None if it is)."""
    conv = len(shape) == 3
    n = shape[0] if conv else shape[-1]
    unit = "channels" if conv else "features"
    if width is not None and width != n:
        kind = "Dirac (identity) Conv2d" if conv else "identity Linear"
        return f"a {kind} needs equal {unit} in and out; {name!r} gives {n}, width={width}"
    if conv and stride != 1:
        return f"a Dirac (identity) Conv2d needs stride 1 to keep the spatial size; found stride={stride}"
    if conv and kernel_size % 2 == 0:
        return f"a Dirac (identity) Conv2d needs an odd kernel for same padding; found kernel_size={kernel_size}"
    if activation is None:
        return None
    if activation not in _IDEMPOTENT_ON:
        return (
            f"an identity layer followed by {activation!r} is not exact: {activation}(x) != x; "
            f"use mode='residual'"
        )
    if not non_negative:
        return (
            f"an identity layer followed by {activation!r} is exact only when its input is "
            f"non-negative, and the output of {name!r} ({type(module).__name__}) can be "
            f"negative; insert after the activation, or use mode='residual'"
        )
    return None


def _residual_refusal(shape: tuple[int, ...], *, kernel_size: int, stride: int) -> str | None:
    if stride != 1:
        return f"a residual layer y = x + f(x) needs f to keep the shape; found stride={stride}"
    if len(shape) == 3 and kernel_size % 2 == 0:
        return f"a residual Conv2d needs an odd kernel for same padding; found kernel_size={kernel_size}"
    return None


def _new_layer(
    shape: tuple[int, ...], n_in: int, n_out: int, kernel_size: int, like: torch.Tensor
) -> nn.Module:
    if len(shape) == 3:
        layer: nn.Module = nn.Conv2d(n_in, n_out, kernel_size, padding=kernel_size // 2)
    else:
        layer = nn.Linear(n_in, n_out)
    return layer.to(device=like.device, dtype=like.dtype)


def _build(
    mode: str,
    shape: tuple[int, ...],
    *,
    activation: str | None,
    width: int | None,
    kernel_size: int,
    like: torch.Tensor,
) -> list[nn.Module]:
    conv = len(shape) == 3
    n = shape[0] if conv else shape[-1]
    with torch.no_grad():
        if mode == "identity":
            layer = _new_layer(shape, n, n, kernel_size, like)
            if conv:
                nn.init.dirac_(layer.weight)
            else:
                layer.weight.copy_(torch.eye(n, dtype=like.dtype))
            layer.bias.zero_()
            return [layer] + ([ACTIVATIONS[activation]()] if activation else [])
        hidden = width or n
        first = _new_layer(shape, n, hidden, kernel_size, like)
        last = _new_layer(shape, hidden, n, kernel_size, like)
        # zero weights and bias make the branch output exactly 0 while its gradient
        # with respect to `last` (the branch's input times the upstream gradient) is not
        last.weight.zero_()
        last.bias.zero_()
        act = ACTIVATIONS[activation or "relu"]()
        return [Residual(nn.Sequential(first, act, last))]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, key = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), key


@recorded("deepen", omit=PROBE_ARGUMENTS)
def deepen(
    model: nn.Module,
    after: Selector,
    *,
    mode: str | dict[str, str] = "auto",
    activation: str | None = None,
    width: int | None = None,
    kernel_size: int = 3,
    stride: int = 1,
    output_shapes: dict[str, list[int]] | None = None,
    example_input: Any = None,
    verify: bool = True,
    atol: float | None = None,
) -> Resolved[nn.Module]:
    """Insert a new layer after each module ``after`` picks (outermost matches; a type
    selector such as ``"type:InvertedResidual"`` picks every block) so the model computes
    exactly what it computed before; return the model, changed in place.

    ``mode="identity"``: a Linear set to the identity, or a Dirac Conv2d (odd
    ``kernel_size``, stride 1, same padding, equal channels), followed by ``activation`` —
    exact only when the activation is the identity on its input (``"relu"`` after a ReLU
    output). ``mode="residual"``: ``y = x + f(x)``, ``f = layer(width) → activation (relu by
    default) → layer`` with the last layer zero-initialised — always exact, and gradients
    reach it. ``mode="auto"`` takes identity where that is provably exact, else residual.
    What cannot be exact raises :class:`SurgeryError`.

    The output shape of each module is traced on ``example_input`` (guessed for simple
    models) unless ``output_shapes`` gives it (per-example, without the batch dimension).
    With ``verify`` (default) the result is compared with a copy of the model on that batch
    and :class:`EquivalenceError` reports the max |Δ| when it exceeds ``atol`` (by default
    1e-10 in float64, 1e-5 in float32, relative to outputs above 1); the model is then put
    back as it was.
    """
    layer = _NewLayer(activation, width, kernel_size, stride)
    _check_options(mode, layer)
    targets = _targets(model, after)
    replaying = is_replaying()
    known = {k: tuple(v) for k, v in (output_shapes or {}).items()}
    needs_trace = any(t not in known for t in targets) or (
        activation is not None and not replaying and mode != "residual"
    )
    probe = growth_probe(
        model, example_input, what="deepen", verify=verify, atol=atol, needs_inputs=needs_trace
    )
    traced = _trace_outputs(model, targets, probe.inputs) if needs_trace else {}
    # a replayed identity was proven exact when it was recorded; no input to re-prove it
    facts = {t: traced.get(t, (known.get(t), replaying)) for t in targets}
    plan = _plan(model, facts, mode, layer)
    apply_growth(model, probe, lambda: _insert(model, plan, layer))
    modes = {t: wanted for t, wanted, _ in plan}
    resolved = {
        "after": targets[0] if len(targets) == 1 else targets,
        "mode": next(iter(modes.values())) if len(set(modes.values())) == 1 else modes,
        "output_shapes": {t: list(shape) for t, _, shape in plan},
    }
    return Resolved(model, resolved)


def _check_options(mode: str | dict[str, str], layer: _NewLayer) -> None:
    for m in [mode] if isinstance(mode, str) else list(mode.values()):
        if m not in MODES:
            raise NetgraftError(f"deepen mode must be one of {', '.join(MODES)}; found {m!r}")
    if layer.activation is not None and layer.activation not in ACTIVATIONS:
        raise NetgraftError(
            f"activation must be one of {', '.join(ACTIVATIONS)} or None; "
            f"found {layer.activation!r}"
        )
    if (layer.width is not None and layer.width < 1) or layer.kernel_size < 1 or layer.stride < 1:
        raise NetgraftError(
            f"width, kernel_size and stride must be positive; found width={layer.width}, "
            f"kernel_size={layer.kernel_size}, stride={layer.stride}"
        )


def _targets(model: nn.Module, after: Selector) -> list[str]:
    """The outermost modules ``after`` picks; never the model itself."""
    targets = outermost(select_modules(model, after))
    if "" in targets:
        raise SurgeryError(
            "deepen inserts inside the model, after one of its modules; the selector picks the "
            "whole model (add a head with netgraft.attach instead)"
        )
    return targets


def _plan(
    model: nn.Module,
    facts: dict[str, tuple[tuple[int, ...] | None, bool]],
    mode: str | dict[str, str],
    layer: _NewLayer,
) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(target, mode, output shape)`` for each target, ``"auto"`` resolved; raises
    :class:`SurgeryError` where the layer asked for would not be exact."""
    modules = dict(model.named_modules())
    plan = []
    for t, (shape, non_negative) in facts.items():
        if shape is None:
            raise SurgeryError(f"no output shape for {t!r}; pass example_input=")
        wanted = mode if isinstance(mode, str) else mode.get(t, "auto")
        why_not_identity = _identity_refusal(
            t,
            modules[t],
            shape,
            non_negative,
            activation=layer.activation,
            width=layer.width,
            kernel_size=layer.kernel_size,
            stride=layer.stride,
        )
        why_not_residual = _residual_refusal(
            shape, kernel_size=layer.kernel_size, stride=layer.stride
        )
        if wanted == "auto":
            wanted = "identity" if why_not_identity is None else "residual"
        reason = why_not_identity if wanted == "identity" else why_not_residual
        if reason is not None:
            raise SurgeryError(f"cannot insert an exact {wanted} layer after {t!r}: {reason}")
        plan.append((t, wanted, shape))
    return plan


def _insert(
    model: nn.Module, plan: list[tuple[str, str, tuple[int, ...]]], layer: _NewLayer
) -> Callable[[], None]:
    """Wrap each planned target in a :class:`Deepened` with its new layer; return the undo."""
    modules = dict(model.named_modules())
    like = next(iter(model.parameters()), torch.empty(0))
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    for t, wanted, shape in plan:
        original = modules[t]
        own = next(iter(original.parameters()), like)
        new = _build(
            wanted,
            shape,
            activation=layer.activation,
            width=layer.width,
            kernel_size=layer.kernel_size,
            like=own,
        )
        mark_grown(new[0])
        wrapper = Deepened(original, *new)
        wrapper.train(original.training)
        for m in new:
            m.train(original.training)
        parent, key = _parent(model, t)
        parent._modules[key] = wrapper
        replaced.append((parent, key, original))
        log.info("deepen: inserted %s %s after %r", wanted, type(new[0]).__name__, display_name(t))

    def undo() -> None:
        for parent, key, original in replaced:
            parent._modules[key] = original

    return undo
