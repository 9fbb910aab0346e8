"""Keras -> PyTorch: real Keras 3 models written here, read back with h5py only."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

import netgraft  # noqa: E402
from netgraft.errors import WeightsError  # noqa: E402

L = keras.layers
FORMATS = ("keras", "h5", "weights.h5")


def _save(model, folder, fmt: str):
    path = folder / f"{model.name}.{fmt}"
    if fmt == "weights.h5":
        path = folder / f"{model.name}_weights.h5"
        _save_keras2_weights(model, path)
    else:
        model.save(path)
    return path


def _save_keras2_weights(model, path) -> None:
    """Write the weights-only HDF5 layout of Keras 2's ``model.save_weights("w.h5")``:
    ``layer_names`` on the root, one group per layer with ``weight_names`` like
    ``dw/depthwise_kernel:0`` (Keras 3 can no longer write this format)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["backend"] = "tensorflow"
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = []
            for var in layer.weights:
                role = var.name
                if isinstance(layer, L.DepthwiseConv2D) and role == "kernel":
                    role = "depthwise_kernel"
                cell = f"{layer.name}_cell/" if isinstance(layer, (L.LSTM, L.GRU)) else ""
                names.append(f"{layer.name}/{cell}{role}:0")
                group.create_dataset(names[-1], data=np.asarray(var.numpy()))
            group.attrs["weight_names"] = [n.encode() for n in names]


def _randomise_bn(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                    rng.normal(0, 0.5, beta.shape).astype("float32"),
                    rng.normal(0, 0.5, mean.shape).astype("float32"),
                    rng.uniform(0.5, 2.0, var.shape).astype("float32"),
                ]
            )


def _keras_out(model, x: np.ndarray) -> np.ndarray:
    out = model(x, training=False)
    return out.detach().cpu().numpy() if hasattr(out, "detach") else np.asarray(out)


class Separable(nn.Module):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, k, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


def _cnn_pair():
    keras.utils.set_random_seed(0)
    km = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3, activation="relu", name="conv"),
            L.BatchNormalization(name="bn"),
            L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw"),
            L.SeparableConv2D(5, 3, name="sep"),
            L.Flatten(name="flat"),
            L.Dense(6, name="out"),
        ],
        name="cnn",
    )
    _randomise_bn(km, 0)
    tm = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # torch's default eps 1e-5; Keras uses 1e-3
        nn.Conv2d(4, 8, 3, padding=1, groups=4),
        Separable(8, 5, 3),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6),
    ).eval()
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype("float32")
    return km, tm, x, torch.from_numpy(x).permute(0, 3, 1, 2)


def _conv1d_pair():
    keras.utils.set_random_seed(1)
    km = keras.Sequential(
        [keras.Input((10, 3)), L.Conv1D(4, 3, name="c1"), L.Flatten(), L.Dense(2, name="d")],
        name="conv1d",
    )
    tm = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 8, 2)).eval()
    x = np.random.default_rng(2).normal(size=(3, 10, 3)).astype("float32")
    return km, tm, x, torch.from_numpy(x).permute(0, 2, 1)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.norm = nn.LayerNorm(6)
        self.lstm = nn.LSTM(6, 4, batch_first=True)
        self.gru = nn.GRU(4, 3, batch_first=True)
        self.fc = nn.Linear(3, 2)

    def forward(self, ids):
        h, _ = self.lstm(self.norm(self.emb(ids)))
        h, _ = self.gru(h)
        return self.fc(h[:, -1])


def _rnn_pair():
    keras.utils.set_random_seed(2)
    km = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            L.Embedding(20, 6, name="tokens"),
            L.LayerNormalization(name="ln"),
            L.LSTM(4, return_sequences=True, name="lstm"),
            L.GRU(3, name="gru"),
            L.Dense(2, name="head"),
        ],
        name="rnn",
    )
    # non-zero biases so a wrong gate order or bias split cannot pass unnoticed
    for layer in km.layers:
        weights = layer.get_weights()
        if weights:
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights([w + rng.normal(0, 0.3, w.shape).astype("float32") for w in weights])
    ids = np.random.default_rng(3).integers(0, 20, size=(4, 5)).astype("int32")
    return km, Recurrent().eval(), ids, torch.from_numpy(ids).long()


PAIRS = {"cnn": _cnn_pair, "conv1d": _conv1d_pair, "rnn": _rnn_pair}


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras")
    out = {}
    for name, build in PAIRS.items():
        km, tm, x_keras, x_torch = build()
        expected = _keras_out(km, x_keras)
        files = {fmt: _save(km, folder, fmt) for fmt in FORMATS}
        out[name] = (files, tm, x_torch, expected)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_keras_model_transfers_into_handwritten_torch_model_with_equal_outputs(
    keras_files, name, fmt
):
    files, tm, x, expected = keras_files[name]
    model = type(tm)() if isinstance(tm, Recurrent) else _fresh(tm)
    report = netgraft.transfer(files[fmt], model, adopt_epsilon=True)
    report.assert_complete()
    assert report.mismatched == []
    with torch.no_grad():
        got = model.eval()(x).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5


def _fresh(tm: nn.Module) -> nn.Module:
    import copy

    model = copy.deepcopy(tm)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def test_keras_batchnorm_epsilon_difference_is_reported_and_can_be_adopted(keras_files):
    files, tm, x, expected = keras_files["cnn"]
    model = _fresh(tm)
    report = netgraft.transfer(files["keras"], model)
    assert model[2].eps == 1e-5
    assert any("epsilon" in n and "0.001" in n and "adopt_epsilon" in n for n in report.notes)
    with torch.no_grad():
        assert np.abs(model(x).numpy() - expected).max() > 1e-5  # eps matters here

    report = netgraft.transfer(files["keras"], model, adopt_epsilon=True)
    assert model[2].eps == pytest.approx(1e-3)
    assert any("epsilon set" in n for n in report.notes)


def test_keras_layers_pair_by_structure_and_report_names_and_layout_notes(keras_files):
    files, tm, _, _ = keras_files["cnn"]
    report = netgraft.transfer(files["h5"], _fresh(tm), adopt_epsilon=True)
    rec = report.records
    assert rec["0.weight"].source == "conv.weight" and rec["0.weight"].how == "structure"
    assert rec["2.running_var"].source == "bn.running_var"
    assert rec["4.depthwise.weight"].source == "sep.depthwise.weight"
    assert rec["6.weight"].source == "out.weight"
    assert rec["2.num_batches_tracked"].status == "kept"
    assert any("permuted" in n and "(4, 4, 5)" in n for n in report.notes)
    assert report.unexpected == []


def test_keras_gru_without_reset_after_is_refused(tmp_path):
    km = keras.Sequential([keras.Input((4, 3)), L.GRU(2, reset_after=False, name="g")], name="g")
    path = tmp_path / "g.keras"
    km.save(path)
    with pytest.raises(WeightsError, match="reset_after=False"):
        netgraft.transfer(path, nn.GRU(3, 2, batch_first=True))


def test_keras_model_into_wrong_architecture_raises_with_shapes(keras_files):
    files, *_ = keras_files["conv1d"]
    wrong = nn.Sequential(nn.Conv1d(3, 4, 5), nn.Flatten(), nn.Linear(4 * 6, 2))
    with pytest.raises(netgraft.ShapeMismatchError, match=r"\(4, 3, 5\) <- c1.weight \(4, 3, 3\)"):
        netgraft.transfer(files["keras"], wrong)
