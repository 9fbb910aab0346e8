"""How a Hugging Face text encoder turns token states into one vector for its classifier.

A BERT-style encoder (BERT, RoBERTa, MiniLM, ...) hands its classifier ``pooler(states)``:
by default the first token's state through a Linear and tanh that were trained for
next-sentence prediction. Sentence-transformers checkpoints such as all-MiniLM-L6-v2 were
trained instead with the *mean of the token states over the attention mask*. This module
swaps the encoder's pooler for one of:

- ``"mean"``: :class:`MaskedMeanPool`, the mean over the tokens the attention mask keeps
  (padding excluded), as sentence-transformers computes embeddings;
- ``"first"``: :class:`FirstTokenPool`, the first token's state ([CLS]) as it is;
- ``"pooler"``: the model's own pooler, left as it is.

Neither new pooler has parameters. :class:`MaskedMeanPool` needs the attention mask, which a
pooler is not given: a forward pre-hook on the encoder passes it the mask of each call.
This module never changes weights other than by removing the old pooler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import SurgeryError

__all__ = ["POOLINGS", "FirstTokenPool", "MaskedMeanPool", "set_text_pooling", "text_encoder"]

POOLINGS = ("mean", "first", "pooler")


class FirstTokenPool(nn.Module):
    """The first token's state: ``states[:, 0]``."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return states[:, 0]


class MaskedMeanPool(nn.Module):
    """The mean of the token states over the attention mask of the encoder's current call
    (every token when it was given none); padding never counts."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def remember_mask(self, _encoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on the encoder: keep the attention mask of this call."""
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # BertModel.forward(input_ids, attention_mask, ...)
        self.mask = mask

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or tuple(mask.shape) != tuple(states.shape[:2]):
            mask = torch.ones(states.shape[:2], device=states.device)
        weights = mask.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


_REMEMBER = MaskedMeanPool.remember_mask


def text_encoder(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The Hugging Face encoder inside ``model`` that owns a pooler (``model`` itself for a
    base model), as ``(dotted name, module)``; None when there is none."""
    for name, module in model.named_modules():
        if hasattr(module, "config") and "pooler" in module._modules:
            return name, module
    return None


def _forget_masks(encoder: nn.Module) -> None:
    """Remove the mask hooks an earlier :class:`MaskedMeanPool` left on ``encoder``."""
    hooks = encoder._forward_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "__func__", None) is _REMEMBER]:
        del hooks[key]
        encoder._forward_pre_hooks_with_kwargs.pop(key, None)


def set_text_pooling(model: nn.Module, pool: str, then: nn.Module | None = None) -> str:
    """Make the text encoder inside ``model`` pool its token states by ``pool`` (one of
    :data:`POOLINGS`), followed by ``then`` when given (a base model's new classifier, which
    its pooler output becomes); returns the dotted name of the pooler. Raises
    :class:`SurgeryError` for another choice or a model without a BERT-style pooler."""
    if pool not in POOLINGS:
        raise SurgeryError(f"pool must be one of {', '.join(POOLINGS)}; found {pool!r}")
    found = text_encoder(model)
    if found is None:
        raise SurgeryError(
            f"{type(model).__name__} has no Hugging Face encoder with a pooler, so pool="
            f"{pool!r} does not apply (models such as DistilBERT pool inside their forward)"
        )
    name, encoder = found
    where = f"{name}.pooler" if name else "pooler"
    if pool == "pooler":
        if then is not None:
            encoder.pooler = nn.Sequential(encoder.pooler, then)
        return where
    pooling = MaskedMeanPool() if pool == "mean" else FirstTokenPool()
    encoder.pooler = pooling if then is None else nn.Sequential(pooling, then)
    _forget_masks(encoder)
    if isinstance(pooling, MaskedMeanPool):
        encoder.register_forward_pre_hook(pooling.remember_mask, with_kwargs=True)
    return where
