"""Small reference models built from scratch: the CNNs and the text CNN that the demo, the
documentation's examples, the tests and the benchmarks train on real digits and text.

They are plain ``nn.Sequential`` models with named blocks, so every netgraft operation
applies to them; nothing here loads weights or data.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["digits_cnn", "mnist_cnn", "text_cnn", "tokenize", "vocabulary"]


def mnist_cnn(num_classes: int = 10) -> nn.Module:
    """A CNN for 1×28×28 digits with blocks ``conv1`` (16 ch, pool), ``conv2`` (32 ch, pool,
    flatten), ``dense`` (1568→128, ReLU) and ``head`` (128→classes)."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), dense=nn.Linear(32 * 7 * 7, 128), relu3=nn.ReLU(),
        head=nn.Linear(128, num_classes),
    ))  # fmt: skip


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """A CNN for 1×8×8 digits with blocks ``conv1`` (16 ch), ``conv2`` (32 ch, pool,
    flatten), ``dense`` (512→64, ReLU) and ``head`` (64→classes)."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(), pool=nn.MaxPool2d(2),
        flatten=nn.Flatten(), dense=nn.Linear(32 * 4 * 4, 64), relu3=nn.ReLU(),
        head=nn.Linear(64, num_classes),
    ))  # fmt: skip


class _Channels(nn.Module):
    """``(N, L, C)`` word vectors as ``(N, C, L)`` channels for a 1-D convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class _MaxOverTime(nn.Module):
    """The largest value of each channel over the sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(-1)


def text_cnn(vocab_size: int, num_classes: int = 2, dim: int = 64) -> nn.Module:
    """A small text CNN over token ids (0 = padding) with blocks ``embed`` (``dim``-d words),
    ``conv`` (width-5 convolution, ReLU, max over time), ``dense`` and ``head``."""
    return nn.Sequential(OrderedDict(
        embed=nn.Embedding(vocab_size, dim, padding_idx=0), channels=_Channels(),
        conv=nn.Conv1d(dim, dim, 5, padding=2), relu1=nn.ReLU(), pool=_MaxOverTime(),
        dense=nn.Linear(dim, dim), relu2=nn.ReLU(), head=nn.Linear(dim, num_classes),
    ))  # fmt: skip


def tokenize(texts: Sequence[str], vocab: dict[str, int], length: int) -> torch.Tensor:
    """Token ids ``(len(texts), length)``: lower-case words, unknown words 1, padding 0."""
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [vocab.get(w, 1) for w in re.findall(r"[a-z']+", text.lower())[:length]]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def vocabulary(texts: Sequence[str], min_count: int = 2, size: int = 6000) -> dict[str, int]:
    """Ids of the ``size`` most common lower-case words of ``texts`` seen at least
    ``min_count`` times, from 2 (0 is padding and 1 unknown words, as :func:`tokenize` reads)."""
    counts = Counter(w for t in texts for w in re.findall(r"[a-z']+", t.lower()))
    words = [w for w, c in counts.most_common(size) if c >= min_count]
    return {w: i + 2 for i, w in enumerate(words)}
