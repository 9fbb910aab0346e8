"""The study's ``"lora"`` mode: LoRA adapters (through Hugging Face PEFT, never a LoRA of
netgraft's own) on the top ``k`` blocks of the source's main stack, everything else frozen.

``k`` counts blocks of the main stack (:func:`netgraft.adapters.adapter_stack`, PEFT's
``layers_to_transform``) from the top, as :func:`netgraft.add_adapters` ``top=k`` does:
``k = 1`` adapts only the last block of the stack. The adapter's options come from the
study's ``budget["lora"]`` (rank 8 and PEFT's default targets for the model type unless
given there). Everything a lora setting cannot do is refused here, before any training:
peft missing (:class:`~netgraft.integrations.MissingExtraError`), ``unit="layer"``, a
model without a stack, ``k`` beyond the stack, options PEFT rejects, targets matching no
module of the top ``k`` blocks.

What the trials share: a trial trains as ``fit(run=RunOptions(cache="auto"))`` does, from
the features of the frozen bottom below its lowest adapter; with the study's shared pass
those features are computed once per ``k`` and read by every seed of that ``k``
(:func:`netgraft.study.shared.share_lora_bottoms`). Different ``k``, and the frozen and
surgical settings, do not share them (each ``k`` cuts elsewhere). Validation accuracy is
measured by the whole PEFT model.

This module changes a model only in :func:`lora_model` (through PEFT, on the copy a trial
trains); :func:`check_lora` tries the adapters on a copy of the source, dropped after.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..adapters import (
    AdapterStack,
    adapter_stack,
    adapter_targets,
    add_adapters,
    lora_config,
    require_peft,
)
from ..errors import NetgraftError
from ..rng import forked, seed_everything

__all__ = ["LORA_MODE", "check_lora", "lora_block_names", "lora_model", "split_lora_budget"]

LORA_MODE = "lora"
# set by the study from k, never by the user's options
_SET_BY_K = ("top", "layers_to_transform", "layers_pattern")


def split_lora_budget(budget: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(fit's budget, the lora options)``: ``budget["lora"]`` (a dict of
    ``peft.LoraConfig`` / :func:`netgraft.add_adapters` keywords, empty when absent) taken
    out of the rest, which goes to ``fit``. Options that ``k`` sets are refused."""
    rest = {k: v for k, v in budget.items() if k != "lora"}
    options = budget.get("lora") or {}
    if not isinstance(options, Mapping):
        raise NetgraftError(
            f"budget['lora'] must be a dict of LoRA options (r=, target_modules=, ...); "
            f"found {options!r}"
        )
    clash = sorted(set(_SET_BY_K) & set(options))
    if clash:
        raise NetgraftError(
            f"budget['lora'] cannot set {clash}: the study adapts the top k blocks for each k"
        )
    return rest, dict(options)


def lora_block_names(stack: AdapterStack) -> list[str]:
    """The block each ``k`` adapts down to, at index ``k - 1``: the top block first."""
    return [b.name for b in reversed(stack.blocks)]


def check_lora(
    model: nn.Module, unit: str, reuse: Iterable[int] | None, options: Mapping[str, Any]
) -> tuple[list[int], AdapterStack]:
    """The counts ``k`` the lora mode runs on ``model`` (``reuse``, or every count from 1 to
    the depth of the main stack) and that stack, after checking, with one
    :class:`NetgraftError` and before any training, that PEFT can put adapters on the top
    ``k`` blocks of ``model`` for each of them."""
    require_peft()
    if unit != "block":
        raise NetgraftError(
            f"mode 'lora' counts blocks of the model's main stack; use unit='block' (found "
            f"unit={unit!r})"
        )
    stack = adapter_stack(model)
    asked = range(1, stack.depth + 1) if reuse is None else reuse
    ks = sorted({int(k) for k in asked})
    bad = [k for k in ks if not 0 <= k <= stack.depth]
    if bad:
        raise NetgraftError(
            f"mode 'lora' adapts the top k blocks of the main stack {stack.pattern!r}, which "
            f"has {stack.depth} blocks: k must be between 0 and {stack.depth}; found {bad}"
        )
    for k in (k for k in ks if k > 0):
        _check_targets(model, k, options)
    if any(ks):
        _try_adapters(model, max(ks), options)
    return ks, stack


def _try_adapters(model: nn.Module, k: int, options: Mapping[str, Any]) -> None:
    """Put the adapters of the largest ``k`` on a copy of ``model`` (then dropped), so that
    a target PEFT cannot adapt (a norm layer, an unsupported type) fails here, not in a
    trial."""
    try:
        with forked():  # the adapters' initialisation draws from the global streams
            add_adapters(copy.deepcopy(model), top=k, **dict(options))
    except NetgraftError:
        raise
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:  # PEFT's own refusals
        raise NetgraftError(
            f"PEFT cannot put LoRA on the top {k} block(s) of {type(model).__name__} with "
            f"budget['lora']={dict(options)!r}: {type(exc).__name__}: {exc}"
        ) from None


def _check_targets(model: nn.Module, k: int, options: Mapping[str, Any]) -> None:
    """Refuse options PEFT rejects and targets matching no module of the top ``k`` blocks."""
    try:
        config = lora_config(model, k, dict(options))
    except NetgraftError as exc:
        if options.get("target_modules") is not None:
            raise
        raise NetgraftError(
            f"{exc}; in a study: budget={{'lora': {{'target_modules': [...]}}, ...}}"
        ) from None
    except (TypeError, ValueError) as exc:  # LoraConfig's own checks
        raise NetgraftError(f"budget['lora'] is not a valid LoRA config: {exc}") from None
    if not adapter_targets(model, config):
        raise NetgraftError(
            f"mode 'lora' finds nothing to adapt in the top {k} block(s) of "
            f"{type(model).__name__} (target_modules={sorted(config.target_modules or [])!r}); "
            "name layers PEFT can adapt (Linear, Conv, Embedding) in budget['lora']"
            "['target_modules']"
        )


def lora_model(model: nn.Module, k: int, options: Mapping[str, Any], seed: int) -> nn.Module:
    """The PEFT model of ``model`` (changed in place by PEFT: pass a copy) with LoRA on its
    top ``k`` blocks (:func:`netgraft.add_adapters` ``top=k`` with ``options``; its heads as
    ``modules_to_save``), the adapters initialised from ``seed`` with the global random
    streams left as they were; only PEFT's own trainable set trains."""
    with forked():
        seed_everything(seed)
        return add_adapters(model, top=k, **dict(options))
