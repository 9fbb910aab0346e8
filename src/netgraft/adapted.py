"""What netgraft knows about a PEFT model (Hugging Face ``peft``) without importing peft.

A PEFT model wraps a *base model* (``model.base_model.model`` for LoRA and the other
tuners; ``model.base_model`` for prompt learning) whose chosen layers PEFT replaced with
*tuner layers*: the base layer kept as ``base_layer`` and the adapter's own modules beside
it (``lora_A.default``, ``lora_B.default``, ...). ``modules_to_save`` (a classifier) are
wrapped so that a trainable copy (``modules_to_save.default``) runs instead of the frozen
original. PEFT's *own trainable set* is those adapter modules and copies, for the active
adapters; everything else is the frozen base.

The low-level modules (:mod:`netgraft.layers`, :mod:`netgraft.freeze`,
:mod:`netgraft.select`, :mod:`netgraft.recipe`) read PEFT models through this module, by
duck typing on PEFT's public attributes (``peft_config``, ``active_adapters``, a tuner
layer's ``adapter_layer_names``); what needs peft itself lives in :mod:`netgraft.adapters`.
This module never changes a model.
"""

from __future__ import annotations

import enum
from typing import Any

from torch import nn

__all__ = [
    "adapter_layers",
    "adapter_parameters",
    "base_layer_names",
    "config_to_plain",
    "is_peft_model",
    "peft_base",
]


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (``peft.PeftModel`` or a subclass), told by its
    class's module and PEFT's ``peft_config`` mapping, without importing peft."""
    return (
        isinstance(model, nn.Module)
        and type(model).__module__.split(".")[0] == "peft"
        and isinstance(getattr(model, "peft_config", None), dict)
        and isinstance(getattr(model, "base_model", None), nn.Module)
    )


def peft_base(model: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, base model)``: the dotted name of the model PEFT wraps inside ``model``
    (``"base_model.model"`` for the tuners, ``"base_model"`` for prompt learning) and that
    module; ``("", model)`` for a model that is not a PEFT model."""
    if not is_peft_model(model):
        return "", model
    tuner = model.base_model
    inner = getattr(tuner, "model", None)
    if isinstance(inner, nn.Module) and type(tuner).__module__.split(".")[0] == "peft":
        return "base_model.model", inner
    return "base_model", tuner


def _active(model: nn.Module) -> set[str]:
    active = getattr(model, "active_adapters", None)
    if callable(active):
        active = active()
    if isinstance(active, str):
        return {active}
    return set(active or ())


def adapter_layers(model: nn.Module) -> dict[str, str]:
    """The modules PEFT trains in ``model``, by dotted name, with the adapter each belongs
    to: every adapter module of a tuner layer (``...query.lora_A.default``), every trainable
    copy of a ``modules_to_save`` module (``...classifier.modules_to_save.default``) and a
    prompt encoder's entries. Empty for a model that is not a PEFT model."""
    if not is_peft_model(model):
        return {}
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        kinds = list(getattr(module, "adapter_layer_names", ()) or ())
        if type(module).__name__ == "ModulesToSaveWrapper" or hasattr(module, "modules_to_save"):
            kinds.append("modules_to_save")
        if name == "prompt_encoder":
            kinds.append("")
        for kind in kinds:
            holder = module if not kind else getattr(module, kind, None)
            if not isinstance(holder, (nn.ModuleDict, nn.ParameterDict)):
                continue
            for adapter in holder.keys():
                found[f"{name}.{kind}.{adapter}" if kind else f"{name}.{adapter}"] = adapter
    return found


def adapter_parameters(model: nn.Module, *, active_only: bool = True) -> list[str]:
    """The dotted names of the parameters in PEFT's own trainable set (see the module
    docstring): those of :func:`adapter_layers`, of the active adapters only unless
    ``active_only`` is False."""
    layers = adapter_layers(model)
    active = _active(model)
    keep = [n for n, a in layers.items() if not active_only or not active or a in active]
    names = []
    for pname, _ in model.named_parameters():
        if any(pname == k or pname.startswith(k + ".") for k in keep):
            names.append(pname)
    return names


def base_layer_names(model: nn.Module, names: list[str]) -> list[str]:
    """Those of the layer ``names`` that belong to a PEFT model's frozen base (none of their
    parameters is an adapter parameter); empty for a model that is not a PEFT model."""
    if not is_peft_model(model):
        return []
    adapters = list(adapter_layers(model))
    return [n for n in names if not any(n == a or n.startswith(a + ".") for a in adapters)]


def config_to_plain(config: Any) -> dict[str, Any]:
    """A PEFT config as plain data (sets as sorted lists, enums as their values), for a
    recipe; ``peft.get_peft_config`` builds the config back from it."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: _plain(v) for k, v in data.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    return value
