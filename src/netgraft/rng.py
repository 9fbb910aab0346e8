"""The global random streams (torch, numpy, Python's ``random``, CUDA): seed them all,
save and restore them, or run code that leaves them as they were.

Training seeds them once and saves them in checkpoints so a resumed run draws the same
numbers; the feature cache draws its own augmentations inside :func:`forked` so a run
draws the same numbers whether or not a cache was built inside it. This module never
creates generators of its own.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["forked", "rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed torch's (CPU and CUDA), numpy's and Python's global random streams with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of every global random stream as tensors and plain data (loadable with
    ``torch.load(weights_only=True)``); restore it with :func:`set_rng_state`."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put every global random stream back in a state :func:`rng_state` returned (CUDA's
    only when the state holds it and CUDA is available)."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def forked() -> Iterator[None]:
    """Run the block and leave torch's CPU, numpy's and Python's global random streams
    exactly as they were before it."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
