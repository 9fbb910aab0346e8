"""Greedy layer-wise pretraining: each layer learns to reconstruct its own input, unlabelled.

:func:`pretrain_layerwise` walks the model's Linear and Conv layers in execution order
(the head excluded) and trains each in turn as the encoder of a small autoencoder
(Bengio et al. 2007, "Greedy layer-wise training of deep networks"): the layers below it
turn the unlabelled inputs into the layer's input, the layer encodes it as
``activation(layer(input))``, a temporary decoder (``Linear`` or ``ConvTranspose2d``)
reconstructs the input, and only the layer and its decoder are updated (mean squared error,
Adam). Every other layer is frozen while it trains: it gets no gradient and runs in eval
mode, so no norm statistics move. The decoders are thrown away; the model keeps its
architecture, its train/eval modes and its requires_grad flags, ready to fine-tune.

Example::

    >>> report = netgraft.pretrain_layerwise(model, x_unlabelled, epochs_per_layer=3)
    >>> netgraft.fit(model, (x_few, y_few), epochs=20, lr=1e-3)

This module never adds layers to the model and never uses labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import NetgraftError
from ..heads import find_head
from ..layers import modes_kept, ordered_layer_modules, trace_order
from ..options import RunOptions, run_options
from ..select import Selector, select
from ..train.batches import resolve_device
from ..train.report import Reporter
from .inputs import gather_inputs

__all__ = ["LayerwiseResult", "pretrain_layerwise"]

_ACTIVATIONS = {
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "identity": lambda t: t,
}
_ACTIVATION_MODULES = {
    nn.ReLU: "relu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.GELU: "gelu",
}


class _Reached(Exception):
    """Raised by a forward pre-hook to stop the model once the layer's input is known."""


def _layer_input(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` receives when ``model`` runs on ``x`` (the model stops there)."""
    seen: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise NetgraftError(f"the forward pass never calls {type(layer).__name__} layer")
    return seen[0].detach()


def _decoder(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.out_features, layer.in_features)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or not isinstance(layer.padding, tuple):
            raise NetgraftError(
                "layer-wise pretraining supports Conv2d with groups=1 and numeric padding; "
                f"found groups={layer.groups}, padding={layer.padding!r}"
            )
        return nn.ConvTranspose2d(
            layer.out_channels,
            layer.in_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
        )
    raise NetgraftError(
        f"layer-wise pretraining trains Linear and Conv2d layers; found {type(layer).__name__}"
    )


def _decode(decoder: nn.Module, code: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(decoder, nn.ConvTranspose2d):
        return decoder(code, output_size=like.shape[-2:])
    return decoder(code)


def _following_activations(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """For each module, the activation module that runs right after it (if any)."""

    order, _ = trace_order(model, example)
    modules = dict(model.named_modules())
    found = {}
    for before, after in zip(order, order[1:], strict=False):
        kind = _ACTIVATION_MODULES.get(type(modules[after]))
        if kind is not None:
            found[before] = kind
    return found


def _default_layers(model: nn.Module) -> list[str]:

    try:
        head = find_head(model)[0]
    except NetgraftError:
        head = None
    return [
        name
        for name, module in ordered_layer_modules(model)
        if isinstance(module, (nn.Linear, nn.Conv2d))
        and not (head is not None and (name == head or name.startswith(head + ".")))
    ]


@dataclass
class LayerwiseResult:
    """What :func:`pretrain_layerwise` did: one record per pretrained layer, in order,
    ``{"layer", "first_loss", "last_loss"}`` (the reconstruction loss of its first and last
    epoch). It iterates, indexes and has a length like the list of records it holds, as
    the list :func:`pretrain_layerwise` used to return."""

    layers: list[dict[str, Any]] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.layers)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the records."""
        return {"layers": [dict(r) for r in self.layers]}

    def summary(self) -> str:
        """One line: each layer with its first and last reconstruction loss."""
        parts = [f"{r['layer']} {r['first_loss']:.4f} -> {r['last_loss']:.4f}" for r in self]
        return "layer-wise pretraining: " + ", ".join(parts)


def pretrain_layerwise(
    model: nn.Module,
    unlabeled: Any,
    *,
    epochs_per_layer: int,
    layers: Selector = None,
    activation: str = "auto",
    lr: float = 1e-3,
    batch_size: int = 64,
    noise: float = 0.0,
    seed: int = 0,
    run: RunOptions | None = None,
) -> LayerwiseResult:
    """Train the model's layers one at a time, bottom up, each as an autoencoder of its own
    input (see the module docstring), for ``epochs_per_layer`` epochs over ``unlabeled``,
    in place; return a :class:`LayerwiseResult`.

    ``layers`` (a selector) picks which layers to pretrain, by default every Linear and
    Conv2d before the head, in execution order. The code is ``activation(layer(input))``:
    ``"auto"`` takes the activation module (ReLU, Sigmoid, Tanh, GELU) that runs right after
    the layer, else the identity; or name one of ``"relu"``, ``"sigmoid"``, ``"tanh"``,
    ``"gelu"``, ``"identity"`` for every layer. ``noise`` > 0 corrupts the input with
    Gaussian noise of that std (a denoising autoencoder). ``seed`` (default 0) draws the
    data order and the decoders. ``run`` (:class:`~netgraft.RunOptions`) gives the device
    (None: where the model is) and ``progress`` (a line per layer on stderr; logged either
    way). Frozen state and train/eval modes are
    restored afterwards.
    """
    run = run_options(run)
    _check_settings(epochs_per_layer, activation)
    x, _ = gather_inputs(unlabeled, second=None)
    names = _chosen_layers(model, layers)
    if run.device is not None:
        model.to(resolve_device(run.device))
    example = x[:1].to(next(model.parameters()).device)
    following = _following_activations(model, example) if activation == "auto" else {}
    grads = {p: p.requires_grad for p in model.parameters()}
    report = Reporter(not run.progress)
    result = LayerwiseResult()
    settings = (epochs_per_layer, lr, batch_size, noise, seed)
    with modes_kept(model):
        try:
            model.eval()  # everything below the layer runs in inference mode: no statistics move
            for p in model.parameters():
                p.requires_grad_(False)
            generator = torch.Generator().manual_seed(seed)
            for name in names:
                act = following.get(name, "identity") if activation == "auto" else activation
                losses = _pretrain_layer(model, name, _ACTIVATIONS[act], x, generator, settings)
                first, last = losses[0], losses[-1]
                result.layers.append({"layer": name, "first_loss": first, "last_loss": last})
                report(f"pretrained {name}: reconstruction loss {first:.4f} -> {last:.4f}")
        finally:
            for p, flag in grads.items():
                p.requires_grad_(flag)
    return result


def _check_settings(epochs_per_layer: int, activation: str) -> None:
    if not isinstance(epochs_per_layer, int) or epochs_per_layer < 1:
        raise NetgraftError(
            f"epochs_per_layer must be a positive integer; found {epochs_per_layer!r}"
        )
    if activation != "auto" and activation not in _ACTIVATIONS:
        raise NetgraftError(
            f"activation must be one of {', '.join(_ACTIVATIONS)}; found {activation!r}"
        )


def _chosen_layers(model: nn.Module, layers: Selector) -> list[str]:
    """The layers to pretrain in execution order: ``layers`` picks them (default: every
    Linear and Conv2d before the head)."""
    if layers is None:
        names = _default_layers(model)
    else:
        chosen = set(select(model, layers))
        names = [n for n in _default_layers(model) + list(chosen) if n in chosen]
        names = list(dict.fromkeys(names))
    if not names:
        raise NetgraftError("the model has no Linear or Conv2d layer to pretrain")
    return names


def _pretrain_layer(
    model: nn.Module,
    name: str,
    act: nn.Module,
    x: torch.Tensor,
    generator: torch.Generator,
    settings: tuple[int, float, int, float, int],
) -> list[float]:
    """Train layer ``name`` (alone trainable) with a fresh decoder to reconstruct its input;
    return the mean loss of each epoch."""
    epochs, lr, batch_size, noise, seed = settings
    layer = dict(model.named_modules())[name]
    device = next(layer.parameters()).device
    torch.manual_seed(seed)
    decoder = _decoder(layer).to(device)
    for p in layer.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(layer.parameters()) + list(decoder.parameters()), lr=lr)
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(x), batch_size):
            batch = x[order[start : start + batch_size]].to(device)
            inp = _layer_input(model, layer, batch)
            corrupted = inp + noise * torch.randn_like(inp) if noise > 0 else inp
            loss = F.mse_loss(_decode(decoder, act(layer(corrupted)), inp), inp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(inp)
            count += len(inp)
        losses.append(total / count)
    for p in layer.parameters():
        p.requires_grad_(False)
    return losses
