"""Recipes: the surgery applied to a base model, recorded as plain data.

Every surgery function is decorated with :func:`recorded`; calling it appends
``{"op": name, "args": {...}}`` (only the arguments the caller passed) to the
model's recipe. A model knows its base when it came from :func:`netgraft.load_model`
(or :func:`set_base`). Replaying the operations on the rebuilt base gives the same
architecture, so ``weights.safetensors`` + ``recipe.yaml`` reload without pickle.

Nested surgery (an operation calling another) records only the outer call. An
operation whose arguments are not plain data marks the recipe as not replayable
(with the reason); it never fails the surgery itself, but :func:`save` refuses it.

:func:`save` writes ``weights.safetensors`` + ``recipe.yaml`` into a folder atomically
(a temporary folder beside it, then a rename); :func:`load` rebuilds the base with
:func:`netgraft.load_model`, replays the operations and loads the weights strictly.
Nothing here ever unpickles.

Example::

    >>> import netgraft
    >>> model = netgraft.load_model("torchvision:resnet18")
    >>> netgraft.replace_head(model, num_classes=10)
    >>> netgraft.save(model, "runs/resnet18-10")
    >>> again = netgraft.load("runs/resnet18-10")
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from torch import nn

from .errors import RecipeError, WeightsError

__all__ = [
    "OPERATIONS",
    "RECIPE_FILE",
    "WEIGHTS_FILE",
    "Recipe",
    "build_module",
    "get_recipe",
    "is_replaying",
    "load",
    "read_recipe",
    "module_spec",
    "recorded",
    "replay",
    "save",
    "set_base",
]

RECIPE_FILE = "recipe.yaml"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1

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
            fn = OPERATIONS[op]
            positional: list[Any] = []
            for pname, param in inspect.signature(fn).parameters.items():
                if param.kind is inspect.Parameter.VAR_POSITIONAL and pname in args:
                    positional = list(args.pop(pname) or [])
            try:
                result = fn(model, *positional, **args)
            except TypeError as exc:
                raise RecipeError(f"cannot replay {op}({args}): {exc}") from exc
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


def _versions() -> dict[str, str]:
    from . import __version__

    return {"netgraft": str(__version__), "torch": str(torch.__version__)}


def _is_netgraft_folder(folder: Path) -> bool:
    recipe = folder / RECIPE_FILE
    if not recipe.is_file():
        return False
    try:
        data = yaml.safe_load(recipe.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "netgraft" in data


def save(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model`` to ``folder`` as ``weights.safetensors`` + ``recipe.yaml`` (base spec,
    operations, netgraft and torch versions), atomically: the folder appears complete or not
    at all. An existing netgraft folder is replaced; any other existing folder is refused."""
    folder = Path(folder)
    recipe = get_recipe(model)
    if recipe.base is None:
        raise RecipeError(
            f"this {type(model).__name__} has no recorded base model, so it could not be rebuilt "
            f"without pickle: build it with netgraft.load_model(SPEC) or record one with "
            f"netgraft.recipe.set_base(model, SPEC) before the surgery"
        )
    if recipe.not_replayable:
        raise RecipeError(
            "the recipe cannot be replayed, so the model cannot be saved as a recipe: "
            + "; ".join(recipe.not_replayable)
        )
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"cannot save to {str(folder)!r}: it exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not _is_netgraft_folder(folder):
        raise RecipeError(
            f"refusing to overwrite {str(folder)!r}: it is not empty and is not a netgraft "
            f"folder (no {RECIPE_FILE}); choose another folder"
        )
    from safetensors.torch import save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        # save_model drops the duplicates of shared (tied) tensors; load_model restores them
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        data = {**_versions(), "format": FORMAT_VERSION, **recipe.to_dict()}
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_recipe(folder: str | Path) -> dict[str, Any]:
    """The parsed ``recipe.yaml`` of a saved folder (versions, base, operations)."""
    folder = Path(folder)
    path = folder / RECIPE_FILE
    if not path.is_file():
        raise RecipeError(f"{str(folder)!r} is not a saved netgraft model: it has no {RECIPE_FILE}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("base"), dict):
        raise RecipeError(f"{str(path)!r} names no base model (expected a 'base' mapping)")
    if "spec" not in data["base"]:
        raise RecipeError(f"{str(path)!r}: the base has no 'spec'")
    Recipe.from_dict(data)
    return data


def load(folder: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save`: build the base with
    :func:`netgraft.load_model`, replay the recorded operations, then load the weights
    strictly. No pickle is involved."""
    from safetensors.torch import load_model

    from .zoo import load_model as build

    folder = Path(folder)
    data = read_recipe(folder)
    recipe = Recipe.from_dict(data)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"{str(folder)!r} has a recipe but no {WEIGHTS_FILE}")
    base = dict(recipe.base or {})
    spec = base.pop("spec")
    model = build(spec, **base)
    model = replay(model, recipe.operations)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as exc:
        raise WeightsError(
            f"{str(weights)!r} could not be loaded into the rebuilt model (corrupt, truncated "
            f"or from another recipe?): {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    if missing or unexpected:
        raise WeightsError(
            f"{str(weights)!r} does not fit the model its recipe rebuilds: "
            f"{len(missing)} missing ({', '.join(sorted(missing)[:4])}), "
            f"{len(unexpected)} unexpected ({', '.join(sorted(unexpected)[:4])})"
        )
    object.__setattr__(model, _ATTR, recipe)
    return model
