"""Recipes: the surgery applied to a base model, recorded as plain data.

Every surgery function is decorated with :func:`recorded`; calling it appends
``{"op": name, "args": {...}}`` (only the arguments the caller passed) to the
model's recipe. A model knows its base when it came from :func:`netgraft.load_model`
(or :func:`set_base`). Replaying the operations on the rebuilt base gives the same
architecture, so ``weights.safetensors`` + ``recipe.yaml`` reload without pickle.

Nested surgery (an operation calling another) records only the outer call. An
operation whose arguments are not plain data marks the recipe as not replayable
(with the reason); it never fails the surgery itself.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from .errors import RecipeError

__all__ = [
    "OPERATIONS",
    "Recipe",
    "get_recipe",
    "is_replaying",
    "recorded",
    "replay",
    "set_base",
]

_ATTR = "_netgraft_recipe"
OPERATIONS: dict[str, Callable[..., Any]] = {}
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("netgraft_surgery_depth", default=0)
_replaying: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "netgraft_replaying", default=False
)

F = TypeVar("F", bound=Callable[..., Any])


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


def get_recipe(model: nn.Module) -> Recipe:
    """The recipe recorded on ``model`` (an empty one, without base, if none yet)."""
    recipe = model.__dict__.get(_ATTR)
    if recipe is None:
        recipe = Recipe()
        object.__setattr__(model, _ATTR, recipe)
    return recipe


def set_base(model: nn.Module, spec: str, **kwargs: Any) -> nn.Module:
    """Record that ``model`` is the architecture built by ``load_model(spec, **kwargs)``;
    clears recorded operations. Weights are not part of the base: they are saved separately."""
    object.__setattr__(model, _ATTR, Recipe(base={"spec": spec, **kwargs}))
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


def recorded(name: str, *, serialize: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
    """Decorator for a surgery ``fn(model, ...)``: registers it for replay under ``name`` and
    records each top-level call on the model it returns (or on ``model`` when it returns
    something else). ``serialize`` may turn the passed arguments into plain data."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        OPERATIONS[name] = fn

        @functools.wraps(fn)
        def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            token = _depth.set(_depth.get() + 1)
            try:
                result = fn(model, *args, **kwargs)
            finally:
                _depth.reset(token)
            if _depth.get() > 0:
                return result
            target = result if isinstance(result, nn.Module) else model
            recipe = get_recipe(model)
            if target is not model:
                recipe = copy.deepcopy(recipe)
                object.__setattr__(target, _ATTR, recipe)
            bound = sig.bind(model, *args, **kwargs)
            passed = dict(list(bound.arguments.items())[1:])
            for pname, param in sig.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD and pname in passed:
                    passed.update(passed.pop(pname))
            try:
                if serialize is not None:
                    passed = serialize(passed)
            except RecipeError as exc:
                recipe.not_replayable.append(f"{name}: {exc}")
                passed = {}
            if not _plain(passed):
                bad = [k for k, v in passed.items() if not _plain(v)]
                recipe.not_replayable.append(
                    f"{name}: argument(s) {', '.join(bad)} are not plain data"
                )
            recipe.operations.append({"op": name, "args": _to_plain(passed)})
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


def replay(model: nn.Module, operations: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded operations to ``model`` in order and return the resulting model
    (operations such as ``truncate`` return a new module)."""
    token = _replaying.set(True)
    try:
        for entry in operations:
            op = entry["op"]
            if op not in OPERATIONS:
                raise RecipeError(
                    f"the recipe uses operation {op!r}, which this netgraft does not know "
                    f"(known: {', '.join(sorted(OPERATIONS))})"
                )
            args = dict(entry.get("args") or {})
            try:
                result = OPERATIONS[op](model, **args)
            except TypeError as exc:
                raise RecipeError(f"cannot replay {op}({args}): {exc}") from exc
            if isinstance(result, nn.Module):
                model = result
    finally:
        _replaying.reset(token)
    return model
