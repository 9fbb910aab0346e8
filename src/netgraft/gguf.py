"""GGUF checkpoints (llama.cpp's single-file format) as Hugging Face models and tokenizers.

:func:`load_gguf_model` checks that a ``.gguf`` file is complete (the ``gguf`` package parses
its header, metadata and every tensor's extent) and then lets transformers build the model
the file describes, with every weight dequantized to float32: an ordinary dense
``torch.nn.Module`` that netgraft can freeze, grow and train. :func:`load_gguf_tokenizer`
builds the tokenizer the file holds. This is what the ``gguf:PATH`` model spec does
(:func:`netgraft.load_model`, the CLI, saved folders and recipes).

Nothing here downloads anything: the file is read locally and transformers is told to stay
offline. A missing, truncated or corrupt file, a missing ``gguf`` package or an
architecture transformers cannot read is one :class:`~netgraft.errors.SpecError` or
:class:`~netgraft.errors.WeightsError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import SpecError, WeightsError

__all__ = ["gguf_architecture", "load_gguf_model", "load_gguf_tokenizer"]

_EXTRA = "pip install 'netgraft[gguf]'"
# where transformers says it cannot map a GGUF architecture onto one of its models
_UNSUPPORTED = ("not supported", "unknown architecture", "unrecognized")


def _reader(path: Path) -> Any:
    """A parsed ``gguf.GGUFReader`` of ``path``; a clear error when the file cannot be."""
    try:
        import gguf
    except ImportError as exc:
        raise SpecError(
            f"gguf:{path}: reading GGUF files needs the gguf package ({_EXTRA})"
        ) from exc
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise SpecError(f"gguf:{path}: expected a .gguf file; the path {what}")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, TypeError, OverflowError, OSError) as exc:
        size = path.stat().st_size
        raise WeightsError(
            f"gguf:{path}: not a complete GGUF file ({size:,} bytes; truncated or corrupt: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc


def _field_text(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` a GGUF file declares (``"llama"``, ``"qwen2"``, ...),
    after checking that the file is complete."""
    path = Path(path)
    arch = _field_text(_reader(path), "general.architecture")
    if arch is None:
        raise WeightsError(f"gguf:{path}: the file declares no general.architecture")
    return arch


def _transformers(path: Path) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise SpecError(
            f"gguf:{path}: GGUF models need the transformers package ({_EXTRA})"
        ) from exc
    return transformers


def _offline() -> None:
    # a local file never needs the hub; make sure nothing tries to reach it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_gguf_model(
    path: str | Path, *, auto_class: str = "AutoModelForCausalLM", **kwargs: Any
) -> nn.Module:
    """The Hugging Face model (``auto_class``, a causal LM by default) a GGUF file holds,
    with its weights dequantized to float32 and no trace of quantization left on it
    (``config.quantization_config`` removed), so it trains and saves like any dense model.
    Extra keyword arguments go to ``from_pretrained``. Never downloads anything."""
    import torch

    path = Path(path)
    arch = gguf_architecture(path)
    transformers = _transformers(path)
    _offline()
    extra: dict[str, Any] = {"dtype": torch.float32, **kwargs}
    config_cls = getattr(transformers, "GgufConfig", None)
    if config_cls is not None and "quantization_config" not in extra:
        extra["quantization_config"] = config_cls(dequantize=True)
    try:
        model = getattr(transformers, auto_class).from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, **extra
        )
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if any(word in first.lower() for word in _UNSUPPORTED):
            raise SpecError(
                f"gguf:{path}: transformers {transformers.__version__} cannot build a model "
                f"for the GGUF architecture {arch!r} ({first})"
            ) from exc
        raise WeightsError(f"gguf:{path}: could not build {auto_class}: {first}") from exc
    _forget_quantization(model)
    return model


def _forget_quantization(model: nn.Module) -> None:
    """Drop what transformers leaves on a GGUF-loaded model to say it came quantized: the
    weights are plain float tensors now, and those marks make ``.float()``, saving and
    trainers refuse or misbehave."""
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer a GGUF file holds (``tokenizer.ggml.*`` metadata), as a transformers
    fast tokenizer. A file without one is a :class:`SpecError`."""
    path = Path(path)
    reader = _reader(path)
    if reader.get_field("tokenizer.ggml.model") is None:
        raise SpecError(f"gguf:{path}: the file holds no tokenizer (no tokenizer.ggml.model)")
    transformers = _transformers(path)
    _offline()
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"gguf:{path}: could not build its tokenizer: {first}") from exc
