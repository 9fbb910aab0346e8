"""Deepen a trained transformer by stacking its blocks (G_stack), knowingly changing it.

:func:`stack_blocks` repeats the whole stack of blocks ``factor`` times: blocks
``0 … L−1`` are followed by copies of ``0 … L−1`` (the G_stack operator of Du et al. 2024,
"Stacking Your Transformers", reported to beat function-preserving growth when pretraining
continues from a small base). Unlike every other growth operation this one is *not*
function-preserving: the model computes something else afterwards. So it is not verified;
the change of the outputs and of the next-token loss on the probe batch are measured and
logged (logger ``netgraft.grow.verify``) so that the jump is on record. Layer indices,
``num_hidden_layers`` and ``layer_types`` follow the copies (:mod:`netgraft.grow.blocks`),
so cached ``generate()`` works on the stacked model; the operation is recorded in the
model's recipe and replays on load.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import NetgraftError
from ..recipe import recorded
from .blocks import Stack, find_stack, restack
from .grown import mark_grown
from .verify import apply_growth, growth_probe

__all__ = ["HOW", "stack_blocks"]

log = logging.getLogger(__name__)

HOW = ("whole",)


def _stacked(stack: Stack, factor: int) -> Callable[[], None]:
    """Append ``factor − 1`` copies of the whole stack; return the undo."""
    depth = len(stack.blocks)
    blocks = list(stack.blocks)
    for _ in range(factor - 1):
        blocks.extend(mark_grown(copy.deepcopy(b)) for b in stack.blocks)
    return restack(stack, blocks, [j % depth for j in range(len(blocks))])


@recorded("stack_blocks", omit=("example_input", "measure"))
def stack_blocks(
    model: nn.Module,
    factor: int = 2,
    *,
    how: str = "whole",
    example_input: Any = None,
    measure: bool = True,
) -> nn.Module:
    """Repeat the transformer's whole stack of blocks ``factor`` times (G_stack: depth
    ``L`` becomes ``factor·L``, blocks ``0 … L−1`` then their copies in the same order);
    return the model, changed in place. Not function-preserving: with ``measure`` the
    largest change of the outputs and the next-token loss before and after on a probe batch
    (``example_input``, else random token ids) are logged, never checked. Works on the
    families :func:`netgraft.expand_blocks` knows (else :class:`SurgeryError` before
    anything changes); the copies are listed by :func:`netgraft.grown_modules`.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise NetgraftError(f"factor must be an integer of at least 2; found {factor!r}")
    if how not in HOW:
        raise NetgraftError(f"how must be one of {', '.join(HOW)}; found {how!r}")
    stack = find_stack(model, what="stack_blocks")
    depth = len(stack.blocks)
    probe = growth_probe(model, example_input, what="stack_blocks", verify=measure)
    apply_growth(model, probe, lambda: _stacked(stack, factor), exact=False)
    log.info("stack_blocks: %s from %d to %d blocks (%s)", stack.name, depth, depth * factor, how)
    return model
