"""Recipes: the surgery applied to a base model, recorded as plain data.

Every surgery function is decorated with :func:`recorded`, which declares, where the
operation is defined, what a call records: ``{"op": name, "args": {...}}`` with the
arguments the caller passed, minus those declared ``omit`` (probe batches and
tolerances, which do not shape the architecture), plus the values the operation resolved
itself and returned in :class:`Resolved` (a selector resolved to module names, an
``"auto"`` mode resolved to what was chosen). A model knows its base when it came from
:func:`netgraft.load_model` (or :func:`set_base`). Replaying the operations on the rebuilt
base gives the same architecture, so a saved folder reloads without pickle
(:mod:`netgraft.saved`).

Nested surgery (an operation calling another) records only the outer call. An
operation whose arguments are not plain data marks the recipe as not replayable
(with the reason); it never fails the surgery itself, but saving refuses it.

:data:`OPERATIONS` is the registry :func:`replay` reads: a static table from operation
name to the function that performs it, imported when a recipe first uses it, so replaying
works whatever the caller imported before. This module never writes or reads files.

Example::

    >>> import netgraft
    >>> model = netgraft.load_model("torchvision:resnet18")
    >>> netgraft.replace_head(model, num_classes=10)
    >>> netgraft.recipe_of(model).operations
    [{'op': 'replace_head', 'args': {'num_classes': 10}}]
"""

from __future__ import annotations

import contextvars
import copy
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import torch
from torch import nn

from . import marks
from .adapted import config_to_plain, is_peft_model, peft_base
from .deprecation import renamed_function
from .errors import RecipeError

__all__ = [
    "OPERATIONS",
    "PROBE_ARGUMENTS",
    "Recipe",
    "Resolved",
    "build_module",
    "get_recipe",
    "recipe_of",
    "is_replaying",
    "module_spec",
    "operation",
    "recorded",
    "replay",
    "set_base",
]

# Every recorded operation, as "module:function". A new operation is added here; recorded()
# refuses a name missing from this table, so the registry cannot drift from the code.
OPERATIONS: dict[str, str] = {
    "replace_head": "netgraft.heads:replace_head",
    "truncate": "netgraft.heads:truncate",
    "attach": "netgraft.heads:attach",
    "deepen": "netgraft.grow.deepen:deepen",
    "widen": "netgraft.grow.widen:widen",
    "expand_blocks": "netgraft.grow.expand:expand_blocks",
    "widen_transformer": "netgraft.grow.transformer_width:widen_transformer",
    "stack_blocks": "netgraft.grow.stack:stack_blocks",
    "add_adapters": "netgraft.adapters:add_adapters",
    "expand_adapted": "netgraft.adapter_growth:expand_adapted",
}

# Arguments of growth operations that only check the result (a probe batch, a tolerance):
# replaying without them builds the same architecture.
PROBE_ARGUMENTS = ("example_input", "verify", "atol")

_depth: contextvars.ContextVar[int] = contextvars.ContextVar("netgraft_surgery_depth", default=0)
_replaying: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "netgraft_replaying", default=False
)

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Recipe:
    """The base-model spec and the ordered surgery operations applied to it."""

    base: dict[str, Any] | None = None
    operations: list[dict[str, Any]] = field(default_factory=list)
    not_replayable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": copy.deepcopy(self.base),
            "operations": copy.deepcopy(self.operations),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict) or "operations" not in data:
            raise RecipeError("a recipe must be a mapping with 'base' and 'operations'")
        ops = data.get("operations") or []
        for op in ops:
            if not isinstance(op, dict) or "op" not in op:
                raise RecipeError(f"a recipe operation must be a mapping with 'op'; found {op!r}")
        return cls(base=data.get("base"), operations=list(ops))


@dataclass(frozen=True)
class Resolved(Generic[R]):
    """What a recorded operation returns when the values it resolved itself should be
    recorded: ``result`` goes to the caller, ``args`` replace the passed arguments of the
    same name in the recipe (and add those the caller left to their defaults)."""

    result: R
    args: dict[str, Any]


def recipe_of(model: nn.Module) -> Recipe:
    """The recipe recorded on ``model``: its base-model spec and the surgery operations
    applied since, in order (an empty one, without base, is attached if none yet). A PEFT
    model built with ``peft.get_peft_model`` gets its base model's recipe followed by an
    ``add_adapters`` operation holding its adapter config."""
    recipe = marks.RECIPE.get(model)
    if recipe is None:
        recipe = _peft_recipe(model) if is_peft_model(model) else Recipe()
        marks.RECIPE.set(model, recipe)
    return recipe


def _peft_recipe(model: nn.Module) -> Recipe:
    """The recipe of a PEFT model that netgraft did not build: its base's, plus the
    adapters (one adapter; several cannot be replayed by one operation)."""
    recipe = copy.deepcopy(marks.RECIPE.get(peft_base(model)[1]) or Recipe())
    configs = model.peft_config
    if len(configs) != 1:
        recipe.not_replayable.append(
            f"add_adapters: the model holds {len(configs)} adapters ({', '.join(configs)}); "
            "a recipe replays one (build it with netgraft.add_adapters)"
        )
    for name, config in list(configs.items())[:1]:
        args = {"config": config_to_plain(config), "adapter_name": name}
        recipe.operations.append({"op": "add_adapters", "args": args})
    return recipe


get_recipe = renamed_function(recipe_of, "get_recipe")


def set_base(model: nn.Module, spec: str, **kwargs: Any) -> nn.Module:
    """Record that ``model`` is the architecture built by ``load_model(spec, **kwargs)``;
    clears recorded operations. Weights are not part of the base: they are saved separately."""
    marks.RECIPE.set(model, Recipe(base={"spec": spec, **kwargs}))
    return model


def is_replaying() -> bool:
    """True while a recipe is being replayed: operations skip their verification probes
    (the weights are loaded afterwards, so a check on the fresh base would be meaningless)."""
    return _replaying.get()


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _passed(sig: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments a call passed explicitly (after the model), ``**kwargs`` spread out."""
    passed = dict(list(sig.bind(*args, **kwargs).arguments.items())[1:])
    for pname, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and pname in passed:
            passed.update(passed.pop(pname))
    return passed


def _record(
    name: str,
    model: nn.Module,
    result: Any,
    args: dict[str, Any],
    serialize: Callable[[dict[str, Any]], dict[str, Any]] | None,
) -> None:
    """Append ``name(args)`` to the recipe of the model the operation returned (a copy of
    ``model``'s recipe when it is a new module), or mark the recipe not replayable."""
    recipe = recipe_of(model)
    if isinstance(result, nn.Module) and result is not model:
        recipe = copy.deepcopy(recipe)
        marks.RECIPE.set(result, recipe)
    try:
        if serialize is not None:
            args = serialize(args)
    except RecipeError as exc:
        recipe.not_replayable.append(f"{name}: {exc}")
        args = {}
    if not _plain(args):
        bad = [k for k, v in args.items() if not _plain(v)]
        recipe.not_replayable.append(f"{name}: argument(s) {', '.join(bad)} are not plain data")
    recipe.operations.append({"op": name, "args": _to_plain(args)})


def recorded(
    name: str,
    *,
    omit: tuple[str, ...] = (),
    serialize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Callable[
    [Callable[Concatenate[nn.Module, P], R | Resolved[R]]], Callable[Concatenate[nn.Module, P], R]
]:
    """Decorator for a surgery ``fn(model, ...)`` registered in :data:`OPERATIONS` as
    ``name``: each top-level call is recorded on the model it returns (or on ``model`` when
    it returns something else) with the arguments the caller passed, except those named in
    ``omit``. When ``fn`` returns :class:`Resolved`, the caller gets its ``result`` and its
    ``args`` are recorded over the passed ones. ``serialize`` may turn the recorded
    arguments into plain data (raising :class:`RecipeError` when it cannot)."""

    def decorate(
        fn: Callable[Concatenate[nn.Module, P], R | Resolved[R]],
    ) -> Callable[Concatenate[nn.Module, P], R]:
        where = f"{fn.__module__}:{fn.__qualname__}"
        if OPERATIONS.get(name) != where:
            raise RecipeError(
                f"operation {name!r} ({where}) is not in netgraft.recipe.OPERATIONS, so a "
                f"recipe could not replay it; add {name!r}: {where!r} there"
            )
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(model: nn.Module, *args: P.args, **kwargs: P.kwargs) -> R:
            token = _depth.set(_depth.get() + 1)
            try:
                out = fn(model, *args, **kwargs)
            finally:
                _depth.reset(token)
            result, resolved = (out.result, out.args) if isinstance(out, Resolved) else (out, {})
            if _depth.get() == 0 and not _replaying.get():
                passed = _passed(sig, (model, *args), kwargs)
                kept = {k: v for k, v in passed.items() if k not in omit}
                _record(name, model, result, {**kept, **resolved}, serialize)
            return result

        return wrapper

    return decorate


def operation(name: str) -> Callable[..., Any]:
    """The function :data:`OPERATIONS` registers as ``name``, importing its module."""
    if name not in OPERATIONS:
        raise RecipeError(
            f"the recipe uses operation {name!r}, which this netgraft does not know "
            f"(known: {', '.join(sorted(OPERATIONS))})"
        )
    module, _, attr = OPERATIONS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def replay(model: nn.Module, operations: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded operations to ``model`` in order and return the resulting model
    (operations such as ``truncate`` return a new module). Nothing is recorded while
    replaying, and growth operations skip their verification probes."""
    token = _replaying.set(True)
    try:
        for entry in operations:
            fn = operation(entry["op"])
            args = dict(entry.get("args") or {})
            positional: list[Any] = []
            for pname, param in inspect.signature(fn).parameters.items():
                if param.kind is inspect.Parameter.VAR_POSITIONAL and pname in args:
                    positional = list(args.pop(pname) or [])
            try:
                result = fn(model, *positional, **args)
            except TypeError as exc:
                raise RecipeError(f"cannot replay {entry['op']}({args}): {exc}") from exc
            if isinstance(result, nn.Module):
                model = result
    finally:
        _replaying.reset(token)
    return model


def module_spec(module: nn.Module) -> dict[str, Any]:
    """Plain data that rebuilds ``module`` (a standard ``torch.nn`` layer or a Sequential of
    them) with :func:`build_module`: ``{"type": "Linear", "args": {...}}``. Constructor
    arguments are read back from the module's attributes and checked by rebuilding; anything
    else raises :class:`RecipeError` (a recipe could not replay it)."""
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls:
        raise RecipeError(
            f"{cls.__module__}.{cls.__qualname__} is not a standard torch.nn layer, so a recipe "
            f"cannot rebuild it; use torch.nn layers (Linear, Conv2d, ReLU, Dropout, Sequential, "
            f"...) or wrap your own module in a file.py:function model spec"
        )
    if cls is nn.Sequential:
        return {"type": "Sequential", "modules": [module_spec(m) for m in module]}
    args: dict[str, Any] = {}
    params = list(inspect.signature(cls.__init__).parameters.items())[1:]
    for pname, param in params:
        if pname in ("device", "dtype") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(module, pname):
            if param.default is inspect.Parameter.empty:
                raise RecipeError(
                    f"cannot record {cls.__name__}: its constructor argument {pname!r} is not "
                    f"readable from the module"
                )
            continue
        value = getattr(module, pname)
        if isinstance(value, torch.Tensor) or (value is None and pname == "bias"):
            value = value is not None  # bias=True/False
        value = _to_plain(value)
        if not _plain(value):
            raise RecipeError(
                f"cannot record {cls.__name__}: argument {pname}={value!r} is not plain data"
            )
        args[pname] = value
    spec = {"type": cls.__name__, "args": args}
    rebuilt = build_module(spec)
    same_shapes = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: tuple(v.shape) for k, v in module.state_dict().items()
    }
    if repr(rebuilt) != repr(module) or not same_shapes:
        raise RecipeError(
            f"cannot record {module!r}: rebuilding it from its constructor arguments gives "
            f"{rebuilt!r}"
        )
    return spec


def build_module(spec: dict[str, Any] | nn.Module) -> nn.Module:
    """The ``torch.nn`` module a :func:`module_spec` describes (a module is returned as is)."""
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise RecipeError(f"a module spec must be a mapping with 'type'; found {spec!r}")
    cls = getattr(nn, spec["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RecipeError(f"module spec type {spec['type']!r} is not a torch.nn layer")
    if cls is nn.Sequential:
        return nn.Sequential(*(build_module(s) for s in spec.get("modules") or []))
    try:
        return cls(**(spec.get("args") or {}))
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"cannot build {spec['type']}({spec.get('args')}): {exc}") from exc
