"""Split a model into a prefix and a suffix at one module: ``suffix(prefix(x)) == model(x)``.

The prefix ends with the output of the module named by ``after``; the suffix takes exactly
that one tensor. A frozen prefix is what :class:`netgraft.FeatureCache` computes once and
stores, and :func:`netgraft.truncate` keeps only the prefix.

- A plain ``nn.Sequential`` (also nested ones) is split by slicing, keeping child names.
- Any other model is traced with ``torch.fx``; the cut module is kept as one call (a leaf),
  and the graph is split after it. Optional forward arguments keep their defaults (the
  halves take one input each). Where more than that one value would have to cross the
  cut (a skip connection around it, a model input or an attention mask used later) or the
  forward cannot be traced, :class:`SurgeryError` says so rather than cutting wrongly.
- A forward fx cannot trace (Hugging Face models, timm models with value-dependent
  control flow) is cut by substitution when an example input is given
  (:mod:`netgraft.substitute`), checked on that input.
- torch.fx reads ``self.training`` once, while tracing, and would bake it into the code
  (``F.dropout(x, p, training=True)`` for good). The forward is traced in training and in
  evaluation mode, and a flag that differs between the two becomes the half's own live
  ``self.training``, so both halves follow ``.train()``/``.eval()`` as the model does. A
  forward that takes a different *path* in the two modes (``if self.training: ...``) is
  treated as untraceable (cut by substitution, or :class:`SurgeryError`).

Both halves hold the *original* parameter and buffer objects (never copies), under their
original dotted names, so freezing or caching the prefix refers to the real weights.
This module never changes the model it cuts.

Example::

    >>> import torch, torchvision, netgraft
    >>> m = torchvision.models.resnet18().eval()
    >>> prefix, suffix = netgraft.cut(m, after="layer3")
    >>> x = torch.randn(2, 3, 64, 64)
    >>> torch.equal(suffix(prefix(x)), m(x))
    True
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from . import marks
from .deprecation import legacy
from .errors import SurgeryError
from .layers import display_name
from .select import Selector, resolve_module
from .substitute import cut_by_substitution

__all__ = ["cut", "cut_point"]


def cut_point(module: nn.Module) -> str | None:
    """The dotted name of the module a prefix or suffix was cut at (``None`` if not a cut)."""
    return marks.CUT_AT.get(module)


@legacy(at="after")
def cut(
    model: nn.Module, after: Selector, *, example_input: Any = None
) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` after the module ``after`` picks (exactly one): returns ``(prefix,
    suffix)`` with ``suffix(prefix(x))`` equal to ``model(x)`` and ``prefix(x)`` the output of
    that module. Both share the model's own parameters. Raises :class:`SurgeryError` where
    more than one tensor would cross the cut or the model cannot be traced.

    Where torch.fx cannot trace the forward and ``example_input`` is given, the model is cut
    by substitution instead (:mod:`netgraft.substitute`): ``prefix(x)`` is then the pair
    ``(inputs, output of the module)`` and the cut is checked on ``example_input``."""
    name, _ = resolve_module(model, after, what="cut point")
    if not name:
        raise SurgeryError(
            "cannot cut at the model itself: name a module inside it (e.g. a block; "
            "`netgraft inspect SPEC --blocks` lists them)"
        )
    halves = _split_sequential(model, name.split("."))
    if halves is None:
        try:
            halves = _split_fx(model, name)
        except _Untraceable:
            if example_input is None:
                raise
            halves = cut_by_substitution(model, name, example_input)
    for half in halves:
        marks.CUT_AT.set(half, name)
    return halves


def _split_sequential(model: nn.Module, path: list[str]) -> tuple[nn.Module, nn.Module] | None:
    """Slice plain Sequentials along ``path``; ``None`` when some container on it is not one."""
    if type(model) is not nn.Sequential:
        return None
    items = list(model._modules.items())
    keys = [k for k, _ in items]
    index = keys.index(path[0])
    if len(path) == 1:
        return nn.Sequential(OrderedDict(items[: index + 1])), nn.Sequential(
            OrderedDict(items[index + 1 :])
        )
    inner = _split_sequential(items[index][1], path[1:])
    if inner is None:
        return None
    head, tail = inner
    prefix = nn.Sequential(OrderedDict([*items[:index], (path[0], head)]))
    suffix = nn.Sequential(OrderedDict([(path[0], tail), *items[index + 1 :]]))
    return prefix, suffix


class _CutTracer(torch.fx.Tracer):
    """Traces through every ancestor of the cut module and keeps the cut module as one call."""

    def __init__(self, cut_name: str):
        super().__init__()
        self.cut_name = cut_name

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == self.cut_name:
            return True
        if module_qualified_name == "" or self.cut_name.startswith(module_qualified_name + "."):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _concrete_args(model: nn.Module) -> dict[str, Any]:
    """Optional arguments are fixed to their defaults: a cut takes one input, and a Proxy for
    ``attn_mask=None`` or ``inputs_embeds=None`` would take the wrong branch of the forward."""
    params = list(inspect.signature(model.forward).parameters.items())
    main = getattr(model, "main_input_name", None) or (params[0][0] if params else None)
    concrete = {}
    for pname, param in params:
        if param.kind is param.VAR_KEYWORD:  # fx's own name for the **kwargs placeholder
            concrete["**" + pname] = {}
        if pname == main or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is not inspect.Parameter.empty:
            concrete[pname] = param.default
    return concrete


def _trace(model: nn.Module, name: str) -> torch.fx.Graph:
    tracer = _CutTracer(name)
    try:
        return tracer.trace(model, concrete_args=_concrete_args(model))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        why = (
            "Hugging Face models build their attention masks in Python and this transformers "
            "has no fx tracer (transformers.utils.fx)"
            if hasattr(model, "config") and hasattr(model, "main_input_name")
            else "models with data-dependent control flow can only be cut inside nn.Sequential"
        )
        raise _Untraceable(
            f"cannot cut {type(model).__name__} at {name!r}: its forward cannot be traced with "
            f"torch.fx ({type(exc).__name__}: {first[:200]}); {why} (pass example_input= to "
            "cut by substitution instead)"
        ) from exc


class _Untraceable(SurgeryError):
    """torch.fx could not trace the forward (a cut by substitution may still work)."""


class _ModeDependent(_Untraceable):
    """The forward takes a different path in training than in evaluation."""


def _trace_both_modes(model: nn.Module, name: str) -> torch.fx.Graph:
    """One graph that computes what the forward computes in either mode: traced after
    ``model.train()`` and after ``model.eval()`` (every module's own flag restored after),
    with each constant that is ``True`` in training and ``False`` in evaluation replaced by
    a read of ``self.training``."""
    modes = {n: m.training for n, m in model.named_modules()}
    try:
        model.train()
        trained = _trace(model, name)
        model.eval()
        evaluated = _trace(model, name)
    finally:
        for n, m in model.named_modules():
            if n in modes:
                m.training = modes[n]
    return _merge_modes(model, name, trained, evaluated)


def _merge_modes(
    model: nn.Module, name: str, trained: torch.fx.Graph, evaluated: torch.fx.Graph
) -> torch.fx.Graph:
    nodes, others = list(trained.nodes), list(evaluated.nodes)
    same = len(nodes) == len(others) and all(
        a.op == b.op and a.target == b.target for a, b in zip(nodes, others, strict=True)
    )
    twin = dict(zip(others, nodes, strict=False))
    merged: list[tuple[torch.fx.Node, Any, Any]] = []
    try:
        if not same:
            raise _ModeDependent
        for a, b in zip(nodes, others, strict=True):
            args, kwargs = (
                _merge_value(x, y, twin) for x, y in ((a.args, b.args), (a.kwargs, b.kwargs))
            )
            merged.append((a, args, kwargs))
    except _ModeDependent:
        raise _ModeDependent(
            f"cannot cut {type(model).__name__} at {name!r} with torch.fx: its forward takes a "
            "different path in training than in evaluation (it branches on self.training), "
            "which a traced graph cannot follow (pass example_input= to cut by substitution)"
        ) from None
    flag = None
    for node, args, kwargs in merged:
        if _reads_mode(args) or _reads_mode(kwargs):
            if flag is None:
                first = next(n for n in nodes if n.op != "placeholder")
                with trained.inserting_before(first):
                    flag = trained.get_attr("training")
            node.args = torch.fx.node.map_aggregate(args, lambda v, f=flag: f if v is _MODE else v)
            node.kwargs = torch.fx.node.map_aggregate(
                kwargs, lambda v, f=flag: f if v is _MODE else v
            )
    return trained


_MODE = object()  # stands for "self.training" while two traces are merged


def _merge_value(a: Any, b: Any, twin: dict[torch.fx.Node, torch.fx.Node]) -> Any:
    """``a`` (from the training trace) where it equals ``b`` (from the evaluation trace),
    ``_MODE`` where it is ``True`` against ``False``; raises ``_ModeDependent`` otherwise."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and twin.get(b) is a:
            return a
        raise _ModeDependent
    if isinstance(a, slice) and isinstance(b, slice):
        return slice(*_merge_value((a.start, a.stop, a.step), (b.start, b.stop, b.step), twin))
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        items = [_merge_value(x, y, twin) for x, y in zip(a, b, strict=True)]
        return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _merge_value(a[k], b[k], twin) for k in a}
    if a is True and b is False:
        return _MODE
    if type(a) is type(b) and (a is b or (not isinstance(a, torch.Tensor) and a == b)):
        return a
    raise _ModeDependent


def _reads_mode(value: Any) -> bool:
    found = []
    torch.fx.node.map_aggregate(value, lambda v: found.append(v is _MODE))
    return any(found)


def _split_fx(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    graph = _trace_both_modes(model, name)
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == name]
    if not calls:
        raise SurgeryError(
            f"cannot cut {type(model).__name__} at {name!r}: the forward never calls that module "
            f"(its weights may be used directly); cut at a module the forward calls"
        )
    if len(calls) > 1:
        raise SurgeryError(
            f"cannot cut {type(model).__name__} at {name!r}: the forward calls it "
            f"{len(calls)} times, so there is no single cut point"
        )
    at = calls[0]
    prefix_nodes, suffix_nodes = _partition(nodes, at)
    prefix_ids = set(prefix_nodes)
    crossing = []
    for node in suffix_nodes:
        for inp in node.all_input_nodes:
            if inp in prefix_ids and inp is not at and inp.op != "get_attr" and inp not in crossing:
                crossing.append(inp)
    if crossing:
        raise SurgeryError(
            f"cannot cut {type(model).__name__} at {name!r}: only the output of {name!r} may "
            f"cross the cut, but the rest of the model also uses "
            f"{', '.join(_describe(n) for n in crossing[:4])}"
            f"{' …' if len(crossing) > 4 else ''} (a skip connection or an input used "
            f"after the cut); cut at a module outside that span (e.g. a whole block)"
        )
    prefix = torch.fx.GraphModule(model, _prefix_graph(prefix_nodes, at), class_name="Prefix")
    suffix = torch.fx.GraphModule(
        model, _suffix_graph(graph, suffix_nodes, at, name), class_name="Suffix"
    )
    for half in (prefix, suffix):  # only the root flag: submodules keep their own modes
        half.training = model.training
    return prefix, suffix


def _partition(
    nodes: list[torch.fx.Node], at: torch.fx.Node
) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """The nodes of the prefix (up to ``at``, with the parameters they read) and of the
    suffix (the rest; :func:`_suffix_graph` copies in the parameters it reads)."""
    position = nodes.index(at)
    # Everything computable from the inputs before the cut belongs to the prefix (also checks
    # such as torch._assert); parameters are read where they are used, on either side.
    available: set[torch.fx.Node] = set()
    for node in nodes[: position + 1]:
        if node.op == "get_attr" or all(i in available for i in node.all_input_nodes):
            available.add(node)
    core = {n for n in nodes[: position + 1] if n in available and n.op != "get_attr"}
    attrs = {i for n in core for i in n.all_input_nodes if i.op == "get_attr"}
    prefix_nodes = [n for n in nodes[: position + 1] if n in core or n in attrs]
    suffix_nodes = [n for n in nodes if n not in core and n.op != "get_attr"]
    return prefix_nodes, suffix_nodes


def _prefix_graph(prefix_nodes: list[torch.fx.Node], at: torch.fx.Node) -> torch.fx.Graph:
    prefix_graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in prefix_nodes:
        env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(env[at])
    return prefix_graph


def _suffix_graph(
    graph: torch.fx.Graph, suffix_nodes: list[torch.fx.Node], at: torch.fx.Node, name: str
) -> torch.fx.Graph:
    """The suffix graph: ``at``'s output is its one input."""
    # concrete **kwargs make fx flatten the output; the suffix returns it in its real shape
    codegen = graph._codegen
    out_spec = codegen.pytree_info.out_spec if hasattr(codegen, "pytree_info") else None
    suffix_graph = torch.fx.Graph()
    env = {at: suffix_graph.placeholder(_safe(name))}
    for node in suffix_nodes:
        for inp in node.all_input_nodes:  # parameters also read before the cut
            if inp not in env and inp.op == "get_attr":
                env[inp] = suffix_graph.node_copy(inp)
        if node.op == "output" and out_spec is not None:
            flat = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
            suffix_graph.output(pytree.tree_unflatten(list(flat), out_spec))
            continue
        env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    return suffix_graph


def _describe(node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    if node.op == "call_module":
        return f"the output of {display_name(str(node.target))!r}"
    return f"the value {node.name!r}"


def _safe(name: str) -> str:
    return "cut_" + "".join(ch if ch.isalnum() else "_" for ch in name)
