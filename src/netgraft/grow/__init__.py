"""Grow trained networks in the middle without changing what they compute.

- :func:`deepen` inserts an identity or zero-residual layer after any module;
- :func:`widen` widens a Linear or Conv2d (Net2WiderNet);
- :func:`expand_blocks` copies transformer blocks (Hugging Face GPT-2, Llama-style, BERT);
- :func:`widen_transformer` grows their hidden size, heads and MLP width;
- :func:`stack_blocks` repeats their whole stack (G_stack; not function-preserving);
- :func:`verify_equivalence` measures how much two models' outputs differ;
- :func:`grown_modules` lists what growth added, for ``train_only``;

Every function-preserving growth operation verifies itself on a probe batch by default and records itself in
the model's recipe.
"""

from .deepen import Deepened, Residual, deepen
from .expand import GatedBlock, expand_blocks
from .grown import grown_modules
from .stack import stack_blocks
from .transformer_width import widen_transformer
from .verify import verify_equivalence
from .widen import widen

__all__ = [
    "Deepened",
    "GatedBlock",
    "Residual",
    "deepen",
    "expand_blocks",
    "grown_modules",
    "stack_blocks",
    "verify_equivalence",
    "widen",
    "widen_transformer",
]

# Growth *during* training (netgraft.Grow, grow_with_optimizer) lives in netgraft.train.growing:
# it calls these operations, and this package never imports train/.
