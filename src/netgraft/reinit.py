"""Re-initialise chosen layers the way their own constructors would.

Linear, Conv, Embedding, LayerNorm, GroupNorm and friends go through their own
``reset_parameters``; BatchNorm gets weight 1, bias 0 and reset running statistics;
``nn.MultiheadAttention`` its ``_reset_parameters``. A layer type netgraft does not
know is re-initialised through its ``reset_parameters`` when it has one, otherwise
``reinit`` raises rather than leave it half-initialised. Nothing outside the
selection changes.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import NetgraftError
from .select import Selector, select

__all__ = ["reinit", "reinit_module"]


def reinit_module(module: nn.Module) -> None:
    """Re-initialise the tensors ``module`` owns directly to their initial state."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        module.reset_running_stats()
        if module.affine:
            with torch.no_grad():
                module.weight.fill_(1.0)
                module.bias.zero_()
        return
    if isinstance(module, nn.MultiheadAttention):
        module._reset_parameters()
        return
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    owned = [n for n, p in module._parameters.items() if p is not None]
    if not owned:  # only buffers that are not statistics (position ids): nothing to reset
        return
    raise NetgraftError(
        f"netgraft does not know how to re-initialise {type(module).__name__} (it owns "
        f"{', '.join(owned)} and has no reset_parameters); re-initialise it yourself or "
        f"select the layers inside it"
    )


def reinit(model: nn.Module, selector: Selector, seed: int | None = 0) -> list[str]:
    """Re-initialise every layer ``selector`` chooses and return their names.

    With a ``seed`` (default 0) the new values are reproducible and the global RNG state
    is left as it was; ``seed=None`` draws them from torch's global generator. Raises :class:`SelectionError` when the selector matches nothing and
    :class:`NetgraftError` for a layer type that cannot be re-initialised.
    """
    names = select(model, selector)
    modules = dict(model.named_modules())
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for name in names:
            reinit_module(modules[name])
    return names
