"""Read PyTorch weight files into a flat state dict, safely.

``.safetensors`` is read directly; ``.pt/.pth/.bin/.ckpt`` with ``torch.load(weights_only=True)``,
so loading never runs code from the file. A file that needs full unpickling is refused
unless the caller passes ``trust_pickle=True``. Wrapped checkpoints (``state_dict``,
``model``, ``model_state``, ``model_state_dict``) are unwrapped. Every failure is one
:class:`WeightsError` that says which file and what was wrong.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import WeightsError

__all__ = ["TORCH_SUFFIXES", "load_state_dict_file", "unwrap_checkpoint"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net")


def unwrap_checkpoint(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` state dict inside a loaded checkpoint object."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], (dict, nn.Module)):
                return unwrap_checkpoint(obj[key], source)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise WeightsError(
        f"{source} holds no state dict: expected a mapping of names to tensors (or one under "
        f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}), found {type(obj).__name__}"
    )


def load_state_dict_file(
    path: str | Path, *, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Load ``path`` (``.safetensors`` or a torch file) into a CPU state dict.

    Torch files are loaded with ``weights_only=True``; one that needs arbitrary unpickling is
    refused with :class:`WeightsError` unless ``trust_pickle=True``.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if path.is_dir():
        raise WeightsError(f"weights path {str(path)!r} is a folder, expected a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:
            raise WeightsError(
                f"weights file {str(path)!r} is not a readable safetensors file (corrupt or "
                f"truncated?): {exc}"
            ) from exc
    if suffix not in TORCH_SUFFIXES:
        raise WeightsError(
            f"weights file {str(path)!r}: unknown format {suffix or '(no suffix)'!r}; expected "
            f".safetensors or {', '.join(TORCH_SUFFIXES)} (Keras and ONNX files go through "
            f"netgraft.transfer)"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise WeightsError(
                f"weights file {str(path)!r} needs full unpickling, which can run arbitrary "
                f"code; it was refused. If you trust it, pass trust_pickle=True "
                f"(CLI --trust-pickle). ({str(exc).splitlines()[0]})"
            ) from exc
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise WeightsError(
                f"weights file {str(path)!r} could not be unpickled: {exc2}"
            ) from exc2
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"weights file {str(path)!r} is corrupt or truncated: {first}") from exc
    return unwrap_checkpoint(obj, source=f"weights file {str(path)!r}")
