"""Saved netgraft folders: ``weights.safetensors`` + ``recipe.yaml``, never a pickle.

:func:`save` writes a model's weights and its recipe (base-model spec, surgery operations,
netgraft and torch versions) into a folder atomically: the folder appears complete or not
at all. :func:`load` rebuilds the model from a folder: its base model (built by
:func:`netgraft.load_model` from the recorded spec), then the replayed recipe, then the
weights, loaded strictly; :func:`read_saved` and :func:`load_saved_weights` are its steps.
Nothing here ever unpickles.

Example::

    >>> import netgraft
    >>> model = netgraft.load_model("torchvision:resnet18")
    >>> netgraft.replace_head(model, num_classes=10)
    >>> netgraft.save(model, "runs/resnet18-10")
    >>> again = netgraft.load("runs/resnet18-10")
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from torch import nn

from . import marks
from .atomic import atomic_folder
from .deprecation import legacy
from .errors import RecipeError, WeightsError, key_mismatch
from .recipe import Recipe, recipe_of, replay
from .zoo import load_model, use_folder_loader

__all__ = [
    "FORMAT_VERSION",
    "RECIPE_FILE",
    "WEIGHTS_FILE",
    "is_saved_folder",
    "load",
    "load_saved_weights",
    "read_recipe",
    "read_saved",
    "save",
]

RECIPE_FILE = "recipe.yaml"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1


def _versions() -> dict[str, str]:
    return {"netgraft": importlib.metadata.version("netgraft"), "torch": str(torch.__version__)}


def is_saved_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds a ``recipe.yaml`` that netgraft wrote."""
    recipe = Path(folder) / RECIPE_FILE
    if not recipe.is_file():
        return False
    try:
        data = yaml.safe_load(recipe.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "netgraft" in data


def _check_saveable(model: nn.Module, folder: Path) -> Recipe:
    recipe = recipe_of(model)
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
    if folder.is_dir() and any(folder.iterdir()) and not is_saved_folder(folder):
        raise RecipeError(
            f"refusing to overwrite {str(folder)!r}: it is not empty and is not a netgraft "
            f"folder (no {RECIPE_FILE}); choose another folder"
        )
    return recipe


@legacy(folder="out_dir")
def save(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``model`` to ``out_dir`` as ``weights.safetensors`` + ``recipe.yaml`` (base spec,
    operations, netgraft and torch versions), atomically: the folder appears complete or not
    at all. An existing netgraft folder is replaced; any other existing folder is refused.
    Returns the folder."""
    folder = Path(out_dir)
    recipe = _check_saveable(model, folder)
    with atomic_folder(folder) as tmp:
        # save_model drops the duplicates of shared (tied) tensors; load_model restores them
        safetensors.torch.save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        data = {**_versions(), "format": FORMAT_VERSION, **recipe.to_dict()}
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
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


def read_saved(folder: str | Path) -> tuple[Recipe, Path]:
    """The recipe of a saved folder and its weights file, checked to exist, so a broken
    folder is refused before anything is built."""
    recipe = Recipe.from_dict(read_recipe(folder))
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"{str(folder)!r} has a recipe but no {WEIGHTS_FILE}")
    return recipe, weights


def load_saved_weights(model: nn.Module, weights: Path) -> nn.Module:
    """Load a saved folder's weights file into ``model``, rebuilt from its recipe, strictly:
    every tensor present and nothing extra, else :class:`WeightsError`."""
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except Exception as exc:
        raise WeightsError(
            f"{str(weights)!r} could not be loaded into the rebuilt model (corrupt, truncated "
            f"or from another recipe?): {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
    if missing or unexpected:
        raise WeightsError(
            f"{str(weights)!r} does not fit the model its recipe rebuilds: "
            + key_mismatch(sorted(missing), sorted(unexpected))
        )
    return model


@legacy(folder="path")
def load(path: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save` from its folder ``path``: build the base
    with :func:`netgraft.load_model`, replay the recorded operations, then load the weights
    strictly. No pickle is involved."""
    recipe, weights = read_saved(path)
    base = dict(recipe.base or {})
    spec = base.pop("spec")
    model = replay(load_model(spec, **base), recipe.operations)
    load_saved_weights(model, weights)
    marks.RECIPE.set(model, recipe)
    return model


use_folder_loader(load)
