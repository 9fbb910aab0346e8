"""Read Keras weights (``.h5``, ``.keras``) into torch-layout tensors, with h5py only.

Supported files: Keras 2/3 legacy HDF5 (a full model with ``model_config`` and
``model_weights``, or a weights-only file with ``layer_names``), the Keras 3 ``.keras`` zip
(``config.json`` + ``model.weights.h5``) and a Keras 3 ``.weights.h5`` (no config: layer
classes come from group names and the order from the file, so structural matching is less
reliable). Layers: Dense, Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D (two torch
layers, ``.depthwise`` and ``.pointwise``), BatchNormalization, LayerNormalization,
Embedding, LSTM and GRU (``reset_after=True``). Layout changes: kernels are transposed to
torch's ``(out, in, *k)``, GRU gates reordered from Keras ``z, r, h`` to torch ``r, z, n``,
the LSTM bias split into ``bias_ih`` (Keras bias) and ``bias_hh`` (zeros), and the first
Dense after a channels-last Flatten gets its input rows permuted from NHWC to NCHW order.
Normalisation epsilons travel with the layers. TensorFlow is never imported.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import WeightsError
from ..match import Source, SourceLayer

__all__ = ["SUPPORTED", "read_keras"]

# roles of a layer's variables in the order Keras 3 stores them, given its config
SUPPORTED = (
    "Dense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
    "BatchNormalization",
    "LayerNormalization",
    "Embedding",
    "LSTM",
    "GRU",
)
_MODELS = ("Sequential", "Functional", "Model")
_ALIASES = {
    "Convolution1D": "Conv1D",
    "Convolution2D": "Conv2D",
    "Convolution3D": "Conv3D",
    "SeparableConvolution2D": "SeparableConv2D",
}


@dataclass
class _KLayer:
    name: str
    cls: str | None
    config: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    flatten_from: list[int] | None = None  # channels-last shape before a Flatten feeding it


def _roles(cls: str, config: dict[str, Any]) -> list[str]:
    bias = ["bias"] if config.get("use_bias", True) else []
    if cls in ("Dense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D"):
        return ["kernel", *bias]
    if cls in ("SeparableConv1D", "SeparableConv2D"):
        return ["depthwise_kernel", "pointwise_kernel", *bias]
    if cls == "BatchNormalization":
        return (
            (["gamma"] if config.get("scale", True) else [])
            + (["beta"] if config.get("center", True) else [])
            + ["moving_mean", "moving_variance"]
        )
    if cls == "LayerNormalization":
        return (["gamma"] if config.get("scale", True) else []) + (
            ["beta"] if config.get("center", True) else []
        )
    if cls == "Embedding":
        return ["embeddings"]
    if cls in ("LSTM", "GRU"):
        return ["kernel", "recurrent_kernel", *bias]
    return []


def _snake_to_class(group: str) -> str | None:
    base = re.sub(r"_\d+$", "", group)
    table = {
        re.sub(r"(?<!^)(?=[A-Z])", "_", c).lower().replace("conv_", "conv"): c for c in SUPPORTED
    }
    table.update({"conv1d": "Conv1D", "conv2d": "Conv2D", "conv3d": "Conv3D"})
    return table.get(base)


def _infer_class(weights: dict[str, np.ndarray]) -> str | None:
    roles = set(weights)
    kernel = weights.get("kernel")
    if "recurrent_kernel" in roles and kernel is not None:
        units = weights["recurrent_kernel"].shape[0]
        return "LSTM" if kernel.shape[1] == 4 * units else "GRU"
    if "pointwise_kernel" in roles:
        return "SeparableConv2D" if weights["pointwise_kernel"].ndim == 4 else "SeparableConv1D"
    if "depthwise_kernel" in roles:
        return "DepthwiseConv2D" if weights["depthwise_kernel"].ndim == 4 else "DepthwiseConv1D"
    if "moving_mean" in roles:
        return "BatchNormalization"
    if "embeddings" in roles:
        return "Embedding"
    if roles and roles <= {"gamma", "beta"}:
        return "LayerNormalization"
    if kernel is not None:
        return {2: "Dense", 3: "Conv1D", 4: "Conv2D", 5: "Conv3D"}.get(kernel.ndim)
    return None


def _flatten_configs(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for entry in layers:
        if entry.get("class_name") in _MODELS:
            out.extend(_flatten_configs(entry.get("config", {}).get("layers", [])))
        else:
            out.append(entry)
    return out


def _layer_configs(model_config: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not model_config:
        return []
    if model_config.get("class_name") in _MODELS:
        return _flatten_configs(model_config.get("config", {}).get("layers", []))
    return [model_config]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_legacy(group, configs: list[dict[str, Any]]) -> list[_KLayer]:
    """Keras 2/3 HDF5: ``layer_names`` in model order, ``weight_names`` per layer."""
    by_name = {c.get("config", {}).get("name"): c for c in configs}
    out: list[_KLayer] = []
    for raw in group.attrs["layer_names"]:
        lname = _text(raw)
        sub = group[lname]
        names = [_text(w) for w in sub.attrs.get("weight_names", [])]
        if not names:
            continue
        # weights of nested layers (a model inside the model) are grouped by their parent path
        parents: dict[str, dict[str, np.ndarray]] = {}
        for wname in names:
            parent, _, role = wname.rpartition("/")
            role = role.split(":")[0]
            parents.setdefault(parent, {})[role] = np.asarray(sub[wname])
        for parent, weights in parents.items():
            inner = parent.split("/")[-1] if parent else lname
            name = lname if len(parents) == 1 else inner
            entry = by_name.get(name) or by_name.get(lname) or {}
            cls = _ALIASES.get(entry.get("class_name", ""), entry.get("class_name"))
            if cls not in SUPPORTED:
                cls = _infer_class(weights)
            if cls in ("DepthwiseConv1D", "DepthwiseConv2D") and "depthwise_kernel" in weights:
                weights["kernel"] = weights.pop("depthwise_kernel")  # Keras 2 name
            out.append(_KLayer(name, cls, entry.get("config", {}), weights))
    return out


def _var_groups(h5) -> dict[str, Any]:
    """Keras 3 weights: layer name (``vars`` attribute) -> its h5 group."""
    found: dict[str, Any] = {}

    def visit(path: str, obj) -> None:
        if path.endswith("/vars") and "name" in obj.attrs and not path.endswith("cell/vars"):
            parent = h5[path.rsplit("/", 1)[0]]
            found.setdefault(_text(obj.attrs["name"]), parent)

    h5.visititems(visit)
    return found


def _vars(group) -> list[np.ndarray]:
    holder = group["cell/vars"] if "cell" in group and "vars" in group["cell"] else group["vars"]
    return [np.asarray(holder[str(i)]) for i in range(len(holder))]


def _read_v3(h5, configs: list[dict[str, Any]]) -> list[_KLayer]:
    groups = _var_groups(h5)
    out: list[_KLayer] = []
    if configs:
        entries = [
            (c.get("config", {}).get("name"), c.get("class_name"), c.get("config", {}))
            for c in configs
        ]
    else:  # a bare .weights.h5: class from the group name, order from the file
        entries = [
            (name, _snake_to_class(g.name.rsplit("/", 1)[-1]), {}) for name, g in groups.items()
        ]
    for name, cls, config in entries:
        cls = _ALIASES.get(cls, cls)
        group = groups.get(name)
        if group is None:
            continue
        values = _vars(group)
        if not values:
            continue
        if cls not in SUPPORTED:
            raise WeightsError(
                f"Keras layer {name!r} of class {cls} holds weights but is not supported; "
                f"supported: {', '.join(SUPPORTED)}"
            )
        roles = _roles(cls, config)
        if not config and len(values) < len(roles):  # no config: optional tensors absent
            roles = roles[: len(values)] if cls != "BatchNormalization" else roles[-len(values) :]
        if len(roles) != len(values):
            raise WeightsError(
                f"Keras layer {name!r} ({cls}) has {len(values)} weight arrays, expected "
                f"{len(roles)} ({', '.join(roles)}) from its config"
            )
        out.append(_KLayer(name, cls, config, dict(zip(roles, values, strict=True))))
    return out


def _mark_flattens(klayers: list[_KLayer], configs: list[dict[str, Any]]) -> None:
    """Give the first Dense after each channels-last Flatten the shape the Flatten saw."""
    by_name = {k.name: k for k in klayers}
    pending: dict[str, Any] | None = None
    last_channels: tuple[int, int] | None = None  # (channels, spatial rank) of the last conv
    for entry in configs:
        cls, config = entry.get("class_name"), entry.get("config", {})
        name = config.get("name")
        layer = by_name.get(name)
        if layer is not None and layer.cls != "Dense":
            kernel = layer.weights.get("kernel", layer.weights.get("pointwise_kernel"))
            if kernel is not None and kernel.ndim >= 3:
                out = kernel.shape[-1]
                if layer.cls and layer.cls.startswith("DepthwiseConv"):
                    out = kernel.shape[-2] * kernel.shape[-1]
                last_channels = (out, kernel.ndim - 2)
        if cls == "Flatten" and config.get("data_format", "channels_last") == "channels_last":
            shape = (entry.get("build_config") or {}).get("input_shape")
            pending = {"shape": list(shape[1:]) if shape else None, "last": last_channels}
        elif layer is not None and pending is not None:
            if layer.cls == "Dense":
                layer.flatten_from = _flatten_shape(layer, pending)
            pending = None


def _guess_flattens(klayers: list[_KLayer]) -> None:
    """Without a config, a Dense after a convolution (normalisation layers between them
    allowed) whose input is larger than the channel count can only follow a Flatten of a
    channels-last grid."""
    last: tuple[int, int] | None = None
    for layer in klayers:
        kernel = layer.weights.get("kernel", layer.weights.get("pointwise_kernel"))
        if layer.cls == "Dense" and last is not None:
            if layer.weights["kernel"].shape[0] != last[0]:
                layer.flatten_from = _flatten_shape(layer, {"shape": None, "last": last})
            last = None
        elif kernel is not None and kernel.ndim >= 3:
            channels = kernel.shape[-1]
            if layer.cls and layer.cls.startswith("DepthwiseConv"):
                channels = kernel.shape[-2] * kernel.shape[-1]
            last = (channels, kernel.ndim - 2)
        elif layer.cls not in ("BatchNormalization", "LayerNormalization"):
            last = None


def _flatten_shape(layer: _KLayer, pending: dict[str, Any]) -> list[int] | None:
    shape = pending["shape"]
    if shape is not None and all(isinstance(d, int) for d in shape):
        return shape if len(shape) >= 2 else None
    last = pending["last"]
    features = layer.weights["kernel"].shape[0]
    if last is None:
        raise WeightsError(
            f"Keras Dense {layer.name!r} follows a Flatten whose input shape the file does not "
            f"record and no convolution precedes it; cannot order its {features} input rows"
        )
    channels, rank = last
    spatial = features // channels
    side = round(spatial ** (1.0 / rank))
    if channels * side**rank != features:
        raise WeightsError(
            f"Keras Dense {layer.name!r} follows a Flatten of {features} features; with "
            f"{channels} channels the spatial shape is not a square grid and the file does not "
            f"record it, so its rows cannot be reordered to NCHW"
        )
    return [side] * rank + [channels]


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _gru_reorder(array: np.ndarray, axis: int) -> np.ndarray:
    z, r, h = np.split(array, 3, axis=axis)
    return np.concatenate([r, z, h], axis=axis)


_Converted = list[tuple[str, dict[str, torch.Tensor], float | None]]


def _biased(out: dict[str, torch.Tensor], w: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    if "bias" in w:
        out["bias"] = _t(w["bias"])
    return out


def _dense(layer: _KLayer) -> _Converted:
    kernel = layer.weights["kernel"]
    if layer.flatten_from is not None:  # Keras flattens channels-last: reorder the inputs
        *spatial, channels = layer.flatten_from
        kernel = kernel.reshape(*spatial, channels, kernel.shape[-1])
        kernel = np.moveaxis(kernel, len(spatial), 0).reshape(-1, kernel.shape[-1])
    return [(layer.name, _biased({"weight": _t(kernel.T)}, layer.weights), None)]


def _channels_first(kernel: np.ndarray) -> torch.Tensor:
    """A Keras ``(*k, in, out)`` kernel as torch's ``(out, in, *k)``."""
    return _t(kernel.transpose((kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2))))


def _conv(layer: _KLayer) -> _Converted:
    weight = _channels_first(layer.weights["kernel"])
    return [(layer.name, _biased({"weight": weight}, layer.weights), None)]


def _depthwise_conv(layer: _KLayer) -> _Converted:
    weight = _t(_depthwise(layer.weights["kernel"]))
    return [(layer.name, _biased({"weight": weight}, layer.weights), None)]


def _separable(layer: _KLayer) -> _Converted:
    w, name = layer.weights, layer.name
    pointwise = _biased({"weight": _channels_first(w["pointwise_kernel"])}, w)
    return [
        (f"{name}.depthwise", {"weight": _t(_depthwise(w["depthwise_kernel"]))}, None),
        (f"{name}.pointwise", pointwise, None),
    ]


def _norm(layer: _KLayer) -> _Converted:
    w = layer.weights
    size = w["moving_mean"].shape if "moving_mean" in w else next(iter(w.values())).shape
    out = {
        "weight": _t(w["gamma"]) if "gamma" in w else torch.ones(size),
        "bias": _t(w["beta"]) if "beta" in w else torch.zeros(size),
    }
    if "moving_mean" in w:
        out["running_mean"] = _t(w["moving_mean"])
        out["running_var"] = _t(w["moving_variance"])
    return [(layer.name, out, float(layer.config.get("epsilon", 1e-3)))]


def _embedding(layer: _KLayer) -> _Converted:
    return [(layer.name, {"weight": _t(layer.weights["embeddings"])}, None)]


def _lstm(layer: _KLayer) -> _Converted:
    w = layer.weights
    units = w["recurrent_kernel"].shape[0]
    out = {"weight_ih_l0": _t(w["kernel"].T), "weight_hh_l0": _t(w["recurrent_kernel"].T)}
    if "bias" in w:  # Keras gate order i, f, c, o is torch's i, f, g, o
        out["bias_ih_l0"] = _t(w["bias"])
        out["bias_hh_l0"] = torch.zeros(4 * units, dtype=out["bias_ih_l0"].dtype)
    return [(layer.name, out, None)]


def _gru(layer: _KLayer) -> _Converted:
    w, name = layer.weights, layer.name
    if layer.config and not layer.config.get("reset_after", True):
        raise WeightsError(
            f"Keras GRU {name!r} has reset_after=False, which torch.nn.GRU cannot compute "
            f"(torch applies the reset gate after the recurrent matmul); expected "
            f"reset_after=True (the Keras 3 default)"
        )
    out = {
        "weight_ih_l0": _t(_gru_reorder(w["kernel"], 1).T),
        "weight_hh_l0": _t(_gru_reorder(w["recurrent_kernel"], 1).T),
    }
    if "bias" in w:
        bias = _gru_reorder(w["bias"], w["bias"].ndim - 1)
        if bias.ndim != 2:
            raise WeightsError(
                f"Keras GRU {name!r} has a single bias of shape {bias.shape}; expected "
                f"(2, 3*units) from reset_after=True"
            )
        out["bias_ih_l0"], out["bias_hh_l0"] = _t(bias[0]), _t(bias[1])
    return [(name, out, None)]


_CONVERTERS = {
    "Dense": _dense,
    **dict.fromkeys(("Conv1D", "Conv2D", "Conv3D"), _conv),
    **dict.fromkeys(("DepthwiseConv1D", "DepthwiseConv2D"), _depthwise_conv),
    **dict.fromkeys(("SeparableConv1D", "SeparableConv2D"), _separable),
    **dict.fromkeys(("BatchNormalization", "LayerNormalization"), _norm),
    "Embedding": _embedding,
    "LSTM": _lstm,
    "GRU": _gru,
}


def _convert(layer: _KLayer) -> _Converted:
    """One Keras layer -> torch layers ``(name, {local: tensor}, eps)``."""
    convert = _CONVERTERS.get(layer.cls)
    if convert is None:
        w = layer.weights
        raise WeightsError(
            f"Keras layer {layer.name!r} ({layer.cls or 'unknown class'}) holds weights "
            f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in w.items())}) but is not "
            f"supported; supported: {', '.join(SUPPORTED)}"
        )
    return convert(layer)


def _depthwise(kernel: np.ndarray) -> np.ndarray:
    # (*k, in, mult) -> (in * mult, 1, *k); output channel i * mult + m, as in Keras
    *k, cin, mult = kernel.shape
    moved = np.moveaxis(np.moveaxis(kernel, -2, 0), -1, 1)
    return moved.reshape(cin * mult, 1, *k)


def _open(path: Path) -> tuple[Any, list[dict[str, Any]], Any]:
    import h5py

    if path.suffix.lower() == ".keras":
        try:
            archive = zipfile.ZipFile(path)
            config = json.loads(archive.read("config.json"))
            weights = archive.open("model.weights.h5")
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
            raise WeightsError(
                f"Keras file {str(path)!r} is not a Keras 3 archive with config.json and "
                f"model.weights.h5: {exc}"
            ) from exc
        return h5py.File(weights, "r"), _layer_configs(config), archive
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsError(f"Keras file {str(path)!r} is not a readable HDF5 file: {exc}") from exc
    config = None
    if "model_config" in h5.attrs:
        config = json.loads(_text(h5.attrs["model_config"]))
    return h5, _layer_configs(config), None


def read_keras(path: str | Path) -> Source:
    """Read a Keras ``.h5``/``.keras`` file into a :class:`Source` of torch-layout layers."""
    path = Path(path)
    try:
        import h5py  # noqa: F401
    except ImportError as exc:
        raise WeightsError(
            "reading Keras files needs h5py (pip install 'netgraft[keras]')"
        ) from exc
    h5, configs, archive = _open(path)
    try:
        if "layer_names" in h5.attrs:
            klayers = _read_legacy(h5, configs)
        elif "model_weights" in h5 and "layer_names" in h5["model_weights"].attrs:
            klayers = _read_legacy(h5["model_weights"], configs)
        elif "layers" in h5:
            klayers = _read_v3(h5, configs)
        else:
            raise WeightsError(
                f"Keras file {str(path)!r} holds neither legacy 'layer_names' nor Keras 3 "
                f"'layers' weights; is it a Keras model or weights file?"
            )
        if configs:
            _mark_flattens(klayers, configs)
        else:
            _guess_flattens(klayers)
    finally:
        h5.close()
        if archive is not None:
            archive.close()
    source = Source(f"Keras file {path.name}", {}, [])
    if not configs:
        source.notes.append(
            "the file holds no Keras model config: layer classes and order come from the "
            "weights alone (epsilons default to Keras' 1e-3)"
        )
    for layer in klayers:
        for lname, tensors, eps in _convert(layer):
            full = {local: f"{lname}.{local}" for local in tensors}
            source.tensors.update({full[k]: v for k, v in tensors.items()})
            source.layers.append(SourceLayer(lname, full, eps))
        if layer.flatten_from is not None:
            source.notes.append(
                f"{layer.name}: input rows permuted from channels-last Flatten order "
                f"{tuple(layer.flatten_from)} to PyTorch's channels-first order"
            )
        if layer.cls == "GRU":
            source.notes.append(
                f"{layer.name}: GRU gates reordered from Keras z,r,h to torch r,z,n"
            )
    if not source.layers:
        raise WeightsError(f"Keras file {str(path)!r} holds no layer weights")
    return source
