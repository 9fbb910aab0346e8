"""The tokenizer that goes with a model spec.

:func:`load_tokenizer` gives the tokenizer a ``gguf:PATH`` file holds, the one saved in an
``hf:PATH`` folder, or, for a saved netgraft folder, its base model's. It never downloads
anything and never builds a model.
"""

from __future__ import annotations

from typing import Any

from .errors import SpecError
from .gguf import load_gguf_tokenizer
from .saved import read_saved
from .zoo import parse_spec

__all__ = ["load_tokenizer"]


def load_tokenizer(spec: str) -> Any:
    """The tokenizer for ``spec``: a ``gguf:PATH`` file's own (its ``tokenizer.ggml.*``
    metadata), an ``hf:PATH`` folder's (``AutoTokenizer``, local files only), or for a
    folder written by :func:`netgraft.save` the tokenizer of the base spec it records.
    Other specs (torchvision, timm, Python files) have none: :class:`SpecError`."""
    kind, rest = parse_spec(spec)
    if kind == "folder":
        recipe, _ = read_saved(rest)
        base = (recipe.base or {}).get("spec")
        if not base:
            raise SpecError(f"saved folder {rest!r} records no base model spec")
        return load_tokenizer(base)
    if kind == "gguf":
        return load_gguf_tokenizer(rest)
    if kind != "hf":
        raise SpecError(
            f"model spec {spec!r} comes with no tokenizer; tokenizers come from hf:PATH "
            f"folders, gguf:PATH files and saved folders built on them"
        )
    try:
        import transformers
    except ImportError as exc:
        raise SpecError(
            "hf: specs need the transformers package (pip install 'netgraft[hf]')"
        ) from exc
    try:
        return transformers.AutoTokenizer.from_pretrained(rest, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(
            f"hf:{rest}: no tokenizer could be built: {str(exc).splitlines()[0]}"
        ) from exc
