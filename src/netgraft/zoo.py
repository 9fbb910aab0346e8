"""Model specs -> modules: ``torchvision:NAME``, ``timm:NAME``, ``hf:PATH``, ``gguf:PATH``,
``path/to/file.py:function`` and saved netgraft folders.

:func:`load_model` builds the architecture, optionally loads weights from a local
file (never executing code from it unless ``trust_pickle=True``) and records the
spec as the model's recipe base, so surgery on it can be saved and replayed. A saved
folder is rebuilt by :func:`netgraft.saved.load` (its base model built here, then its recipe
replayed, then its weights loaded strictly); :mod:`netgraft.saved` sits above this module and
registers that loader, so a folder spec given to :func:`load_model` reaches it.
Nothing here downloads anything unless ``pretrained=True`` asks the source
library to; offline that fails with one clear error.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import NetgraftError, SpecError, WeightsError, closest, key_mismatch
from .gguf import load_gguf_model
from .recipe import set_base
from .transfer.formats.torch_files import load_state_dict_file

__all__ = ["HF_TASKS", "input_for", "load_model", "load_weights", "parse_spec", "use_folder_loader"]

# The loader of saved netgraft folders (netgraft.saved.load). saved.py builds its base model
# with load_model, so it registers itself here instead of being imported (no import cycle).
_FOLDER_LOADERS: list[Callable[[str | Path], nn.Module]] = []


def use_folder_loader(loader: Callable[[str | Path], nn.Module]) -> None:
    """Make ``loader`` the function that :func:`load_model` calls with a saved folder spec."""
    _FOLDER_LOADERS[:] = [loader]


HF_TASKS = {
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}
_PREFIX_WRAPPERS = ("module.", "_orig_mod.", "model.")
_SPEC_HELP = (
    "expected torchvision:NAME, timm:NAME, hf:PATH (a local Hugging Face folder), "
    "gguf:PATH (a local .gguf file), "
    "path/to/file.py:function, or a saved netgraft folder"
)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a spec into ``(kind, rest)`` with kind in torchvision, timm, hf, gguf, file,
    folder."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty model spec; {_SPEC_HELP}")
    spec = spec.strip()
    for kind in ("torchvision", "timm", "hf", "gguf"):
        if spec.startswith(kind + ":"):
            rest = spec[len(kind) + 1 :]
            if not rest:
                raise SpecError(f"model spec {spec!r} names no model; {_SPEC_HELP}")
            return kind, rest
    path_part, sep, fn = spec.rpartition(":")
    if sep and path_part.endswith(".py"):
        return "file", spec
    if Path(spec).is_dir():
        return "folder", spec
    if spec.endswith(".py"):
        raise SpecError(f"model spec {spec!r} names a file but no function: use {spec}:build_fn")
    raise SpecError(f"unknown model spec {spec!r}; {_SPEC_HELP}")


def _close(word: str, names: list[str]) -> str:
    close = closest(word, names)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _offline_error(spec: str, exc: Exception) -> SpecError:
    return SpecError(
        f"could not fetch pretrained weights for {spec!r} ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); offline, pass a local weights file "
        f"instead: load_model({spec!r}, weights='FILE') or --weights FILE"
    )


def _torchvision(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise SpecError(f"torchvision has no model {name!r}{_close(name, names)}")
    try:
        return torchvision.models.get_model(
            name, weights="DEFAULT" if pretrained else None, **kwargs
        )
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise _offline_error(f"torchvision:{name}", exc) from exc
        raise


def _timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise SpecError("timm: specs need the timm package (pip install 'netgraft[timm]')") from exc
    if not timm.is_model(name):
        raise SpecError(f"timm has no model {name!r}{_close(name, timm.list_models())}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if pretrained:
            raise _offline_error(f"timm:{name}", exc) from exc
        raise


def _hf(path: str, task: str | None, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise SpecError(
            "hf: specs need the transformers package (pip install 'netgraft[hf]')"
        ) from exc
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise SpecError(
            f"hf:{path}: expected a local Hugging Face folder with config.json; "
            f"{'the folder has none' if folder.is_dir() else 'no such folder'}"
        )
    task = task or "feature-extraction"
    if task not in HF_TASKS:
        raise SpecError(f"unknown Hugging Face task {task!r}; known: {', '.join(HF_TASKS)}")
    auto = getattr(transformers, HF_TASKS[task])
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    try:
        if has_weights or pretrained:
            return auto.from_pretrained(str(folder), local_files_only=True, **kwargs)
        config = transformers.AutoConfig.from_pretrained(
            str(folder), local_files_only=True, **kwargs
        )
        return auto.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(
            f"hf:{path}: could not build {HF_TASKS[task]}: {str(exc).splitlines()[0]}"
        ) from exc


def _gguf(path: str, task: str | None, kwargs: dict[str, Any]) -> nn.Module:
    task = task or "causal-lm"
    if task not in HF_TASKS:
        raise SpecError(f"unknown Hugging Face task {task!r}; known: {', '.join(HF_TASKS)}")
    return load_gguf_model(path, auto_class=HF_TASKS[task], **kwargs)


def _from_file(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    path_part, _, fn_name = spec.rpartition(":")
    path = Path(path_part)
    if not path.is_file():
        raise SpecError(f"model spec {spec!r}: file {path_part!r} does not exist")
    if not fn_name.isidentifier():
        raise SpecError(f"model spec {spec!r}: {fn_name!r} is not a function name")
    mod_name = f"_netgraft_user_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(mod_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise SpecError(f"model spec {spec!r}: cannot import {path_part!r}")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise SpecError(
                f"model spec {spec!r}: importing {path_part!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        sys.modules[mod_name] = module
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise SpecError(f"{path_part!r} has no function {fn_name!r}{_close(fn_name, names)}")
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _strip_wrappers(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIX_WRAPPERS:
        if state and all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if len(set(stripped) & expected) > len(set(state) & expected):
                state = stripped
    return state


def load_weights(model: nn.Module, weights: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a weights file into ``model`` strictly (every tensor present, same shapes);
    wrapper prefixes such as ``module.`` are stripped. For architectures that differ, use
    :func:`netgraft.transfer`. Raises :class:`WeightsError` naming what does not fit."""
    state = load_state_dict_file(weights, trust_pickle=trust_pickle)
    own = model.state_dict()
    state = _strip_wrappers(state, set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"weights file {str(weights)!r} does not fit {type(model).__name__}: "
            + key_mismatch(missing, unexpected, mismatched)
            + " (netgraft.transfer copies what fits and reports the rest)"
        )
    model.load_state_dict(state, strict=True)
    return model


def load_model(
    spec: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    trust_pickle: bool = False,
    task: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the model a spec names and return it.

    ``spec`` is ``torchvision:NAME``, ``timm:NAME``, ``hf:PATH`` (a local Hugging Face
    folder, loaded with its weights; ``task=`` picks a task model such as
    ``"sequence-classification"``), ``gguf:PATH`` (a local GGUF file: the Hugging Face
    model it holds, a causal LM unless ``task=`` says otherwise, its weights dequantized to
    float32; needs ``netgraft[gguf]``), ``path/to/file.py:function`` (called with ``kwargs``),
    or a folder written by :func:`netgraft.save`. Extra keyword arguments go to the
    builder (``num_classes=10``). ``pretrained=True`` uses the source library's own
    downloader; ``weights=FILE`` loads a local ``.safetensors``/``.pt``/``.pth``/``.bin``
    strictly, refusing files that need unpickling unless ``trust_pickle=True``.
    The spec is recorded as the model's recipe base.
    """
    kind, rest = parse_spec(spec)
    if kind == "folder":
        if not _FOLDER_LOADERS:
            raise SpecError(f"{rest!r} is a saved folder; load it with netgraft.load")
        model = _FOLDER_LOADERS[0](rest)
        if weights is not None:
            load_weights(model, weights, trust_pickle=trust_pickle)
        return model
    if kind == "torchvision":
        model = _torchvision(rest, pretrained, kwargs)
    elif kind == "timm":
        model = _timm(rest, pretrained, kwargs)
    elif kind == "hf":
        model = _hf(rest, task, pretrained, kwargs)
    elif kind == "gguf":
        model = _gguf(rest, task, kwargs)
    else:
        model = _from_file(rest, kwargs)
    base: dict[str, Any] = dict(kwargs)
    if task is not None:
        base["task"] = task
    if kind == "file":  # absolute, so a saved folder reloads from any working directory
        path_part, _, fn_name = rest.rpartition(":")
        base_spec = f"{Path(path_part).resolve()}:{fn_name}"
    elif kind in ("hf", "gguf"):
        base_spec = f"{kind}:{Path(rest).resolve()}"
    else:
        base_spec = spec
    set_base(model, base_spec, **base)
    if weights is not None:
        load_weights(model, weights, trust_pickle=trust_pickle)
    return model


def input_for(model: nn.Module, shape: tuple[int, ...] | None = None, batch: int = 1) -> Any:
    """An example input for ``model``: ``shape`` is the per-example shape (``C,H,W`` for
    images; ``L`` token count for Hugging Face text models, which get token ids)."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is not None and main == "input_ids":
        length = shape[0] if shape else 16
        vocab = int(getattr(config, "vocab_size", 100))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, max(vocab, 2), (batch, length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if shape is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            shape = tuple(cfg["input_size"])
        elif config is not None and hasattr(config, "image_size"):
            size = config.image_size
            shape = (getattr(config, "num_channels", 3), size, size)
        else:
            raise NetgraftError(
                "cannot guess this model's input shape; give one (--input-shape C,H,W)"
            )
    return torch.randn(batch, *shape)
