"""Whether training from cached features is the training the model does without them.

The feature cache runs the frozen prefix once, in eval mode, and trains the suffix on what
it returned. That is the same training only if the prefix computes the same function in
training as in evaluation and draws no random numbers, and the suffix computes, in each
mode, what the model computes after the cut. :func:`random_operations` names what breaks
the first promise in a traced prefix (functional dropout, ``torch.rand*``, in-place random
tensor methods, reads of ``self.training``); :func:`cached_training_differs` checks both
promises on a probe batch, for any kind of cut (traced or by substitution), by running the
model and the two halves with the same random seed.

Example::

    >>> random_operations(prefix)
    ["torch.nn.functional.dropout (p=0.2) at 'head' (node dropout)"]
    >>> cached_training_differs(model, "global_pool", prefix, suffix, batch)  # None: same

This module never changes a model's weights, buffers, train/eval modes or the global
random streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from ..layers import call_model, display_name, evaluating
from ..rng import forked
from ..substitute import max_difference

__all__ = ["cached_training_differs", "off_the_record", "random_operations"]

_RANDOM_FUNCTIONS = {
    torch.rand,
    torch.rand_like,
    torch.randn,
    torch.randn_like,
    torch.randint,
    torch.randint_like,
    torch.randperm,
    torch.bernoulli,
    torch.normal,
    torch.poisson,
    torch.multinomial,
    torch.rrelu,
    F.rrelu,
}
# functions that are random only when their training flag (argument 2, default True) is set
_DROPOUT_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.feature_dropout,
    torch.alpha_dropout,
    torch.feature_alpha_dropout,
}
_RANDOM_METHODS = {
    "bernoulli",
    "bernoulli_",
    "uniform_",
    "normal_",
    "random_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "multinomial",
}


def random_operations(prefix: nn.Module) -> list[str]:
    """The operations of a traced prefix (a ``torch.fx.GraphModule``; ``[]`` for any other
    module) that draw random numbers or depend on the train/eval mode, each described with
    the module whose code runs it: functional dropouts whose rate is not zero and whose
    training flag is not ``False``, ``torch.rand*``/``randn*``/``randint``/``randperm``/
    ``bernoulli``/``normal``/``multinomial``, in-place random tensor methods
    (``bernoulli_``, ``uniform_``, ...) and any other use of ``self.training``."""
    if not isinstance(prefix, torch.fx.GraphModule):
        return []
    found = []
    for node in prefix.graph.nodes:
        what = _random_call(node)
        if what is None and node.op == "get_attr" and node.target == "training":
            what = f"a read of self.training (used by {', '.join(u.name for u in node.users)})"
        if what is not None:
            where = _module_of(node)
            found.append(f"{what}{f' at {where!r}' if where else ''} (node {node.name})")
    return found


def _random_call(node: torch.fx.Node) -> str | None:
    if node.op == "call_method" and node.target in _RANDOM_METHODS:
        return f"Tensor.{node.target}"
    if node.op != "call_function":
        return None
    name = f"{getattr(node.target, '__module__', None) or 'torch'}.{node.target.__name__}"  # type: ignore[union-attr]
    if node.target in _RANDOM_FUNCTIONS:
        return name
    if node.target not in _DROPOUT_FUNCTIONS:
        return None
    rate = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    training = node.kwargs.get("train", training)
    if training is False or (isinstance(rate, (int, float)) and rate == 0):
        return None
    return f"{name} (p={rate})"


def _module_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    for value in reversed(list(stack.values())):
        path = value[0] if isinstance(value, tuple) else value
        if isinstance(path, str) and path:
            return display_name(path)
    return ""


def cached_training_differs(
    model: nn.Module, at: str, prefix: nn.Module, suffix: nn.Module, batch: Any
) -> str | None:
    """Why training ``suffix`` on the eval-mode outputs of ``prefix`` (what a feature cache
    serves) would not compute what training ``model`` computes, checked on ``batch``; None
    when it is the same. Checked: two training-mode passes of the model up to ``at`` agree
    (nothing random before the cut), they agree with an eval-mode pass (the cache computes
    in eval mode), and in each mode the suffix on cached features gives the model's output
    under the same random seed. Weights, buffers, modes and random streams are left as
    they were."""
    try:
        return _differs(model, at, prefix, suffix, batch)
    except Exception as exc:  # a probe that cannot run proves nothing: no cache
        return f"the cut could not be checked on a probe batch ({type(exc).__name__}: {exc})"


def _differs(
    model: nn.Module, at: str, prefix: nn.Module, suffix: nn.Module, batch: Any
) -> str | None:
    first = _run(model, at, batch, True, 0)
    second = _run(model, at, batch, True, 1, stop=True)[0]
    if not _close(first[0], second):
        return (
            f"the frozen part up to {display_name(at)!r} is random in training (two "
            f"training-mode passes differ by max |Δ| = {max_difference(first[0], second):.3g})"
        )
    evaluated = _run(model, at, batch, False, 0)
    if not _close(first[0], evaluated[0]):
        return (
            f"the frozen part up to {display_name(at)!r} computes differently in training than "
            "in evaluation, where the cache computes it (max |Δ| = "
            f"{max_difference(first[0], evaluated[0]):.3g})"
        )
    outputs = {True: first[1], False: evaluated[1]}
    with evaluating(prefix):
        features = call_model(prefix, batch)
    for train, want in outputs.items():
        with _untouched(model), _mode([suffix], train), _seeded(0), torch.no_grad():
            got = suffix(features)
        if not _close(want, got):
            return (
                f"the part after {display_name(at)!r} does not compute in "
                f"{'training' if train else 'evaluation'} what the model computes there (max "
                f"|Δ| = {max_difference(want, got):.3g}): it reads the train/eval mode or random "
                "numbers in a way the cut does not reproduce"
            )
    return None


class _Reached(Exception):
    """Raised by the hook that stops a forward at the cut."""


def _run(
    model: nn.Module, at: str, batch: Any, train: bool, seed: int, stop: bool = False
) -> tuple[Any, Any]:
    """``(output of the module at, output of the model)`` of a forward of ``model`` in the
    given mode, seeded; with ``stop`` the forward ends at the cut (no model output)."""
    found: list[Any] = []

    def record(_module: nn.Module, _args: Any, output: Any) -> None:
        found.append(output)
        if stop:
            raise _Reached

    handle = model.get_submodule(at).register_forward_hook(record)
    out = None
    try:
        with _untouched(model), _mode([model], train), _seeded(seed), torch.no_grad():
            out = call_model(model, batch)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError(f"the forward did not call {display_name(at)!r}")
    return found[0], out


@contextlib.contextmanager
def off_the_record() -> Iterator[None]:
    """Run the block and give every global random stream back as it was: torch's CPU and
    CUDA ones (every device), numpy's and Python's."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with forked(), torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with off_the_record():
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _mode(modules: list[nn.Module], train: bool) -> Iterator[None]:
    """Put each module in ``train`` mode as ``.train(train)`` does (frozen parts held in
    inference stay so), then give every submodule its own flag back."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.train(train)
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Give every buffer its value back (running statistics a training pass updates), so
    each probe pass starts from the statistics the model has."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _close(a: Any, b: Any) -> bool:
    leaves = [t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor) and t.numel()]
    scale = max((t.detach().double().abs().max().item() for t in leaves), default=1.0)
    return max_difference(a, b) <= 1e-5 * max(1.0, scale)
