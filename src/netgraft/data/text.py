"""Text examples as fit and the Hugging Face Trainer take them: tokenized once, fixed length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import DataError


class TokenizedTexts(torch.utils.data.Dataset):
    """Texts tokenized once by a Hugging Face ``tokenizer`` to ``max_length`` tokens (padded
    and truncated, with the attention mask): examples are dicts of tensors with their
    ``labels``, as ``fit`` and the Hugging Face ``Trainer`` take them, and every example has
    the same shapes, so the feature cache can store what a frozen encoder computes."""

    def __init__(self, texts: Sequence[str], labels: Any, tokenizer: Any, max_length: int = 128):
        if len(texts) != len(labels):
            raise DataError(f"{len(texts)} texts but {len(labels)} labels")
        encoded = tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        self.columns = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        self.labels = torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**{k: v[index] for k, v in self.columns.items()}, "labels": self.labels[index]}
