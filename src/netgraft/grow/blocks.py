"""The block stack of a Hugging Face transformer, and how to change its depth consistently.

Depth operations (:func:`netgraft.expand_blocks`, :func:`netgraft.stack_blocks`) find the
one ``nn.ModuleList`` holding the model's ``num_hidden_layers`` blocks, check that the
model's family is one whose layout netgraft knows (:data:`LAYOUTS`), and put a new list of
blocks in place with :func:`restack`, which keeps everything that is counted per block
consistent: each block's ``layer_idx`` (a key-value cache has one slot per index), the
config's ``num_hidden_layers`` and its per-layer lists (``layer_types``: which blocks use
sliding-window attention in Mistral-style, Qwen2/3 and Gemma 2/3 models). Rotary
embeddings live on the model, not in the blocks, so they need nothing. This module never
decides which blocks to add; the operations do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import SurgeryError

__all__ = ["LAYOUTS", "Stack", "find_stack", "restack"]

# model_type -> block layout. "pre-norm": x + f(norm(x)) for attention and MLP, whatever
# norms sit inside f (Gemma 2/3 also normalise f's output); "post-norm": BERT-style, the
# norm after the residual addition.
LAYOUTS: dict[str, str] = {
    **dict.fromkeys(
        ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
        "pre-norm",
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert"), "post-norm"),
}
# config fields holding one entry per block
_PER_LAYER = ("layer_types",)


@dataclass(frozen=True)
class Stack:
    """The blocks of a model: their dotted name, the list, the config and the layout."""

    name: str
    blocks: nn.ModuleList
    config: Any
    layout: str


def find_stack(model: nn.Module, *, what: str) -> Stack:
    """The stack of blocks of ``model``; :class:`SurgeryError` (naming ``what``) when the
    model is not a Hugging Face transformer of a known layout or holds no single stack of
    ``num_hidden_layers`` blocks."""
    config = getattr(model, "config", None)
    depth = getattr(config, "num_hidden_layers", None)
    if config is None or not isinstance(depth, int):
        raise SurgeryError(
            f"{what} works on Hugging Face transformers (GPT-2, Llama, Mistral, Qwen2/3, "
            f"Gemma 1/2/3, BERT); {type(model).__name__} has no config with num_hidden_layers"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise SurgeryError(
            f"{what} knows the block layouts of model types {', '.join(LAYOUTS)}; "
            f"{type(model).__name__} is of type {model_type!r}, whose layout (what its "
            f"blocks compute, what its config counts per block) netgraft does not know; "
            f"nothing was changed"
        )
    stacks = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == depth and depth > 0
    ]
    if len(stacks) != 1:
        raise SurgeryError(
            f"{what} needs exactly one stack of {depth} blocks in "
            f"{type(model).__name__}; found {len(stacks)} ({', '.join(n for n, _ in stacks)})"
        )
    name, blocks = stacks[0]
    return Stack(name, blocks, config, LAYOUTS[model_type])


def _renumber(blocks: nn.ModuleList) -> None:
    for j, block in enumerate(blocks):
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = j


def restack(stack: Stack, blocks: list[nn.Module], sources: list[int]) -> Callable[[], None]:
    """Make ``blocks`` the stack's blocks, block ``j`` standing where old block
    ``sources[j]`` stood for everything counted per block (its entry in ``layer_types``);
    renumber ``layer_idx`` and update the config. Returns what puts it all back."""
    config, depth = stack.config, len(stack.blocks)
    old_modules = OrderedDict(stack.blocks._modules)
    old_idx = {
        sub: sub.layer_idx
        for sub in stack.blocks.modules()
        if isinstance(getattr(sub, "layer_idx", None), int)
    }
    old_lists = {
        f: getattr(config, f)
        for f in _PER_LAYER
        if isinstance(getattr(config, f, None), (list, tuple)) and len(getattr(config, f)) == depth
    }
    stack.blocks._modules = OrderedDict((str(j), m) for j, m in enumerate(blocks))
    _renumber(stack.blocks)
    config.num_hidden_layers = len(blocks)
    for f, values in old_lists.items():
        setattr(config, f, [values[i] for i in sources])

    def undo() -> None:
        stack.blocks._modules = old_modules
        for sub, idx in old_idx.items():
            sub.layer_idx = idx
        config.num_hidden_layers = depth
        for f, values in old_lists.items():
            setattr(config, f, values)

    return undo
