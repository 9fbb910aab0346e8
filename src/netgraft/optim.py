"""Parameter groups for optimizers: discriminative learning rates over blocks.

:func:`param_groups` turns a model's *trainable* parameters into optimizer groups, one
per block (see :func:`netgraft.blocks`), each named after its block. Learning rates
either spread geometrically from ``lr / lr_mult`` at the first block to ``lr`` at the
last (fastai's ``slice(lr / lr_mult, lr)``), or decay by ``layer_decay`` per block
below the top (timm's layer decay). Biases and normalisation parameters get no weight
decay by default. This module never changes the model or its trainable state.

Example::

    >>> groups = netgraft.param_groups(model, 1e-3, lr_mult=100, weight_decay=0.01)
    >>> opt = torch.optim.AdamW(groups)
    >>> [(g["name"], g["lr"]) for g in opt.param_groups][:2]
    [('features.0', 1e-05), ('features.1', 1.27e-05)]
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import NetgraftError
from .layers import blocks, is_norm

__all__ = ["block_of_parameters", "block_rates", "group_lrs", "param_groups"]


def block_of_parameters(model: nn.Module) -> tuple[list[str], dict[str, int]]:
    """The block names of ``model`` and, for every parameter name, the index of its block."""
    found = blocks(model)
    names = [b.name for b in found]
    owner: dict[str, int] = {}
    prefixes: list[tuple[str, int]] = []
    for b in found:
        for mod in b.owners:
            owner[mod] = b.index
        prefixes.extend((mod, b.index) for mod in b.modules)
    # longest prefix wins, so a module nested in another block's module is placed correctly
    prefixes.sort(key=lambda item: -len(item[0]))
    mapping: dict[str, int] = {}
    for pname, _ in model.named_parameters():
        module_name = pname.rpartition(".")[0]
        if module_name in owner:
            mapping[pname] = owner[module_name]
            continue
        index = next(
            (i for prefix, i in prefixes if prefix == "" or pname.startswith(prefix + ".")),
            len(names) - 1,
        )
        mapping[pname] = index
    return names, mapping


def block_rates(
    n_blocks: int, lr: float, *, lr_mult: float | None = None, layer_decay: float | None = None
) -> list[float]:
    """Learning rate of each of ``n_blocks`` blocks: geometric from ``lr / lr_mult`` to ``lr``,
    or ``lr * layer_decay ** (depth below the top)``, or ``lr`` everywhere."""
    if lr_mult is not None and layer_decay is not None:
        raise NetgraftError("give lr_mult or layer_decay, not both")
    if lr_mult is not None:
        if lr_mult < 1:
            raise NetgraftError(f"lr_mult must be >= 1 (lowest rate lr / lr_mult); found {lr_mult}")
        if n_blocks == 1:
            return [lr]
        return [lr / lr_mult ** ((n_blocks - 1 - i) / (n_blocks - 1)) for i in range(n_blocks)]
    if layer_decay is not None:
        if not 0 < layer_decay <= 1:
            raise NetgraftError(f"layer_decay must be in (0, 1]; found {layer_decay}")
        return [lr * layer_decay ** (n_blocks - 1 - i) for i in range(n_blocks)]
    return [lr] * n_blocks


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for mname, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if is_norm(module) or p.ndim <= 1 or pname.endswith("bias"):
                names.add(full)
    return names


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    lr_mult: float | None = None,
    layer_decay: float | None = None,
    weight_decay: float = 0.0,
    no_decay_norm_bias: bool = True,
    include_frozen: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for the trainable parameters of ``model``, one per block.

    Each group has ``params``, ``lr``, ``weight_decay`` and ``name`` (its block, with
    `` (no decay)`` for the biases and norm parameters that get no weight decay when
    ``no_decay_norm_bias``). Rates follow :func:`block_rates` over *all* blocks, so a
    block keeps its rate whether or not the blocks below it are trainable. Raises
    :class:`NetgraftError` when nothing is trainable. ``include_frozen`` puts the frozen
    parameters in their block's group too, for a trainer that unfreezes them later
    (optimizers skip a parameter without a gradient, so a frozen one is never updated).
    """
    names, mapping = block_of_parameters(model)
    rates = block_rates(len(names), lr, lr_mult=lr_mult, layer_decay=layer_decay)
    skip_decay = _no_decay_names(model) if (no_decay_norm_bias and weight_decay) else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for pname, p in model.named_parameters():
        if not (p.requires_grad or include_frozen):
            continue
        index = mapping[pname]
        decay = pname not in skip_decay
        key = (index, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": rates[index],
                "weight_decay": weight_decay if decay else 0.0,
                "name": names[index] if decay or not weight_decay else f"{names[index]} (no decay)",
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(pname)
    if not groups:
        raise NetgraftError(
            f"{type(model).__name__} has no trainable parameters; unfreeze some layers first "
            "(netgraft.unfreeze or netgraft.train_only)"
        )
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def group_lrs(optimizer: Any) -> dict[str, float]:
    """The current learning rate of every group of ``optimizer``, by group name (``group{i}``
    for groups without one)."""
    out: dict[str, float] = {}
    for i, group in enumerate(optimizer.param_groups):
        out[str(group.get("name", f"group{i}"))] = float(group["lr"])
    return out
