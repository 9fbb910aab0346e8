"""Cut a model at a module boundary without torch.fx: by *substitution*.

torch.fx cannot trace every forward (Hugging Face models build attention masks in Python,
some timm models branch on tensor values). Such a model can still be split at a module
boundary by running its own forward with that module's computation replaced:

- the *prefix* runs the model until the boundary module returns and stops there; its output
  is the pair ``(inputs, value)``: the boundary's output (a tensor, a tuple, a dict or a
  Hugging Face ``ModelOutput``, kept as it is) and the inputs, which the model's own code
  after the boundary may still need (an attention mask, the sequence length);
- the *suffix* runs the model's forward on those inputs with the boundary module returning
  the given value, and every frozen module that finished before the boundary started
  *skipped*: it returns a placeholder filled with NaN instead of computing.

A placeholder that reaches the output would show as NaN, so a substitution is checked on a
probe batch against the uncut model before it is returned; a mismatch (a value computed
before the boundary and used after it, such as a skip connection around the cut) raises
:class:`SurgeryError` naming the modules whose outputs leak and the measured max |Δ|.

Both halves use the model's own modules and parameters; the suffix holds the whole model
(its parameters are the model's), the prefix only the modules it runs. This module never
changes the model's weights or leaves a module's ``forward`` replaced after a call.

Example::

    >>> prefix, suffix = cut_by_substitution(bert_classifier, "bert", example)
    >>> logits = suffix(prefix(example)).logits   # equals bert_classifier(**example).logits
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import SurgeryError
from .layers import call_model, display_name, evaluating

__all__ = ["Capture", "Substituted", "cut_by_substitution", "max_difference"]


@dataclass
class _Call:
    """When one module ran during the probe (positions in a shared counter) and how often."""

    start: int
    end: int = -1
    count: int = 0
    output: Any = None


def _trace_calls(model: nn.Module, example: Any) -> dict[str, _Call]:
    """Run ``model`` once on ``example`` and record every submodule's first call: when it
    started and ended, how often it ran, and its output (for the placeholder shapes)."""
    calls: dict[str, _Call] = {}
    clock = iter(range(1 << 62))

    def before(name: str):
        def hook(_module, _args):
            call = calls.setdefault(name, _Call(start=next(clock)))
            call.count += 1

        return hook

    def after(name: str):
        def hook(_module, _args, output):
            call = calls[name]
            if call.end < 0:
                call.end, call.output = next(clock), output

        return hook

    with ExitStack() as stack:
        for name, module in model.named_modules():
            if name:
                stack.callback(module.register_forward_pre_hook(before(name)).remove)
                stack.callback(module.register_forward_hook(after(name)).remove)
        with evaluating(model):
            call_model(model, example)
    return calls


def _skippable(calls: dict[str, _Call], at: str) -> list[str]:
    """The outermost modules that ran once and finished before ``at`` started: the suffix
    replaces their computation with placeholders."""
    start = calls[at].start
    return _outermost([n for n, c in calls.items() if c.count == 1 and 0 <= c.end < start])


@dataclass
class _Placeholder:
    """The structure of a skipped module's output, to fake it cheaply: tensors become NaN
    (zeros for integer dtypes) of the same shape, with the batch dimension following the
    batch at hand."""

    spec: Any
    leaves: list[Any]
    batch: int

    @classmethod
    def of(cls, output: Any, batch: int) -> _Placeholder:
        leaves, spec = pytree.tree_flatten(output)
        return cls(spec, leaves, batch)

    def make(self, batch: int, device: torch.device) -> Any:
        made = []
        for leaf in self.leaves:
            if not isinstance(leaf, torch.Tensor):
                made.append(leaf)
                continue
            shape = list(leaf.shape)
            if shape and shape[0] == self.batch:
                shape[0] = batch
            fill = math.nan if leaf.is_floating_point() else 0
            made.append(torch.full(shape, fill, dtype=leaf.dtype, device=device))
        return pytree.tree_unflatten(made, self.spec)


@contextmanager
def _replaced(module: nn.Module, forward: Any) -> Iterator[None]:
    """``module`` computes ``forward`` instead of its own for the duration of the block."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    object.__setattr__(module, "forward", forward)
    try:
        yield
    finally:
        if had:
            object.__setattr__(module, "forward", previous)
        else:
            del module.__dict__["forward"]


class _Reached(Exception):
    """Raised by the capture hook to end the forward once the boundary has returned."""


def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The inputs in :func:`netgraft.layers.call_model`'s conventions."""
    if kwargs and not args:
        return dict(kwargs)
    if len(args) == 1 and not kwargs:
        return args[0]
    if kwargs:
        raise SurgeryError("a cut by substitution takes positional or keyword inputs, not both")
    return tuple(args)


class Capture(nn.Module):
    """The prefix of a cut by substitution: runs the model until the boundary module returns
    and gives ``(inputs, value)``. It holds only the modules that run before the boundary
    (and the boundary), so its parameters are exactly those the value depends on."""

    def __init__(self, model: nn.Module, at: str, upstream: list[str]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        self.at = at
        modules = dict(model.named_modules())
        self.upstream = nn.ModuleDict({_key(n): modules[n] for n in upstream})
        # tensors the boundary's ancestors own directly (a ViT's class token and position
        # embedding live on the root) feed the value too
        self.owned = nn.ParameterDict()
        for name in _ancestors(at):
            owner = modules[name]
            for pname, param in owner._parameters.items():
                if param is not None:
                    self.owned[_key(f"{name}.{pname}")] = param
            for bname, buffer in owner._buffers.items():
                if buffer is not None:
                    self.register_buffer(_key(f"owned.{name}.{bname}"), buffer, persistent=False)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        inputs = _inputs(args, kwargs)
        found: list[Any] = []

        def stop(_module, _args, output):
            found.append(output)
            raise _Reached

        handle = self._model.get_submodule(self.at).register_forward_hook(stop)
        try:
            with evaluating(self._model):
                call_model(self._model, inputs)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not found:
            raise SurgeryError(f"the forward did not call {display_name(self.at)!r} this time")
        return inputs, found[0]


class Substituted(nn.Module):
    """The suffix of a cut by substitution: the model's forward with the boundary module
    returning the given value and the modules before it skipped. Takes ``(inputs, value)``
    as the prefix gives it, or the same pair flattened into a tuple of tensors (what a
    :class:`netgraft.FeatureCache` of the prefix returns)."""

    def __init__(self, model: nn.Module, at: str, skipped: dict[str, _Placeholder], spec: Any):
        super().__init__()
        self.model = model
        self.at = at
        self._skipped = skipped
        self._spec = spec

    def forward(self, crossing: Any) -> Any:
        inputs, value = self._unpack(crossing)
        leaves = [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        batch = leaves[0].shape[0] if leaves and leaves[0].ndim else 1
        device = leaves[0].device if leaves else torch.device("cpu")
        with ExitStack() as stack:
            for name, placeholder in self._skipped.items():
                fake = placeholder.make(batch, device)
                stack.enter_context(
                    _replaced(self.model.get_submodule(name), lambda *a, _v=fake, **k: _v)
                )
            stack.enter_context(_replaced(self.model.get_submodule(self.at), lambda *a, **k: value))
            return call_model(self.model, inputs)

    def _unpack(self, crossing: Any) -> tuple[Any, Any]:
        if pytree.tree_structure(crossing) == self._spec:
            return crossing
        flat = list(crossing) if isinstance(crossing, (tuple, list)) else [crossing]
        if len(flat) != self._spec.num_leaves:
            raise SurgeryError(
                f"the suffix of a cut at {self.at!r} takes (inputs, value) or their "
                f"{self._spec.num_leaves} flattened tensors; found {len(flat)}"
            )
        return pytree.tree_unflatten(flat, self._spec)


def max_difference(a: Any, b: Any) -> float:
    """The largest absolute difference between the tensors of two outputs of the same
    structure (``inf`` when the structures differ, ``nan`` when a value is NaN)."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    ta = [t for t in la if isinstance(t, torch.Tensor)]
    tb = [t for t in lb if isinstance(t, torch.Tensor)]
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        return math.inf
    worst = 0.0
    for x, y in zip(ta, tb, strict=True):
        if x.numel() == 0:
            continue
        diff = (x.double() - y.double()).abs().max().item()
        if math.isnan(diff):
            return math.nan
        worst = max(worst, diff)
    return worst


def _tolerance(reference: Any) -> float:
    leaves = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    scale = max((t.double().abs().max().item() for t in leaves if t.numel()), default=1.0)
    return 1e-5 * max(1.0, scale)


def _leaking(model: nn.Module, example: Any, prefix: Capture, suffix: Substituted) -> list[str]:
    """The skipped modules whose placeholder reaches the output (each tried alone)."""
    found = []
    everything = dict(suffix._skipped)
    try:
        for name, placeholder in everything.items():
            suffix._skipped = {name: placeholder}
            with evaluating(model):
                out = suffix(prefix(example))
            if math.isnan(max_difference(out, out)):
                found.append(name)
    finally:
        suffix._skipped = everything
    return found


def cut_by_substitution(
    model: nn.Module, at: str, example_input: Any
) -> tuple[Capture, Substituted]:
    """Split ``model`` at the module named ``at`` by substitution (see the module docstring):
    ``(prefix, suffix)`` with ``suffix(prefix(x))`` equal to ``model(x)``, checked on
    ``example_input`` (a batch of at least one example, given as :func:`~netgraft.layers.call_model`
    takes it). Raises :class:`SurgeryError` when the module is not called exactly once or when
    the substitution does not reproduce the model's output."""
    calls = _trace_calls(model, example_input)
    shown = display_name(at)
    if at not in calls:
        raise SurgeryError(f"cannot cut at {shown!r}: the forward never calls that module")
    if calls[at].count != 1:
        raise SurgeryError(
            f"cannot cut at {shown!r}: the forward calls it {calls[at].count} times, so there "
            "is no single cut point"
        )
    batch = _batch_size(example_input)
    skipped = _skippable(calls, at)
    placeholders = {n: _Placeholder.of(calls[n].output, batch) for n in skipped}
    prefix = Capture(
        model, at, _outermost([at, *(n for n, c in calls.items() if 0 <= c.end < calls[at].start)])
    )
    with evaluating(model):
        expected = call_model(model, example_input)
        crossing = prefix(example_input)
    suffix = Substituted(model, at, placeholders, pytree.tree_structure(crossing))
    _verify(model, example_input, prefix, suffix, expected)
    return prefix, suffix


def _outermost(names: list[str]) -> list[str]:
    """``names`` without those inside another of them."""
    chosen = set(names)
    return [n for n in names if not any(n.startswith(o + ".") for o in chosen if o != n)]


def _ancestors(name: str) -> list[str]:
    """The dotted names of the modules holding ``name``, the root (``""``) first."""
    parts = name.split(".")
    return ["", *(".".join(parts[:i]) for i in range(1, len(parts)))]


def _key(name: str) -> str:
    """A module or parameter name usable as a ModuleDict/ParameterDict key (no dots)."""
    return name.replace(".", "/") if name else "<root>"


def _batch_size(example: Any) -> int:
    leaves = [t for t in pytree.tree_leaves(example) if isinstance(t, torch.Tensor) and t.ndim]
    if not leaves:
        raise SurgeryError("a cut by substitution needs an example batch of tensors")
    return int(leaves[0].shape[0])


def _verify(
    model: nn.Module, example: Any, prefix: Capture, suffix: Substituted, expected: Any
) -> None:
    with evaluating(model):
        got = suffix(prefix(example))
    delta = max_difference(got, expected)
    if delta <= _tolerance(expected):
        return
    leaks = _leaking(model, example, prefix, suffix)
    why = (
        f"the output{'s' if len(leaks) > 1 else ''} of "
        f"{', '.join(repr(display_name(n)) for n in leaks[:4])} "
        f"{'are' if len(leaks) > 1 else 'is'} also used after it (a skip connection around "
        "the cut, or a value consumed twice)"
        if leaks
        else "its output is not the only value that crosses the cut"
    )
    raise SurgeryError(
        f"cannot cut {type(model).__name__} at {display_name(suffix.at)!r} by substitution: "
        f"running the model with that module's output substituted does not reproduce its "
        f"output (max |Δ| = {delta:.3g}): {why}; cut at a module outside that span"
    )
