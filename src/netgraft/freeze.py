"""Freeze and unfreeze layers, with an explicit policy for normalisation layers.

Frozen means frozen: a frozen parameter has ``requires_grad=False``, so it gets no
gradient and no optimizer update (PyTorch optimizers skip parameters without a
gradient, momentum and weight decay included). Frozen norm layers follow ``bn=``:

- ``"eval"`` (default, Keras semantics): the layer runs in inference mode, using and
  never updating its running statistics, and stays in eval mode after a later
  ``model.train()``; its affine parameters are frozen.
- ``"train"`` (fastai's ``train_bn``): norm layers are left trainable and keep
  updating their statistics; only the other layers are frozen.
- ``"frozen"``: affine parameters and running statistics are frozen but the layer
  otherwise follows the model's mode (in training it normalises with batch statistics).

``track_running_stats`` and ``momentum`` are never changed. ``unfreeze`` undoes all of it.

A module whose parameters are all frozen (an encoder block, an attention layer, a frozen
backbone), and every parameter-free module inside one (its dropout, timm's ``DropPath``),
runs in inference mode, also after ``model.train()``: a frozen feature extractor computes a
deterministic function, as Keras's guidance to call a frozen base with ``training=False``
has it, and as the feature cache needs to reproduce an uncached run. (Hugging Face attention
applies its dropout when the *attention module* is training, so holding dropout modules
alone would not be enough.) Only the module's own flag is held: its children still get the
mode asked for and decide for themselves (a norm layer frozen with ``bn="frozen"`` follows
the model). A dropout next to trainable layers (a classifier's) keeps following the model;
``freeze``, ``unfreeze`` and ``train_only`` re-decide every module after each change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import marks
from .adapted import adapter_parameters, base_layer_names, is_peft_model
from .errors import NetgraftError
from .layers import is_norm
from .select import Selector, select

__all__ = [
    "NORM_POLICIES",
    "freeze",
    "frozen_state",
    "held_in_inference",
    "is_dropout",
    "load_frozen_state",
    "norm_policy",
    "train_only",
    "trainable_report",
    "unfreeze",
]

NORM_POLICIES = ("eval", "train", "frozen")


class _StayInEval:
    """Replaces ``module.train`` on a norm layer frozen with ``bn="eval"``: whatever mode is
    asked for, the layer stays in inference mode. Picklable and deep-copyable."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        nn.Module.train(self.module, False)
        return self.module


def _snapshot_stats(module: nn.Module, _inputs: Any) -> None:
    if module.training:
        marks.NORM_STATS.set(
            module,
            {k: b.detach().clone() for k, b in module._buffers.items() if b is not None},
        )


def _restore_stats(module: nn.Module, _inputs: Any, _output: Any) -> None:
    saved = marks.NORM_STATS.clear(module)
    if saved:
        with torch.no_grad():
            for k, value in saved.items():
                module._buffers[k].copy_(value)


def norm_policy(module: nn.Module) -> str | None:
    """The policy a frozen norm layer is held in (``"eval"`` or ``"frozen"``), else None."""
    return marks.NORM_POLICY.get(module)


def _release_norm(module: nn.Module, mode: bool) -> None:
    if marks.NORM_POLICY.clear(module) is None:
        return
    marks.STAY_IN_EVAL.clear(module)
    for handle in marks.NORM_HOOKS.clear(module, ()):
        handle.remove()
    nn.Module.train(module, mode)


def _hold_norm(module: nn.Module, policy: str) -> None:
    _release_norm(module, module.training)
    if policy == "eval":
        marks.STAY_IN_EVAL.set(module, _StayInEval(module))
        nn.Module.train(module, False)
    else:  # "frozen": statistics restored after every training-mode forward
        marks.NORM_HOOKS.set(
            module,
            (
                module.register_forward_pre_hook(_snapshot_stats),
                module.register_forward_hook(_restore_stats),
            ),
        )
    marks.NORM_POLICY.set(module, policy)


def is_dropout(module: nn.Module) -> bool:
    """Whether ``module`` is dropout-like: a torch dropout or a parameter-free module whose
    class name says ``Drop`` (timm's ``DropPath``, ``DropBlock2d``)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    return "Drop" in type(module).__name__ and not module._parameters


def held_in_inference(module: nn.Module) -> bool:
    """Whether ``module`` is held in inference mode because it is frozen through and through
    (see the module docstring)."""
    return bool(marks.INFERENCE.get(module))


class _Inference:
    """Replaces ``module.train`` on a fully frozen module: the module itself stays in
    inference mode, and its children get the mode asked for (each decides for itself)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        self.module.training = False
        for child in self.module.children():
            child.train(mode)
        return self.module


def _fully_frozen(model: nn.Module) -> dict[str, bool]:
    """For every module: whether it holds parameters and all of them are frozen; a
    parameter-free module counts as its parent does."""
    result: dict[str, bool] = {}

    def visit(name: str, module: nn.Module, parent: bool) -> None:
        params = list(module.parameters())
        frozen = not any(p.requires_grad for p in params) if params else parent
        result[name] = frozen
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, frozen)

    visit("", model, False)
    return result


def _sync_inference(model: nn.Module) -> None:
    """Hold every fully frozen module (norm layers aside: they follow ``bn``; the root aside:
    its flag is the mode asked of the model) in inference mode; release the others back to
    the model's mode."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, frozen in _fully_frozen(model).items():
        module = modules[name]
        if not name or is_norm(module):  # the root keeps the mode asked of the model
            continue
        if frozen and not held_in_inference(module):
            marks.INFERENCE.set(module, True)
            marks.STAY_IN_EVAL.set(module, _Inference(module))
            module.training = False
        elif not frozen and held_in_inference(module):
            marks.INFERENCE.clear(module)
            marks.STAY_IN_EVAL.clear(module)
            module.training = model.training


def _check_policy(bn: str) -> None:
    if bn not in NORM_POLICIES:
        raise NetgraftError(f"bn must be one of {', '.join(NORM_POLICIES)}; found {bn!r}")


def _own_params(module: nn.Module):
    return [p for p in module._parameters.values() if p is not None]


def freeze(model: nn.Module, selector: Selector = None, bn: str = "eval") -> nn.Module:
    """Freeze the layers ``selector`` chooses (every layer when None) and return the model.

    Their parameters stop requiring gradients; norm layers among them follow the ``bn``
    policy (``"eval"``, ``"train"`` or ``"frozen"``; see the module docstring). Raises
    :class:`SelectionError` when the selector matches nothing.
    """
    _check_policy(bn)
    _freeze_layers(model, select(model, selector), bn)
    _sync_inference(model)
    return model


def _freeze_layers(model: nn.Module, names: list[str], bn: str) -> None:
    """Freeze the layers named (the root, ``""``, included: a ViT's root owns its tokens)."""
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if is_norm(module):
            if bn == "train":
                continue
            _hold_norm(module, bn)
        for p in _own_params(module):
            p.requires_grad_(False)


def _unfreeze_layers(model: nn.Module, names: list[str], base: bool = False) -> None:
    modules = dict(model.named_modules())
    if not base:  # a PEFT model's base stays frozen: PEFT's own trainable set is the adapters
        kept = set(base_layer_names(model, names))
        names = [n for n in names if n not in kept]
    for name in names:
        module = modules[name]
        _release_norm(module, model.training)
        for p in _own_params(module):
            p.requires_grad_(True)


def unfreeze(model: nn.Module, selector: Selector = None, *, base: bool = False) -> nn.Module:
    """Make the chosen layers (every layer when None) trainable again and return the model.

    Parameters require gradients again; norm layers are released from their frozen policy
    and follow the model's current train/eval mode. On a PEFT model only PEFT's own
    trainable set (adapters, ``modules_to_save`` copies) among the chosen layers is
    unfrozen; the base model's layers stay frozen unless ``base=True``.
    """
    _unfreeze_layers(model, select(model, selector), base)
    _sync_inference(model)
    return model


def train_only(
    model: nn.Module, selector: Selector, bn: str = "eval", *, base: bool = False
) -> nn.Module:
    """Freeze every layer except those ``selector`` chooses, which become trainable.

    The frozen norm layers follow ``bn`` as in :func:`freeze`. On a PEFT model the chosen
    layers' adapters train and its base stays frozen unless ``base=True`` (see
    :func:`unfreeze`). Returns the model.
    """
    _check_policy(bn)
    keep = set(select(model, selector))
    rest = [n for n in select(model, None) if n not in keep]
    # names, not selectors: "everything else" may include the root, which owns parameters
    # in Vision Transformers (class token, position embedding) and has no selector
    _unfreeze_layers(model, sorted(keep), base)
    _freeze_layers(model, rest, bn)
    _sync_inference(model)
    return model


def frozen_state(model: nn.Module) -> dict[str, Any]:
    """A plain-data record of what is frozen: parameter names not requiring gradients and the
    norm policy of each held norm layer. Restore it with :func:`load_frozen_state`."""
    return {
        "frozen_params": [n for n, p in model.named_parameters() if not p.requires_grad],
        "norm_policies": {
            n: norm_policy(m) for n, m in model.named_modules() if norm_policy(m) is not None
        },
    }


def load_frozen_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Apply a record from :func:`frozen_state` to a model of the same architecture."""
    frozen = set(state.get("frozen_params", ()))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    policies = state.get("norm_policies", {})
    for name, module in model.named_modules():
        if name in policies:
            _hold_norm(module, policies[name])
        else:
            _release_norm(module, model.training)
    _sync_inference(model)
    return model


def trainable_report(model: nn.Module) -> dict[str, int]:
    """Counts of trainable and frozen parameters (elements), and their total; for a PEFT
    model also ``adapters``, the elements in PEFT's own trainable set (adapters and
    ``modules_to_save`` copies of the active adapters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = {"total": total, "trainable": trainable, "frozen": total - trainable}
    if is_peft_model(model):
        own = set(adapter_parameters(model))
        report["adapters"] = sum(p.numel() for n, p in model.named_parameters() if n in own)
    return report
