"""One selector grammar for every operation that picks modules.

``select(model, selector)`` turns a selector into the dotted names of the chosen
*layers* (modules owning parameters or buffers directly), in layer-table order,
so a user can dry-run any operation. Operations act on those layers.

Grammar (design.md):

- exact dotted name ``features.3`` — the module and every layer inside it
- glob ``layer1.*``, ``*.bn*`` — any module whose name matches (``*`` crosses dots)
- regex, always marked ``re:hidden[123]`` — full match of module names
- type ``type:BatchNorm2d`` (class name, also of a base class) or a class object
- ranges over layers in execution order with Python slice meaning; bounds are names,
  indices (negative allowed) or percents: ``:layer3``, ``layer3:``, ``:-1``, ``2:5``,
  ``:70%``; ``block:`` ranges over blocks (``block::2``, ``block:layer2:``, ``block:-1``)
- on a PEFT model, ``adapter:NAME`` (a glob over adapter names; ``adapter:*`` for all)
  picks the adapter modules and ``modules_to_save`` copies of those adapters, and a name
  or glob may also be written relative to the base model (``bert.encoder.layer.5``)
- a list is a union; an item starting with ``~`` removes what it matches

A selector (or list item) that matches nothing raises :class:`SelectionError` naming the
closest existing names and how to list them all. This module never changes the model.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .adapted import adapter_layers, peft_base
from .errors import SelectionError, closest
from .layers import blocks as _blocks
from .layers import display_name, layers

__all__ = ["Selector", "outermost", "resolve_module", "select", "select_modules"]

Selector = str | type | Sequence[str | type] | None

_HOW_TO_LIST = "list them all with netgraft.layers(model) or `netgraft inspect SPEC`"


def _fail(item: str, found: str, candidates: Iterable[str]) -> SelectionError:
    hint = ", ".join(repr(c) for c in closest(item, candidates, always=True))
    suggestion = f"; closest: {hint}" if hint else ""
    return SelectionError(f"selector {item!r} {found}{suggestion} ({_HOW_TO_LIST})")


def _type_matches(module: nn.Module, wanted: str | type) -> bool:
    if isinstance(wanted, type):
        return isinstance(module, wanted)
    return any(cls.__name__ == wanted for cls in type(module).__mro__)


class _Context:
    """What one selection needs: the layer order, module names and blocks, computed once."""

    def __init__(self, model: nn.Module, example_input: Any = None):
        self.model = model
        self.table = layers(model, example_input)
        self.layer_names = self.table.names
        self.position = {n: i for i, n in enumerate(self.layer_names)}
        self.modules = dict(model.named_modules())
        self._blocks = None

    @property
    def blocks(self):
        if self._blocks is None:
            self._blocks = _blocks(self.model)
        return self._blocks

    def layers_in(self, module_name: str) -> list[str]:
        if module_name == "":
            return list(self.layer_names)
        prefix = module_name + "."
        return [n for n in self.layer_names if n == module_name or n.startswith(prefix)]

    def block_layers(self, block) -> set[str]:
        return self.layers_in_all(block.modules) | {o for o in block.owners if o in self.position}

    def layers_in_all(self, module_names: Iterable[str]) -> set[str]:
        out: set[str] = set()
        for name in module_names:
            out.update(self.layers_in(name))
        return out


def _bound_to_index(ctx: _Context, item: str, bound: str, n: int, *, units: str) -> int:
    bound = bound.strip()
    if re.fullmatch(r"[+-]?\d+", bound):
        return int(bound)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", bound)
    if m:
        return round(float(m.group(1)) / 100.0 * n)
    if units == "block":
        names = [b.name for b in ctx.blocks]
        if bound in names:
            return names.index(bound)
        for b in ctx.blocks:  # a module inside a block names that block
            if any(bound == mod or bound.startswith(mod + ".") for mod in b.modules):
                return b.index
        raise _fail(item, f"names no block {bound!r}", names)
    if bound not in ctx.modules:
        raise _fail(item, f"names no module {bound!r}", ctx.modules)
    inside = ctx.layers_in(bound)
    if not inside:
        raise SelectionError(
            f"selector {item!r}: module {bound!r} holds no layers, so it has no place in the "
            f"layer order ({_HOW_TO_LIST})"
        )
    return min(ctx.position[x] for x in inside)


def _slice(ctx: _Context, item: str, text: str, *, units: str) -> list[str]:
    parts = text.split(":")
    if len(parts) != 2:
        raise SelectionError(
            f"selector {item!r} is not a range: expected 'start:stop' with names, indices or "
            f"percents (e.g. ':layer3', '2:5', ':70%')"
        )
    n = len(ctx.blocks) if units == "block" else len(ctx.layer_names)
    start = _bound_to_index(ctx, item, parts[0], n, units=units) if parts[0].strip() else None
    stop = _bound_to_index(ctx, item, parts[1], n, units=units) if parts[1].strip() else None
    if units == "block":
        chosen = ctx.blocks[slice(start, stop)]
        return sorted(
            set().union(*(ctx.block_layers(b) for b in chosen)) if chosen else set(),
            key=ctx.position.get,
        )
    return ctx.layer_names[slice(start, stop)]


def _single_block(ctx: _Context, item: str, text: str) -> list[str]:
    names = [b.name for b in ctx.blocks]
    if re.fullmatch(r"[+-]?\d+", text):
        i = int(text)
        if not -len(names) <= i < len(names):
            raise SelectionError(
                f"selector {item!r}: block index {i} is out of range; the model has "
                f"{len(names)} blocks ({', '.join(names)})"
            )
        block = ctx.blocks[i]
    elif text in names:
        block = ctx.blocks[names.index(text)]
    else:
        raise _fail(item, f"names no block {text!r} (blocks: {', '.join(names)})", names)
    return sorted(ctx.block_layers(block), key=ctx.position.get)


def _match_class(ctx: _Context, item: type) -> tuple[list[str], list[str]]:
    mods = [n for n, m in ctx.modules.items() if isinstance(m, item)]
    if not mods:
        raise SelectionError(
            f"selector {item.__name__!r} (a class) matches no module; types present: "
            f"{_present_types(ctx)}"
        )
    return sorted(ctx.layers_in_all(mods), key=ctx.position.get), mods


def _match_item(ctx: _Context, item: str | type) -> tuple[list[str], list[str]]:
    """Return (layer names, module names) matched by one selector item."""
    if isinstance(item, type):
        return _match_class(ctx, item)
    if not isinstance(item, str):
        raise SelectionError(
            f"a selector item must be a string or a class, found {type(item).__name__}"
        )
    text = item.strip()
    if not text:
        raise SelectionError("an empty string is not a selector; use None for the whole model")
    if text.startswith("re:"):
        pattern = text[3:]
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise SelectionError(f"selector {item!r} is not a valid regex: {exc}") from exc
        mods = [n for n in ctx.modules if n and rx.fullmatch(n)]
        if not mods:
            raise _fail(item, "matches no module name (regex, full match)", ctx.modules)
        return sorted(ctx.layers_in_all(mods), key=ctx.position.get), mods
    if text.startswith("type:"):
        wanted = text[5:].strip()
        mods = [n for n, m in ctx.modules.items() if _type_matches(m, wanted)]
        if not mods:
            raise SelectionError(
                f"selector {item!r} matches no module; types present: {_present_types(ctx)}"
            )
        return sorted(ctx.layers_in_all(mods), key=ctx.position.get), mods
    if text.startswith("block:"):
        rest = text[6:]
        if ":" in rest:
            chosen = _slice(ctx, item, rest, units="block")
        else:
            chosen = _single_block(ctx, item, rest.strip())
        if not chosen:
            raise SelectionError(f"selector {item!r} selects no block (the range is empty)")
        return chosen, []
    if text.startswith("adapter:"):
        return _adapter_item(ctx, item, text[8:].strip())
    if ":" in text:
        chosen = _slice(ctx, item, text, units="layer")
        if not chosen:
            raise SelectionError(
                f"selector {item!r} selects no layer: the range is empty among "
                f"{len(ctx.layer_names)} layers"
            )
        return chosen, []
    text = _in_base(ctx, text)
    if any(ch in text for ch in "*?["):
        mods = [n for n in ctx.modules if n and fnmatch.fnmatchcase(n, text)]
        if not mods:
            raise _fail(item, "matches no module name (glob)", ctx.modules)
        return sorted(ctx.layers_in_all(mods), key=ctx.position.get), mods
    if text not in ctx.modules:
        raise _fail(item, "names no module", ctx.modules)
    chosen = ctx.layers_in(text)
    return chosen, [text]


def _adapter_item(ctx: _Context, item: str, pattern: str) -> tuple[list[str], list[str]]:
    """The layers of the adapters whose name matches ``pattern`` (a glob) on a PEFT model."""
    owned = adapter_layers(ctx.model)
    if not owned:
        raise SelectionError(f"selector {item!r}: the model is not a PEFT model with adapters")
    mods = [n for n, adapter in owned.items() if fnmatch.fnmatchcase(adapter, pattern or "*")]
    if not mods:
        raise _fail(item, "names no adapter", sorted(set(owned.values())))
    return sorted(ctx.layers_in_all(mods), key=ctx.position.get), mods


def _in_base(ctx: _Context, text: str) -> str:
    """A name or glob written relative to a PEFT model's base, as the model names it."""
    prefix, _ = peft_base(ctx.model)
    if not prefix or text in ctx.modules or text.startswith(prefix + "."):
        return text
    inner = f"{prefix}.{text}"
    if inner in ctx.modules or any(fnmatch.fnmatchcase(n, inner) for n in ctx.modules):
        return inner
    return text


def _present_types(ctx: _Context) -> str:
    kinds = sorted({type(m).__name__ for m in ctx.modules.values()})
    return ", ".join(kinds[:20]) + (" ..." if len(kinds) > 20 else "")


def _items(selector: Selector) -> list[str | type]:
    if isinstance(selector, (str, type)):
        return [selector]
    items = list(selector)  # type: ignore[arg-type]
    if not items:
        raise SelectionError("an empty selector list selects nothing; use None for the whole model")
    return items


def select(model: nn.Module, selector: Selector, example_input: Any = None) -> list[str]:
    """The dotted names of the layers ``selector`` chooses, in layer-table order.

    ``None`` selects every layer. Ranges follow execution order (traced when
    ``example_input`` is given, or remembered from an earlier trace). Raises
    :class:`SelectionError` if the selector, or any item of a list, matches nothing.
    A module without layers (a ReLU) selected by name yields no layer names; use
    :func:`select_modules` to pick modules themselves.
    """
    ctx = _Context(model, example_input)
    if selector is None:
        return list(ctx.layer_names)
    chosen: set[str] = set()
    removed: set[str] = set()
    positives = 0
    for item in _items(selector):
        negate = isinstance(item, str) and item.strip().startswith("~")
        if negate:
            item = item.strip()[1:]
        names, _ = _match_item(ctx, item)
        if negate:
            removed.update(names)
        else:
            positives += 1
            chosen.update(names)
    if positives == 0:  # only exclusions: everything except them
        chosen = set(ctx.layer_names)
    return [n for n in ctx.layer_names if n in chosen and n not in removed]


def select_modules(model: nn.Module, selector: Selector) -> list[str]:
    """The dotted names of the *modules* a name, glob, regex or type selector matches
    (not expanded to layers), in registration order; ranges give their layers.

    For operations that act on one module as a whole (insert after it, cut there).
    """
    ctx = _Context(model)
    if selector is None:
        return [""]
    chosen: list[str] = []
    removed: set[str] = set()
    for item in _items(selector):
        negate = isinstance(item, str) and item.strip().startswith("~")
        if negate:
            item = item.strip()[1:]
        layer_names, mods = _match_item(ctx, item)
        names = mods or layer_names
        if negate:
            removed.update(names)
        else:
            chosen.extend(n for n in names if n not in chosen)
    order = {n: i for i, n in enumerate(ctx.modules)}
    return sorted((n for n in chosen if n not in removed), key=order.get)


def outermost(names: Iterable[str]) -> list[str]:
    """``names`` without those nested inside another of them (``"a.b"`` goes when ``"a"`` is
    there), in the given order: a module and its children are one choice."""
    names = list(names)
    return [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]


def resolve_module(
    model: nn.Module, selector: Selector, *, what: str = "module"
) -> tuple[str, nn.Module]:
    """Exactly one module chosen by ``selector``: ``(name, module)``. Raises
    :class:`SelectionError` when it matches none or several (listing them)."""
    names = select_modules(model, selector)
    outer = outermost(names)  # a glob like "features.3*" may also match children
    if len(outer) != 1:
        shown = ", ".join(display_name(n) for n in outer[:8])
        raise SelectionError(
            f"{what} selector {selector!r} must pick exactly one module, it picks {len(outer)}: "
            f"{shown}"
        )
    name = outer[0]
    return name, model.get_submodule(name) if name else model
