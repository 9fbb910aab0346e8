"""Add transformer blocks to a trained stack without changing what it computes.

:func:`expand_blocks` copies blocks of a Hugging Face GPT-2, Llama-style (Llama, Mistral,
Qwen2/3, Gemma) decoder or BERT-style encoder and inserts each copy right after its original (block
expansion, as in LLaMA Pro):

- pre-norm blocks (``x + attn(norm(x))``, ``x + mlp(norm(x))``): the copy's attention-output
  and MLP-output projections are zeroed, so the copy adds exactly nothing; their gradients
  are not zero, so training moves it away from there;
- post-norm blocks (BERT: the norm comes after the residual addition, so zeroing cannot make
  the block the identity): the copy is wrapped in :class:`GatedBlock`,
  ``y = x + g·(block(x) − x)`` with ``g = 0`` (state-dict names ``...layer.N.block.*`` and
  ``...layer.N.gate``).

The families it knows are those of :data:`netgraft.grow.blocks.LAYOUTS`: GPT-2, Llama
(SmolLM2 is one), Mistral, Qwen2, Qwen3, Gemma 1/2/3 (whose extra norms after attention and
MLP turn a zero output into zero, so the copy still adds nothing), BERT-style encoders.
Blocks are renumbered (every ``layer_idx`` attribute inside them) and the config's
``num_hidden_layers`` and ``layer_types`` (sliding-window or full attention, per block; a
copy keeps its original's) updated, so a key-value cache built from the config has one slot
of the right kind per block and cached ``generate`` gives the same tokens. Other models are
refused with :class:`SurgeryError` before anything changes; this module never approximates.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import NetgraftError, SurgeryError
from ..recipe import PROBE_ARGUMENTS, recorded
from .blocks import Stack, find_stack, restack
from .grown import mark_grown
from .verify import apply_growth, growth_probe

__all__ = ["GatedBlock", "expand_blocks"]

log = logging.getLogger(__name__)

# (residual-output projections to zero, modules a pre-norm block of that family has)
_PRE_NORM = [
    (("attn.c_proj", "mlp.c_proj", "crossattention.c_proj"), ("ln_1", "ln_2")),  # GPT-2
    (("self_attn.o_proj", "mlp.down_proj"), ("input_layernorm", "post_attention_layernorm")),
]
# modules of a post-norm (BERT-style) block: norm after each residual addition
_POST_NORM = ("attention.output.LayerNorm", "output.LayerNorm")


class GatedBlock(nn.Module):
    """``y = x + gate·(block(x) − x)`` around a transformer block; with ``gate = 0`` it is the
    identity. Extra outputs of the block (attention weights, caches) pass through."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        param = next(iter(block.parameters()), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        device = param.device if param is not None else None
        self.gate = nn.Parameter(torch.zeros((), dtype=dtype, device=device))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.block(hidden_states, *args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        mixed = hidden_states + self.gate * (first - hidden_states)
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed


def _inner(block: nn.Module) -> nn.Module:
    return block.block if isinstance(block, GatedBlock) else block


def _has(module: nn.Module, dotted: str) -> bool:
    try:
        module.get_submodule(dotted)
        return True
    except AttributeError:
        return False


def _zeroed(source: nn.Module, stack: Stack) -> tuple[str, ...] | None:
    """The output projections to zero in a copy of the pre-norm block ``source`` (None for
    a post-norm block, gated instead); :class:`SurgeryError` when the block lacks the
    modules of its family's layout."""
    for projections, norms in _PRE_NORM if stack.layout == "pre-norm" else ():
        if all(_has(source, n) for n in norms) and _has(source, projections[0]):
            return tuple(name for name in projections if _has(source, name))
    if stack.layout == "post-norm" and all(_has(source, n) for n in _POST_NORM):
        return None
    raise SurgeryError(
        f"expand_blocks knows pre-norm GPT-2/Llama-style blocks (zeroed output projections) "
        f"and post-norm BERT-style blocks (gated); the blocks of {stack.name!r} are "
        f"{type(source).__name__}, which lacks the modules of the {stack.layout} layout"
    )


def _grow_copy(block: nn.Module, stack: Stack) -> nn.Module:
    """A copy of ``block`` that adds nothing to its input: zeroed output projections for a
    pre-norm block, a closed gate for a post-norm one."""
    source = _inner(block)
    projections = _zeroed(source, stack)
    if projections is None:
        return mark_grown(GatedBlock(copy.deepcopy(source)))
    twin = copy.deepcopy(source)
    with torch.no_grad():
        for name in projections:
            for p in twin.get_submodule(name).parameters(recurse=False):
                p.zero_()
    return mark_grown(twin)


def _positions(depth: int, every: int | None, after: int | list[int] | None) -> list[int]:
    if (every is None) == (after is None):
        raise NetgraftError("expand_blocks needs exactly one of every= or after=")
    if every is not None:
        if not isinstance(every, int) or every < 1:
            raise NetgraftError(f"every must be a positive integer; found {every!r}")
        return list(range(every - 1, depth, every))
    wanted = [after] if isinstance(after, int) else list(after or [])
    if not wanted:
        raise NetgraftError("after= names no block")
    out = []
    for i in wanted:
        if not isinstance(i, int) or not -depth <= i < depth:
            raise SurgeryError(
                f"after= takes block indices in [{-depth}, {depth - 1}]; found {i!r}"
            )
        out.append(i % depth)
    return sorted(set(out))


@recorded("expand_blocks", omit=PROBE_ARGUMENTS)
def expand_blocks(
    model: nn.Module,
    *,
    every: int | None = None,
    after: int | list[int] | None = None,
    example_input: Any = None,
    verify: bool = True,
    atol: float | None = None,
) -> nn.Module:
    """Insert a function-preserving copy of a transformer block after every ``every``-th
    block, or after the blocks whose indices ``after`` gives (counted in the stack before
    growing); return the model, changed in place.

    Pre-norm copies have zeroed attention/MLP output projections; post-norm (BERT) copies
    are gated with ``g = 0`` (see the module docstring). Layer indices and the config's
    ``num_hidden_layers`` are updated so cached generation still works; the new blocks are
    listed by :func:`netgraft.grown_modules`. Verification works as in :func:`netgraft.deepen`
    (random token ids when no ``example_input`` is given).
    """
    stack = find_stack(model, what="expand_blocks")
    depth = len(stack.blocks)
    positions = _positions(depth, every, after)
    for i in positions:
        _zeroed(_inner(stack.blocks[i]), stack)  # refuse before anything changes
    probe = growth_probe(model, example_input, what="expand_blocks", verify=verify, atol=atol)
    apply_growth(model, probe, lambda: _insert_copies(stack, positions))
    log.info(
        "expand_blocks: %s from %d to %d blocks (copies after %s)",
        stack.name,
        depth,
        len(stack.blocks),
        positions,
    )
    return model


def _insert_copies(stack: Stack, positions: list[int]) -> Callable[[], None]:
    """Put a growing copy after each block at ``positions`` (see :func:`restack`); return
    what puts the stack and config back as they were."""
    blocks: list[nn.Module] = []
    sources: list[int] = []
    for i, block in enumerate(stack.blocks):
        copies = [block, _grow_copy(block, stack)] if i in positions else [block]
        blocks.extend(copies)
        sources.extend([i] * len(copies))
    return restack(stack, blocks, sources)
