"""Adapters on grown models: carry a PEFT model's adapters through block expansion, and
put adapters on only the blocks growth added (the LLaMA Pro recipe with adapters).

:func:`expand_adapted` runs :func:`netgraft.expand_blocks` on a PEFT model's base and keeps
every original block's adapters; the identity copies start without adapters (or with
zero-initialised ones). :func:`adapt_new_blocks` is :func:`netgraft.add_adapters` on the
blocks :func:`netgraft.grown_modules` lists. Both go through PEFT (``netgraft[peft]``).
This module changes models only through those operations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapted import is_peft_model, peft_base
from .adapters import adapter_blocks, adapter_stack, add_adapters
from .errors import NetgraftError
from .grow import expand_blocks, grown_modules
from .layers import Block, blocks
from .recipe import PROBE_ARGUMENTS, recorded

__all__ = ["NEW_ADAPTERS", "adapt_new_blocks", "expand_adapted"]


NEW_ADAPTERS = ("none", "zero")


@recorded("expand_adapted", omit=PROBE_ARGUMENTS)
def expand_adapted(model: nn.Module, *, new_adapters: str = "none", **expand: Any) -> nn.Module:
    """:func:`netgraft.expand_blocks` on a PEFT model's base, carrying its adapters into
    the grown model; returns the model, changed in place.

    Every block keeps its adapters (and their trained weights). The inserted copies start
    as the identity (see ``expand_blocks``) and, with ``new_adapters="none"``, without
    adapters (each tuner layer in a copy gives way to its base layer); with ``"zero"`` they
    keep adapter modules whose ``lora_B`` is zero, so they add nothing until trained.
    ``expand`` goes to ``expand_blocks`` (``every``, ``after``, ``example_input``,
    ``verify``, ``atol``); the config's ``layers_to_transform`` follows the renumbered
    blocks. Recorded in the recipe, so ``netgraft.save`` / ``netgraft.load`` keep it.
    """
    if not is_peft_model(model):
        raise NetgraftError("expand_adapted takes a PEFT model; use netgraft.expand_blocks")
    if new_adapters not in NEW_ADAPTERS:
        raise NetgraftError(f"new_adapters must be one of {NEW_ADAPTERS}; found {new_adapters!r}")
    _, base = peft_base(model)
    held = {b.name for b in blocks(model) if b.index in adapter_blocks(model)}
    adapted = {id(_first(base, b)) for b in adapter_stack(base).blocks if b.name in held}
    expand_blocks(base, **expand)
    for name in grown_modules(base):
        _drop_or_zero(base.get_submodule(name), new_adapters)
    stack = adapter_stack(base)
    kept = [i for i, b in enumerate(stack.blocks) if id(_first(base, b)) in adapted]
    for config in model.peft_config.values():
        if getattr(config, "layers_to_transform", None) is not None:
            config.layers_to_transform = kept
    return model


def _first(model: nn.Module, block: Block) -> nn.Module:
    """The module a block of ``model`` is (its first module)."""
    return model.get_submodule(block.modules[0])


def _drop_or_zero(copy: nn.Module, new_adapters: str) -> None:
    """In a grown copy: replace each tuner layer with its base layer, or zero its
    ``lora_B`` (and any other up-projection PEFT starts at zero)."""
    for name, module in list(copy.named_modules()):
        if not hasattr(module, "base_layer") or not hasattr(module, "adapter_layer_names"):
            continue
        if new_adapters == "zero":
            for holder in ("lora_B", "lora_embedding_B"):
                for param in getattr(module, holder, {}).parameters():
                    with torch.no_grad():
                        param.zero_()
            continue
        parent, _, attr = name.rpartition(".")
        setattr(copy.get_submodule(parent) if parent else copy, attr, module.base_layer)


def adapt_new_blocks(model: nn.Module, config: Any = None, **lora: Any) -> nn.Module:
    """LoRA (or ``config``) on only the blocks growth added (:func:`netgraft.grown_modules`),
    the LLaMA Pro recipe with adapters: :func:`add_adapters` with ``layers_to_transform`` set
    to the new blocks' indices. Raises :class:`NetgraftError` when the model has no grown
    block. Pre-norm copies start with zeroed output projections, through which no gradient
    reaches the layers before them: target those projections too (``o_proj``,
    ``down_proj``; ``c_proj`` for GPT-2)."""
    grown = set(grown_modules(model))
    stack = adapter_stack(model)
    new = [i for i, b in enumerate(stack.blocks) if set(b.modules) & grown]
    if not new:
        raise NetgraftError(
            "the model has no grown blocks (netgraft.grown_modules lists none); grow it with "
            "netgraft.expand_blocks first"
        )
    if config is not None:
        config.layers_to_transform = new
        config.layers_pattern = stack.pattern
        return add_adapters(model, config)
    return add_adapters(model, layers_to_transform=new, layers_pattern=stack.pattern, **lora)
