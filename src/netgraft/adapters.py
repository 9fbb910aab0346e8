"""Adapters (LoRA and the other Hugging Face PEFT tuners) on netgraft's reuse.

PEFT decides *what* trains (``target_modules``, ``layers_to_transform``,
``modules_to_save``); netgraft supplies the rest, always through the ``peft`` package
itself (never a LoRA of its own; ``pip install 'netgraft[peft]'``):

- :func:`add_adapters` puts adapters on a model, on the top ``top`` blocks of its main
  stack by default, refusing targets inside ``keep_frozen`` and layer indices beyond the
  stack before anything is changed; the call is a recipe operation, so ``netgraft.save``
  writes the adapter config into the recipe and the adapter weights into the same
  safetensors file, and ``netgraft.load`` rebuilds the PEFT model without pickle.
- a PEFT model works wherever netgraft takes a model: :func:`netgraft.blocks` gives the
  blocks of its base with each adapter in its block, selectors read ``adapter:NAME`` and
  names relative to the base, :func:`netgraft.unfreeze` / :func:`netgraft.train_only`
  unfreeze only PEFT's own trainable set unless ``base=True``.
- :func:`prepare` (which ``fit`` and ``fine_tune`` call) checks a PEFT model and holds its
  frozen base as netgraft holds any frozen module (inference mode), so that
  ``fit(..., run=RunOptions(cache="auto"))`` runs the frozen bottom below the lowest
  adapter once and trains from the cached boundary with the same losses as without the
  cache.

Example::

    >>> model = netgraft.load_model("hf:PATH", task="sequence-classification", num_labels=2)
    >>> model = netgraft.add_adapters(model, top=2, r=8, target_modules=["query", "value"])
    >>> netgraft.fit(model, train, epochs=3, lr=1e-3)     # bottom four layers run once
    >>> netgraft.save(model, "runs/lora")

This module changes a model only in :func:`add_adapters` (through PEFT) and :func:`prepare`
(modes of frozen modules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import nn

from .adapted import adapter_layers, config_to_plain, is_peft_model, peft_base
from .errors import NetgraftError, SelectionError
from .extras import require
from .freeze import _freeze_layers, _sync_inference
from .heads import find_heads
from .layers import Block, blocks, is_norm
from .recipe import Resolved, recorded
from .select import Selector, select

__all__ = [
    "AdapterStack",
    "add_adapters",
    "adapter_blocks",
    "adapter_stack",
    "adapter_targets",
    "check_adapters",
    "lora_config",
    "prepare",
    "require_peft",
]


def require_peft() -> ModuleType:
    """The ``peft`` module, or :class:`~netgraft.integrations.MissingExtraError` naming the
    extra that installs it (``pip install 'netgraft[peft]'``)."""
    return require("peft", "peft", "netgraft's adapters")


@dataclass
class AdapterStack:
    """The main stack of a (base) model as PEFT's ``layers_to_transform`` counts it:
    ``pattern`` is the stack's attribute name (``"layer"`` for BERT's ``encoder.layer``),
    ``blocks`` its blocks in order (the stack's children; index ``i`` is PEFT's layer
    ``i``)."""

    pattern: str
    blocks: list[Block]

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def top(self, k: int) -> list[int]:
        """The PEFT layer indices of the top ``k`` blocks."""
        if not isinstance(k, int) or not 1 <= k <= self.depth:
            raise NetgraftError(
                f"top must be an integer from 1 to {self.depth} (the blocks of the main "
                f"stack {self.pattern!r}); found {k!r}"
            )
        return list(range(self.depth - k, self.depth))


def adapter_stack(model: nn.Module) -> AdapterStack:
    """The main stack of ``model`` (of its base, for a PEFT model): the longest run of
    blocks named ``PARENT.PATTERN.i``. Raises :class:`NetgraftError` when netgraft finds no
    stack of at least two blocks (adapters by block, caching below them and schedules
    across them need one)."""
    found = blocks(model)
    runs: dict[tuple[str, str], list[Block]] = {}
    for b in found:
        m = re.fullmatch(r"(?:(.*)\.)?([^.]+)\.(\d+)", b.name)
        if m is None:
            continue
        run = runs.setdefault((m.group(1) or "", m.group(2)), [])
        if int(m.group(3)) == len(run):
            run.append(b)
    best = max(runs.items(), key=lambda kv: len(kv[1]), default=None)
    if best is None or len(best[1]) < 2:
        base = peft_base(model)[1]
        raise NetgraftError(
            f"netgraft finds no stack of blocks in {type(base).__name__} (blocks: "
            f"{', '.join(b.name for b in found[:6])}); adapters by block need a model whose "
            "main stack is an nn.ModuleList or nn.Sequential of at least two blocks "
            "(`netgraft inspect SPEC --blocks` shows what netgraft sees)"
        )
    return AdapterStack(pattern=best[0][1], blocks=best[1])


def adapter_blocks(model: nn.Module) -> dict[int, list[str]]:
    """For a PEFT model, the adapter modules in each block of :func:`netgraft.blocks` that
    holds any, by block index (the head's ``modules_to_save`` copy in the head's block)."""
    found = blocks(model)
    owned = list(adapter_layers(model))
    out: dict[int, list[str]] = {}
    for b in found:
        inside = [a for a in owned if any(a.startswith(m + ".") for m in b.modules)]
        if inside:
            out[b.index] = inside
    return out


def _default_targets(base: nn.Module) -> list[str] | None:
    kind = getattr(getattr(base, "config", None), "model_type", None)
    peft = require_peft()
    mapping = getattr(peft.utils, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", {})
    found = mapping.get(kind)
    return list(found) if found else None


def lora_config(model: nn.Module, top: int | None, options: dict[str, Any]) -> Any:
    """The ``peft.LoraConfig`` :func:`add_adapters` builds from keyword ``options`` for
    ``model`` (which it does not change): rank 8, the model type's default targets, the
    heads as ``modules_to_save``, and the top ``top`` blocks as ``layers_to_transform``.
    Raises :class:`NetgraftError` when PEFT knows no default targets for the model and
    none are given, or when ``top`` is given and the model has no stack of blocks."""
    peft = require_peft()
    options = dict(options)
    options.setdefault("r", 8)
    if options.get("target_modules") is None:
        options["target_modules"] = _default_targets(model)
        if options["target_modules"] is None:
            raise NetgraftError(
                f"PEFT knows no default target modules for {type(model).__name__}; name them: "
                "add_adapters(model, target_modules=['query', 'value'], ...)"
            )
    if "modules_to_save" not in options:
        options["modules_to_save"] = [n for n, _ in find_heads(model)] or None
    if top is not None:
        stack = adapter_stack(model)
        options["layers_to_transform"] = stack.top(top)
        options.setdefault("layers_pattern", stack.pattern)
    return peft.LoraConfig(**options)


def adapter_targets(model: nn.Module, config: Any) -> list[str]:
    """The modules of ``model`` PEFT would adapt under ``config`` (PEFT's own matching)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    found = []
    for name, _ in model.named_modules():
        hit = check_target_module_exists(config, name) if name else False
        if hit and type(hit).__name__ != "_ExcludedModule":
            found.append(name)
    return found


def _check_config(model: nn.Module, config: Any, keep_frozen: Selector) -> None:
    """Refuse layer indices beyond the main stack, targets matching nothing and targets
    inside ``keep_frozen``, before PEFT changes the model."""
    wanted = getattr(config, "layers_to_transform", None)
    _check_layers(model, wanted)
    if getattr(config, "target_modules", None) is None:
        return
    targets = adapter_targets(model, config)
    if not targets:
        raise SelectionError(
            f"the adapter config targets no module of {type(model).__name__} "
            f"(target_modules={config.target_modules!r}, layers_to_transform={wanted!r})"
        )
    _check_not_frozen(model, targets, keep_frozen)


def _check_layers(model: nn.Module, wanted: Any) -> None:
    """Refuse ``layers_to_transform`` indices outside the main stack of ``model``."""
    if wanted is None:
        return
    stack = adapter_stack(model)
    indices = [wanted] if isinstance(wanted, int) else list(wanted)
    beyond = [i for i in indices if not 0 <= i < stack.depth]
    if beyond:
        raise NetgraftError(
            f"layers_to_transform {indices} reaches beyond the model: its main stack "
            f"{stack.pattern!r} has {stack.depth} blocks (0 to {stack.depth - 1})"
        )


def _check_not_frozen(model: nn.Module, targets: list[str], keep_frozen: Selector) -> None:
    if keep_frozen is None:
        return
    frozen = set(select(model, keep_frozen))
    clash = [t for t in targets if t in frozen or any(f.startswith(t + ".") for f in frozen)]
    if clash:
        raise NetgraftError(
            f"adapters on layers kept frozen: {', '.join(clash[:4])}"
            f"{' …' if len(clash) > 4 else ''} are inside keep_frozen={keep_frozen!r}; "
            "leave them out of the adapter's targets or of keep_frozen"
        )


def _serialize(args: dict[str, Any]) -> dict[str, Any]:
    return {"config": args["config"], "adapter_name": args.get("adapter_name", "default")}


@recorded("add_adapters", serialize=_serialize)
def add_adapters(
    model: nn.Module,
    config: Any = None,
    *,
    top: int | None = None,
    keep_frozen: Selector = None,
    adapter_name: str = "default",
    **lora: Any,
) -> nn.Module:
    """Put PEFT adapters on ``model`` and return the PEFT model (``peft.get_peft_model``;
    PEFT changes ``model``'s modules in place and wraps it).

    ``config`` is a PEFT config (any tuner) or its dict; without one, a ``LoraConfig`` is
    built from ``lora`` (``r=8`` and PEFT's default ``target_modules`` for the model type
    unless given; the model's heads as ``modules_to_save``). ``top=k`` adapts only the top
    ``k`` blocks of the main stack (sets ``layers_to_transform`` and ``layers_pattern``),
    what lets ``fit`` cache everything below. Refused before anything changes, with one
    :class:`NetgraftError`: ``layers_to_transform`` beyond the stack, targets matching no
    module, targets inside ``keep_frozen``, a model without a stack when ``top`` is given.
    Recorded in the model's recipe (the config as plain data), so ``netgraft.save`` /
    ``netgraft.load`` keep the adapters.
    """
    peft = require_peft()
    if isinstance(config, dict):
        config = peft.get_peft_config(config)
    if config is None:
        config = lora_config(model, top, lora)
    elif lora or top is not None:
        raise NetgraftError("give a PEFT config or keyword options (top=, r=, ...), not both")
    _check_config(model, config, keep_frozen)
    adapted = peft.get_peft_model(model, config, adapter_name=adapter_name)
    prepare(adapted)
    return Resolved(adapted, {"config": config_to_plain(config), "adapter_name": adapter_name})


def check_adapters(model: nn.Module, keep_frozen: Selector = None) -> None:
    """Refuse, with one :class:`NetgraftError`, a PEFT model netgraft cannot schedule or
    cache by block: a base without a stack of blocks, adapters on layer indices beyond the
    stack, adapters inside ``keep_frozen``. Nothing for a model that is not a PEFT model."""
    if not is_peft_model(model):
        return
    adapter_stack(model)
    for config in model.peft_config.values():
        _check_layers(model, getattr(config, "layers_to_transform", None))
    _check_not_frozen(model, list(adapter_layers(model)), keep_frozen)


def prepare(model: nn.Module, keep_frozen: Selector = None) -> nn.Module:
    """Make a PEFT model ready for netgraft's training (``fit`` and ``fine_tune`` call it):
    :func:`check_adapters`, then hold its frozen base as netgraft holds any frozen module:
    fully frozen modules (the blocks below the lowest adapter) in inference mode and frozen
    norm layers in eval mode, so the frozen bottom computes a deterministic function that a
    feature cache can reproduce. Returns the model; a model that is not a PEFT model is
    returned untouched."""
    if not is_peft_model(model):
        return model
    check_adapters(model, keep_frozen)
    norms = [
        n
        for n, m in model.named_modules()
        if is_norm(m) and m._parameters and not any(p.requires_grad for p in m.parameters())
    ]
    _freeze_layers(model, norms, "eval")
    _sync_inference(model)
    return model
