"""The layer table and blocks: what is inside a model, in the order it runs.

A *layer* is a module that owns parameters or buffers directly (Linear, Conv,
BatchNorm, Embedding, LayerNorm, a ViT's root holding ``pos_embed``, ...),
named by its dotted path. :func:`layers` lists them in forward-execution order
when an example input is given (forward hooks record the first call of every
module), otherwise in registration order. The traced order is remembered on the
model, so later calls without an input (and every selector) reuse it as long as
the set of modules has not changed.

A *block* is a coarse unit for "how many to reuse" questions: the children of
the model's main stack (``stem, layer1 ... layer4, fc`` for a ResNet;
``features.0 ... features.18, classifier`` for MobileNetV2; the encoder layers
of a BERT). This module never changes the model, except to remember the order.

Example::

    >>> import torch, torchvision, netgraft
    >>> m = torchvision.models.resnet18()
    >>> table = netgraft.summary(m, torch.randn(1, 3, 224, 224))
    >>> [b.name for b in netgraft.blocks(m)]
    ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from . import marks
from .adapted import peft_base
from .deprecation import legacy
from .errors import NetgraftError

__all__ = [
    "Block",
    "Layer",
    "LayerTable",
    "blocks",
    "device_of",
    "display_name",
    "evaluating",
    "head_block_index",
    "is_norm",
    "layers",
    "probe",
    "summary",
    "trace_order",
]

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers: BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm
    and library subclasses or look-alikes (``LlamaRMSNorm``, timm ``LayerNorm2d``)."""
    if isinstance(module, _NORM_TYPES):
        return True
    name = type(module).__name__
    return name.endswith(("Norm", "Norm1d", "Norm2d", "Norm3d")) and _owns_tensors(module)


def _owns_tensors(module: nn.Module) -> bool:
    return bool(module._parameters) or any(b is not None for b in module._buffers.values())


def display_name(name: str) -> str:
    """How a dotted module name is shown to people (the root is ``<root>``)."""
    return name if name else "<root>"


@dataclass
class Layer:
    """One row of the layer table."""

    index: int
    name: str
    type: str
    params: int
    trainable_params: int
    trainable: bool | str  # True, False or "Partial"; True for a layer without parameters
    norm_mode: str | None
    output_shape: tuple[int, ...] | None = None
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The row as plain JSON-ready data (without the module)."""
        return {
            "index": self.index,
            "name": self.name,
            "type": self.type,
            "output_shape": list(self.output_shape) if self.output_shape is not None else None,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "trainable": self.trainable,
            "norm_mode": self.norm_mode,
        }


class LayerTable(list):
    """A list of :class:`Layer` rows, with totals and JSON/rich output."""

    @property
    def names(self) -> list[str]:
        return [row.name for row in self]

    @property
    def total_params(self) -> int:
        return sum(row.params for row in self)

    @property
    def trainable_params(self) -> int:
        return sum(row.trainable_params for row in self)

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    def to_dict(self) -> dict[str, Any]:
        """Rows and totals as plain JSON-ready data."""
        return {
            "layers": [row.to_dict() for row in self],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
        }

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as a JSON string (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    def rich_table(self, title: str | None = None) -> Table:
        """The table as a ``rich.table.Table`` with totals in its caption."""
        table = Table(title=title, show_lines=False)
        for col, justify in [
            ("#", "right"),
            ("name", "left"),
            ("type", "left"),
            ("output shape", "left"),
            ("params", "right"),
            ("trainable", "left"),
            ("norm mode", "left"),
        ]:
            table.add_column(col, justify=justify)
        for row in self:
            shape = "" if row.output_shape is None else "×".join(str(d) for d in row.output_shape)
            table.add_row(
                str(row.index),
                display_name(row.name),
                row.type,
                shape,
                f"{row.params:,}",
                str(row.trainable),
                row.norm_mode or "",
            )
        table.caption = (
            f"{len(self)} layers · {self.total_params:,} parameters · "
            f"{self.trainable_params:,} trainable · {self.frozen_params:,} frozen"
        )
        return table


def _layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if _owns_tensors(m)]


def _module_key(model: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, _ in model.named_modules())


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        for item in output.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    if hasattr(output, "to_tuple"):  # Hugging Face ModelOutput
        return _first_tensor(output.to_tuple())
    return None


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Run ``model`` on an example input given as a tensor, a tuple of positional
    arguments or a dict of keyword arguments."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block, then give every module of ``model`` back its own train/eval flag (frozen
    norm layers' included), even when the block raised: the one place netgraft saves and
    restores training modes."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with every module of ``model`` in eval mode and without gradients, then give
    each module back its own train/eval flag (:func:`modes_kept`)."""
    with modes_kept(model):
        model.eval()
        with torch.no_grad():
            yield model


def probe(
    model: nn.Module,
    example_input: Any,
    *,
    purpose: str = "probe it",
    hooks: Iterable[tuple[nn.Module, Callable[..., Any]]] = (),
) -> Any:
    """One forward pass under :func:`evaluating`, with the given ``(module, forward hook)``
    pairs registered for that pass only; a failure is a :class:`NetgraftError` saying what
    the pass was for."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with evaluating(model):
            return call_model(model, example_input)
    except NetgraftError:
        raise
    except Exception as exc:
        raise NetgraftError(
            f"could not run the model on the example input to {purpose}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()


def trace_order(model: nn.Module, example_input: Any) -> tuple[list[str], dict[str, tuple]]:
    """Run one forward pass (no gradients, modes restored) and return the module names in
    the order they were first called, and the output shape of each module's first call.

    The order is also remembered on the model for later calls without an input.
    """
    order: list[str] = []
    shapes: dict[str, tuple] = {}

    def make_hook(name: str):
        def hook(_mod, _inp, out):
            if name not in shapes:
                order.append(name)
                t = _first_tensor(out)
                shapes[name] = tuple(t.shape) if t is not None else None

        return hook

    probe(
        model,
        example_input,
        purpose="trace its layers",
        hooks=[(mod, make_hook(name)) for name, mod in model.named_modules()],
    )
    marks.LAYER_ORDER.set(model, (_module_key(model), list(order)))
    return order, shapes


def _remembered_order(model: nn.Module) -> list[str] | None:
    saved = marks.LAYER_ORDER.get(model)
    if saved is None:
        return None
    key, order = saved
    return order if key == _module_key(model) else None


def ordered_layer_modules(
    model: nn.Module, example_input: Any = None
) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` as ``(name, module)`` pairs in execution order (traced now when
    an input is given, remembered from an earlier trace, else registration order)."""
    return [(row.name, row.module) for row in layers(model, example_input)]


def _norm_mode(module: nn.Module) -> str | None:
    if not is_norm(module):
        return None
    mode = "train" if module.training else "eval"
    policy = marks.NORM_POLICY.get(module)
    return f"{mode} (frozen: {policy})" if policy else mode


def layers(model: nn.Module, example_input: Any = None) -> LayerTable:
    """The layer table of ``model``: every module owning parameters or buffers directly, with
    type, parameter count, output shape (when traced), trainable state and norm mode.

    With ``example_input`` (a tensor, tuple of arguments or dict of keyword arguments) the
    rows are in forward-execution order and carry output shapes; modules the forward never
    calls come last. Without it, a previously traced order is reused, else registration
    order. The model's train/eval modes are left as they were.
    """
    found = _layer_modules(model)
    shapes: dict[str, tuple] = {}
    if example_input is not None:
        order, shapes = trace_order(model, example_input)
    else:
        order = _remembered_order(model) or []
    position = {name: i for i, name in enumerate(order)}
    registration = {name: i for i, (name, _) in enumerate(found)}
    found.sort(key=lambda nm: (nm[0] not in position, position.get(nm[0], registration[nm[0]])))
    table = LayerTable()
    for i, (name, mod) in enumerate(found):
        own = list(mod._parameters.values())
        own = [p for p in own if p is not None]
        n_params = sum(p.numel() for p in own)
        n_train = sum(p.numel() for p in own if p.requires_grad)
        if not own or n_train == n_params:
            trainable: bool | str = True
        elif n_train == 0:
            trainable = False
        else:
            trainable = "Partial"
        table.append(
            Layer(
                index=i,
                name=name,
                type=type(mod).__name__,
                params=n_params,
                trainable_params=n_train,
                trainable=trainable,
                norm_mode=_norm_mode(mod),
                output_shape=shapes.get(name),
                module=mod,
            )
        )
    return table


@legacy(print_table="netgraft.layers(model) (the table without printing)")
def summary(model: nn.Module, example_input: Any = None, **legacy_kwargs: Any) -> LayerTable:
    """Print the layer table (rich) and return it; see :func:`layers` for its semantics
    (:func:`layers` returns the same table without printing it)."""
    table = layers(model, example_input)
    if legacy_kwargs.get("print_table", True):
        Console().print(table.rich_table(title=type(model).__name__))
    return table


@dataclass
class Block:
    """A coarse unit of the model: a name and the dotted names of the modules it groups."""

    index: int
    name: str
    modules: list[str]
    params: int
    # modules whose *own* tensors (not their children) belong here: the root of a timm ViT
    # or torchvision's ViT encoder own the position embedding, placed in the first block
    owners: list[str] = field(default_factory=list)

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers this block holds (its modules' layers and its owners)."""
        return self.owners + [n for n in self.modules]

    def to_dict(self) -> dict[str, Any]:
        """The block as plain JSON-ready data."""
        return {
            "index": self.index,
            "name": self.name,
            "modules": self.modules,
            "owners": self.owners,
            "params": self.params,
        }


_STACKS = (nn.Sequential, nn.ModuleList)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _units(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], int | None]:
    """The children of the main stack, in order, with what comes before and after it.

    Descends into the single dominant stack (a Sequential/ModuleList with at least four
    children and at least twice as many as any sibling stack), also through wrappers that
    hold one such stack (BertEncoder -> layer); stops where stages are peers (ResNet).
    """
    units: list[tuple[str, nn.Module]] = [(n, m) for n, m in model.named_children()]
    if not units:
        return [("", model)], None
    stack_start = None
    for _ in range(1):  # one level: stages inside the main stack stay whole (ConvNeXt)
        stacks = [(i, n, m) for i, (n, m) in enumerate(units) if _stack_of(m) is not None]
        if not stacks:
            break
        sizes = [(len(_stack_of(m)[1]), i, n, m) for i, n, m in stacks]
        sizes.sort(key=lambda s: -s[0])
        best = sizes[0]
        runner_up = sizes[1][0] if len(sizes) > 1 else 0
        if best[0] < 4 or best[0] < 2 * runner_up:
            break
        _, i, name, mod = best
        inner_path, stack = _stack_of(mod)
        prefix = _join(name, inner_path) if inner_path else name
        before, after = _wrapper_siblings(name, mod, inner_path)
        replacement = before + [(_join(prefix, n), m) for n, m in stack.named_children()] + after
        units = units[:i] + replacement + units[i + 1 :]
        stack_start = i + len(before)
    return units, stack_start


def _stack_of(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The stack inside ``module``: itself, or one reached through wrappers whose other
    children hold no more than a small share of parameters (an embedding dropout, a final
    norm)."""
    path = ""
    node = module
    for _ in range(4):
        if isinstance(node, _STACKS) and len(node) >= 2:
            return path, node
        kids = [(n, m) for n, m in node.named_children() if isinstance(m, _STACKS) and len(m) >= 2]
        if len(kids) != 1:
            return None
        name, kid = kids[0]
        total = _n_params(node)
        if total and _n_params(kid) < 0.5 * total:
            return None
        path = _join(path, name)
        node = kid
    return None


def _wrapper_siblings(name: str, wrapper: nn.Module, inner_path: str):
    """Children of the wrappers between ``wrapper`` and its inner stack, split into those
    registered before and after the path to the stack."""
    before: list[tuple[str, nn.Module]] = []
    after: list[tuple[str, nn.Module]] = []
    if not inner_path:
        return before, after
    node, prefix = wrapper, name
    for part in inner_path.split("."):
        seen = False
        for n, m in node.named_children():
            if n == part:
                seen = True
                continue
            (after if seen else before).append((_join(prefix, n), m))
        node, prefix = getattr(node, part), _join(prefix, part)
    return before, after


def _backbone(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The one child of a task wrapper that holds its backbone, or None.

    A wrapper's children are one backbone plus at most two heads (Hugging Face
    ``BertForSequenceClassification`` -> ``bert``, ``classifier``; netgraft's
    :class:`~netgraft.heads.Stacked` -> ``base``, ``top``; a user's module around a timm
    model). The backbone holds more than half of the parameters (tied head weights count
    once), is a container, and has at least three blocks of its own.
    """
    kids = [(n, m) for n, m in model.named_children() if _has_tensors(m)]
    if len(kids) < 2 or len(kids) > 3 or _owns_tensors(model):
        return None
    name, kid = max(kids, key=lambda k: _n_params(k[1]))
    total = _n_params(model)
    if not total or _n_params(kid) <= 0.5 * total:
        return None
    if not any(_has_tensors(c) for c in kid.children()) or len(blocks(kid)) < 3:
        return None
    return name, kid


def _prefixed(block: Block, prefix: str, index: int) -> Block:
    return Block(
        index=index,
        name=_join(prefix, block.name) if block.name != "stem" else _join(prefix, "stem"),
        modules=[_join(prefix, n) for n in block.modules],
        params=block.params,
        owners=[_join(prefix, n) for n in block.owners],
    )


def _wrapper_blocks(model: nn.Module, name: str, backbone: nn.Module) -> list[Block]:
    """Blocks of a task wrapper: its other children with tensors as their own blocks around
    the backbone's blocks (prefixed with the backbone's name); children without tensors
    (dropout) join the block before them."""
    result: list[Block] = []
    for n, m in model.named_children():
        if n == name:
            result += [_prefixed(b, name, len(result) + i) for i, b in enumerate(blocks(m))]
        elif _has_tensors(m) or not result:
            result.append(Block(len(result), n, [n], _unique_params(m, backbone)))
        else:
            result[-1].modules.append(n)
    return result


def _unique_params(module: nn.Module, backbone: nn.Module) -> int:
    """Parameters of ``module`` not shared with ``backbone`` (a tied LM head counts 0)."""
    shared = {id(p) for p in backbone.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in shared)


def blocks(model: nn.Module) -> list[Block]:
    """The coarse units of ``model`` in order: the children of its main stack, with the
    modules before and after it.

    For an ``nn.Sequential`` these are its children; for a ResNet ``stem`` (the leading
    layers grouped), ``layer1`` ... ``layer4`` and ``fc``. Units without parameters (ReLU,
    pooling) are merged into the block before them. Every block has parameters.

    Task wrappers are seen through: a model whose children are one backbone plus heads
    (a Hugging Face ``*ForSequenceClassification``, ``*ForCausalLM``,
    ``*ForImageClassification``, the model :func:`~netgraft.attach` returns, a timm model
    inside a user's module) has the backbone's blocks, then the heads. MiniLM loaded as a
    sequence classifier gives ``bert.embeddings``, ``bert.encoder.layer.0`` ... ``5``,
    ``bert.pooler``, ``classifier``.

    For a PEFT model these are the blocks of its base model (named as there, holding the
    full dotted names of their modules), each adapter counted in the block it sits in.
    """
    prefix, base = peft_base(model)
    if prefix:
        return [_under(b, prefix) for b in blocks(base)]
    units, stack_start = _units(model)
    inner = _backbone(model) if stack_start is None else None
    if inner is not None:
        return _wrapper_blocks(model, *inner)
    groups = _groups(units, stack_start)
    covered = [n for _, members in groups for n, _ in members]
    owners = [
        (n, m)
        for n, m in model.named_modules()
        if _owns_tensors(m) and not any(n == c or n.startswith(c + ".") for c in covered if c)
    ]
    result = []
    for name, members in groups:
        extra = owners if not result else []
        result.append(
            Block(
                index=len(result),
                name=name,
                modules=[n for n, _ in members],
                params=sum(_n_params(m) for _, m in members)
                + sum(p.numel() for _, m in extra for p in m._parameters.values() if p is not None),
                owners=[n for n, _ in extra],
            )
        )
    return result


def _groups(
    units: list[tuple[str, nn.Module]], stack_start: int | None
) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """The named groups of ``units`` that :func:`blocks` makes blocks of: a stem of the
    leading individual layers, units without tensors merged into the group before them."""
    # leading individual layers before the main stack (or the first container) form the stem
    first_container = stack_start
    if first_container is None:
        first_container = next(
            (i for i, (_, m) in enumerate(units) if any(_has_tensors(c) for c in m.children())),
            None,
        )
    groups: list[tuple[str, list[tuple[str, nn.Module]]]] = []
    if first_container is not None and first_container >= 2:
        lead = units[:first_container]
        if sum(1 for _, m in lead if _has_tensors(m)) >= 2:
            groups.append(("stem", lead))
            units = units[first_container:]
    for n, m in units:
        if not _has_tensors(m) and groups:
            groups[-1][1].append((n, m))
        else:
            groups.append((n, [(n, m)]))
    # a leading group without tensors joins the next one
    if len(groups) > 1 and not any(_has_tensors(m) for _, m in groups[0][1]):
        head = groups.pop(0)
        groups[0] = (groups[0][0], head[1] + groups[0][1])
    return groups


def _under(block: Block, prefix: str) -> Block:
    """``block`` of a wrapped model, its modules named from the wrapper (``prefix.NAME``)."""
    return Block(
        index=block.index,
        name=block.name,
        modules=[_join(prefix, n) for n in block.modules],
        params=block.params,
        owners=[_join(prefix, n) for n in block.owners],
    )


def head_block_index(units: Sequence[Sequence[str]], head: str) -> int:
    """Index of the first unit holding the head: a unit is a list of module names (a
    block's :attr:`Block.layer_names`, or one layer's name) and holds the head when one of
    its names is ``head``, lies inside it or contains it. The last unit when none does."""
    for i, names in enumerate(units):
        if any(head == n or head.startswith(n + ".") or n.startswith(head + ".") for n in names):
            return i
    return len(units) - 1
