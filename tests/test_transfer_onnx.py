"""ONNX -> PyTorch: graphs exported by torch and built by hand, read with the onnx package."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import netgraft  # noqa: E402


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 5),
    )


def _export(model: nn.Module, x: torch.Tensor, path) -> None:
    # the TorchScript exporter needs no extra packages; training mode keeps BatchNorm
    # unfused so its running statistics travel as initializers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
        )


def test_torch_exported_onnx_weights_transfer_back_with_equal_outputs(tmp_path):
    torch.manual_seed(0)
    src = _cnn()
    with torch.no_grad():
        src[1].running_mean.uniform_(-1, 1)
        src[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "cnn.onnx"
    _export(src, x, path)
    src.eval()

    dst = _cnn().eval()
    report = netgraft.transfer(path, dst)
    report.assert_complete()
    assert report.records["6.weight"].source == "6.weight"
    assert report.records["1.running_var"].status == "copied"
    with torch.no_grad():
        assert (dst(x) - src(x)).abs().max().item() < 1e-6


def _graph_from(ref: nn.Sequential, path) -> None:
    """Build by hand a graph computing ``ref`` with names unrelated to torch's: a Gemm whose
    weight is stored (in, out) (transB=0), BatchNormalization with epsilon 1e-3, a MatMul + Add
    pair and a LayerNormalization."""
    lin1, bn, lin2, ln = ref[0], ref[1], ref[3], ref[4]

    def init(name, t):
        return numpy_helper.from_array(t.detach().numpy().astype(np.float32), name)

    inits = [
        init("W_a", lin1.weight.t()),
        init("b_a", lin1.bias),
        init("gamma", bn.weight),
        init("beta", bn.bias),
        init("mu", bn.running_mean),
        init("sigma2", bn.running_var),
        init("W_b", lin2.weight.t()),
        init("b_b", lin2.bias),
        init("ln_scale", ln.weight),
        init("ln_bias", ln.bias),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W_a", "b_a"], ["h1"], name="dense_a", transB=0),
        helper.make_node(
            "BatchNormalization", ["h1", "gamma", "beta", "mu", "sigma2"], ["h2"], epsilon=1e-3
        ),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "W_b"], ["h4"], name="dense_b"),
        helper.make_node("Add", ["h4", "b_b"], ["h5"]),
        helper.make_node(
            "LayerNormalization", ["h5", "ln_scale", "ln_bias"], ["y"], epsilon=1e-5, axis=-1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.LayerNorm(5)
    )


def test_hand_built_onnx_gemm_transb0_matmul_and_norms_map_by_structure(tmp_path):
    torch.manual_seed(1)
    ref = _mlp().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        ref[1].running_mean.uniform_(-1, 1)
        ref[1].running_var.uniform_(0.5, 2)
        ref[1].eps = 1e-3
    path = tmp_path / "hand.onnx"
    _graph_from(ref, path)

    dst = _mlp().eval()
    report = netgraft.transfer(path, dst, adopt_epsilon=True)
    report.assert_complete()
    assert report.records["0.weight"].source == "dense_a.weight"
    assert report.records["0.weight"].how == "structure"
    assert report.records["3.bias"].source == "dense_b.bias"
    assert any("transB=0" in n for n in report.notes)
    assert dst[1].eps == pytest.approx(1e-3)
    for name, value in ref.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(dst.state_dict()[name], value), name
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert (dst(x) - ref(x)).abs().max().item() < 1e-6
