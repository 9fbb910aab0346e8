"""Read the weights of an ONNX graph (its initializers) into torch-layout layers.

Graph nodes are walked in order, so layers come out in execution order: ``Conv`` /
``ConvTranspose`` (weight, bias), ``Gemm`` (weight transposed to torch's ``(out, in)`` when
``transB=0``, ``alpha``/``beta`` folded in), ``MatMul`` with a constant right operand
(transposed; a following ``Add`` of a constant vector becomes its bias),
``BatchNormalization`` (epsilon kept), ``LayerNormalization``, ``InstanceNormalization``
and ``Gather`` from a constant table (an embedding). Layers are named after the
initializers when those carry torch names (``fc.weight``), else after the node's scope
(``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``). Other floating-point initializers
are kept under their own names so nothing is dropped silently. Never runs the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import WeightsError
from ..match import Source, SourceLayer, group_layers

__all__ = ["read_onnx"]

_LOCALS = ("weight", "bias", "running_mean", "running_var")


def _scope_name(node: Any, index: int) -> str:
    parts = [p for p in node.name.split("/") if p][:-1]
    path = ""
    for part in parts:  # torch scopes repeat the parent: /layer1/layer1.0/downsample/downsample.0
        last = path.rpartition(".")[2]
        if path and part.startswith(path + "."):
            path = part
        elif last and part.startswith(last + "."):
            path = path + part[len(last) :]
        else:
            path = f"{path}.{part}" if path else part
    return path or node.name or f"{node.op_type.lower()}_{index}"


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _layer_name(node: Any, index: int, names: list[str]) -> str:
    owners = {n.rpartition(".")[0] for n in names if n.rpartition(".")[2] in _LOCALS}
    if len(owners) == 1 and "" not in owners:
        return owners.pop()
    return _scope_name(node, index)


_Tensors = dict[str, tuple[str, np.ndarray]]


class _Reader:
    """One pass over an ONNX graph: the constant tensors each weight-bearing node reads,
    gathered into a :class:`Source` in node order."""

    def __init__(self, graph: Any, numpy_helper: Any, label: str):
        self.graph = graph
        self.init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.consumed: set[str] = set()
        self.source = Source(label, {}, [])
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def const(self, name: str) -> np.ndarray | None:
        return self.init.get(name) if name else None

    def add(self, node: Any, index: int, tensors: _Tensors, eps: float | None = None) -> None:
        lname = _layer_name(node, index, [n for n, _ in tensors.values()])
        full: dict[str, str] = {}
        for local, (orig, array) in tensors.items():
            name = orig if orig.rpartition(".")[2] == local else f"{lname}.{local}"
            full[local] = name
            self.source.tensors[name] = torch.from_numpy(np.array(array, copy=True, order="C"))
            self.consumed.add(orig)
        self.source.layers.append(SourceLayer(lname, full, eps))

    def weight_and_bias(self, ins: list[str]) -> _Tensors:
        tensors = {"weight": (ins[1], self.init[ins[1]])}
        if self.const(ins[2]) is not None:
            tensors["bias"] = (ins[2], self.init[ins[2]])
        return tensors

    def gemm(self, node: Any, ins: list[str]) -> _Tensors:
        a = _attrs(node)
        if a.get("transA", 0):
            raise WeightsError(
                f"ONNX Gemm {node.name!r} transposes its input (transA=1), which no torch "
                f"Linear does; expected transA=0"
            )
        weight = self.init[ins[1]] if a.get("transB", 0) else self.init[ins[1]].T
        weight = weight * a.get("alpha", 1.0) if a.get("alpha", 1.0) != 1.0 else weight
        tensors = {"weight": (ins[1], weight)}
        bias = self.const(ins[2])
        if bias is not None:
            tensors["bias"] = (ins[2], bias.reshape(-1) * a.get("beta", 1.0))
        if a.get("transB", 0) == 0:
            self.source.notes.append(f"{node.name or ins[1]}: Gemm transB=0 weight transposed")
        return tensors

    def matmul(self, node: Any, ins: list[str]) -> _Tensors:
        tensors = {"weight": (ins[1], self.init[ins[1]].T)}
        after = self.consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add":
            other = [n for n in after[0].input if n != node.output[0]]
            if other and self.const(other[0]) is not None and self.init[other[0]].ndim == 1:
                tensors["bias"] = (other[0], self.init[other[0]])
        return tensors

    def node(self, node: Any, index: int) -> None:
        """Add the layer ``node`` holds, if it reads constant weights."""
        ins = list(node.input) + [""] * 5
        op, weight = node.op_type, self.const(ins[1])
        eps = float(_attrs(node).get("epsilon", 1e-5))
        if op in ("Conv", "ConvTranspose") and weight is not None:
            self.add(node, index, self.weight_and_bias(ins))
        elif op == "Gemm" and weight is not None:
            self.add(node, index, self.gemm(node, ins))
        elif op == "MatMul" and weight is not None and weight.ndim == 2:
            self.add(node, index, self.matmul(node, ins))
        elif op == "BatchNormalization" and weight is not None:
            names = zip(("weight", "bias", "running_mean", "running_var"), ins[1:5], strict=True)
            tensors = {k: (v, self.init[v]) for k, v in names if self.const(v) is not None}
            self.add(node, index, tensors, eps)
        elif op in ("LayerNormalization", "InstanceNormalization") and weight is not None:
            self.add(node, index, self.weight_and_bias(ins), eps)
        elif op == "Gather" and self.const(ins[0]) is not None and self.init[ins[0]].ndim == 2:
            if ins[0] not in self.consumed:
                self.add(node, index, {"weight": (ins[0], self.init[ins[0]])})

    def leftovers(self) -> None:
        """Keep every other floating initializer under its own name: nothing is dropped."""
        names = [
            n
            for n, a in self.init.items()
            if n not in self.consumed and a.ndim >= 1 and np.issubdtype(a.dtype, np.floating)
        ]
        for name in names:
            self.source.tensors[name] = torch.from_numpy(np.ascontiguousarray(self.init[name]))
        self.source.layers += [SourceLayer(o, t) for o, t in group_layers(names)]


def read_onnx(path: str | Path) -> Source:
    """Read an ``.onnx`` file's initializers into a :class:`Source` of torch-layout layers."""
    path = Path(path)
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise WeightsError("reading ONNX files needs onnx (pip install 'netgraft[onnx]')") from exc
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise WeightsError(f"ONNX file {str(path)!r} is not a readable ONNX model: {exc}") from exc
    reader = _Reader(model.graph, numpy_helper, f"ONNX file {path.name}")
    for i, node in enumerate(model.graph.node):
        reader.node(node, i)
    reader.leftovers()
    if not reader.source.layers:
        raise WeightsError(f"ONNX file {str(path)!r} holds no weight initializers")
    return reader.source
