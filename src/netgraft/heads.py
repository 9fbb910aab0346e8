"""Heads: find the classifier, replace it, cut the model down to features, add layers on top.

The *head* is found by known attributes — timm's ``get_classifier()``, then ``fc``,
``classifier``, ``score``, ``head``, ``heads`` (torchvision ViT), the ``pooler`` of a Hugging
Face base model — and otherwise is the last Linear in execution order.
:func:`replace_head` swaps only the head's final Linear, keeping what comes before it in the
head (dropout, a ConvNeXt's LayerNorm); timm models go through ``reset_classifier`` and
Hugging Face models keep ``config.num_labels`` consistent. :func:`truncate` and
:func:`attach` return new modules that share the original weights.

Every function here that changes the architecture is recorded in the model's recipe, so
``netgraft.save`` / ``netgraft.load`` replay it. Nothing here touches weights outside the
head it replaces, and nothing here trains.

Example::

    >>> import torch, netgraft
    >>> model = netgraft.load_model("torchvision:resnet18")
    >>> netgraft.find_head(model)[0]
    'fc'
    >>> netgraft.replace_head(model, num_classes=10, hidden=256, dropout=0.2)
    >>> features = netgraft.truncate(model, after="layer4")   # output of layer4
    >>> model = netgraft.attach(model, torch.nn.Softmax(dim=1))
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .cut import cut
from .deprecation import legacy
from .errors import RecipeError, SurgeryError
from .layers import ordered_layer_modules
from .pooling import set_text_pooling, text_encoder
from .recipe import build_module, module_spec, recorded
from .select import Selector, resolve_module

__all__ = [
    "Stacked",
    "Truncated",
    "attach",
    "find_head",
    "find_heads",
    "head_names",
    "replace_head",
    "truncate",
]

log = logging.getLogger("netgraft.heads")

HEAD_ATTRIBUTES = ("fc", "classifier", "score", "head", "heads")
# models that classify twice and average at evaluation (timm's distilled models say so
# through get_classifier(); these are the attribute pairs of those that do not)
HEAD_PAIRS = (("head", "head_dist"), ("cls_classifier", "distillation_classifier"))
# auxiliary classifiers: only used in training (torchvision Inception v3, GoogLeNet); not the
# head, but replace_head resizes them so every training output has num_classes logits
AUX_HEADS = ("AuxLogits", "aux1", "aux2")


def _name_of(model: nn.Module, module: nn.Module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def _is_hf_pooler(module: nn.Module) -> bool:
    return isinstance(getattr(module, "dense", None), nn.Linear) and hasattr(module, "activation")


def _timm_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules timm's ``get_classifier()`` returns, named: one, or the pair of a
    distilled model (DeiT, LeViT, PiT, EfficientFormer: ``head`` and ``head_dist``)."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return []
    try:
        found = get_classifier()
    except Exception:  # a model's own method may not apply to its current state
        return []
    modules = list(found) if isinstance(found, tuple) else [found]
    named = [(_name_of(model, m), m) for m in modules if isinstance(m, nn.Module)]
    if not named or len(named) != len(modules) or not all(name for name, _ in named):
        return []
    return named  # type: ignore[return-value]


def find_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every head of the model as ``(dotted name, module)`` pairs: the one of
    :func:`find_head`, or both heads of a model that classifies twice and averages the two
    at evaluation (DeiT distilled: ``head`` on the class token and ``head_dist`` on the
    distillation token; timm's ``get_classifier()`` returns such pairs, as do LeViT and PiT
    distilled; Hugging Face's ``cls_classifier`` and ``distillation_classifier``). Training
    "the head" means training all of them: ``train_only(model, [n for n, _ in
    find_heads(model)])``; a frozen second head would keep adding its old logits."""
    timm_heads = _timm_heads(model)
    if len(timm_heads) > 1:
        return timm_heads
    for pair in HEAD_PAIRS:
        children = [model._modules.get(attr) for attr in pair]
        if all(isinstance(c, nn.Module) for c in children):
            return list(zip(pair, children, strict=True))  # type: ignore[arg-type]
    return [find_head(model)]


def head_names(model: nn.Module, head: str | list[str] | None = None) -> list[str]:
    """The names of what "the head" of ``model`` is for training: ``head`` when given (a name
    or selector, or a list of them), else every head :func:`find_heads` finds (both of a
    distilled DeiT, which must train together). The one head lookup of fine-tuning, the
    trainer callbacks and cached-head training."""
    if not head:
        return [name for name, _ in find_heads(model)]
    return list(head) if isinstance(head, (list, tuple)) else [head]


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's head as ``(dotted name, module)``: timm's ``get_classifier()``, else the
    first of the child attributes ``fc``, ``classifier``, ``score``, ``head``, ``heads``, else a
    Hugging Face base model's ``pooler``, else the last Linear in execution order. A model
    with two heads (DeiT distilled) gives its first; :func:`find_heads` gives both."""
    timm_heads = _timm_heads(model)
    if timm_heads:
        return timm_heads[0]
    pair = next((p for p in HEAD_PAIRS if all(a in model._modules for a in p)), None)
    if pair is not None and isinstance(model._modules[pair[0]], nn.Module):
        return pair[0], model._modules[pair[0]]  # type: ignore[return-value]
    for attr in HEAD_ATTRIBUTES:
        child = model._modules.get(attr)
        if isinstance(child, nn.Module):
            return attr, child
    pooler = model._modules.get("pooler")
    if hasattr(model, "config") and pooler is not None and _is_hf_pooler(pooler):
        return "pooler", pooler
    linears = [(n, m) for n, m in ordered_layer_modules(model) if isinstance(m, nn.Linear)]
    if not linears:
        raise SurgeryError(
            f"cannot find the head of {type(model).__name__}: no fc/classifier/score/head "
            f"attribute and no Linear layer; add one with netgraft.attach(model, nn.Linear(...))"
        )
    return linears[-1]


def _final_linear(name: str, head: nn.Module) -> tuple[str, nn.Linear]:
    if isinstance(head, nn.Linear):
        return name, head
    inner = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not inner:
        raise SurgeryError(
            f"the head {name!r} ({type(head).__name__}) holds no Linear layer, so its input "
            f"width is unknown; add a classifier with netgraft.attach(model, nn.Linear(F, N))"
        )
    sub, linear = inner[-1]
    return f"{name}.{sub}", linear


def _final_pointwise_conv(name: str, head: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The last 1×1 convolution of a head that holds no Linear (SqueezeNet classifies with
    one, then pools), or None."""
    if any(isinstance(m, nn.Linear) for m in head.modules()):
        return None
    convs = [
        (f"{name}.{n}" if n else name, m)
        for n, m in head.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
    ]
    return convs[-1] if convs else None


def _replace_conv_classifier(
    model: nn.Module,
    target: str,
    old: nn.Conv2d,
    num_classes: int,
    hidden: int | list[int] | None,
    dropout: float,
) -> nn.Module:
    if hidden is not None or dropout:
        raise SurgeryError(
            f"the head {target!r} classifies with a 1×1 convolution; replace_head swaps it for "
            "a new one and takes no hidden= or dropout= there"
        )
    new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    new.train(old.training)
    model.set_submodule(target, new)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes
    _sync_num_classes(model, num_classes)
    log.info("replaced %s (%d -> %d) with a 1×1 Conv2d", target, old.in_channels, num_classes)
    return model


def _new_head(
    in_features: int,
    num_classes: int,
    hidden: int | list[int] | None,
    dropout: float,
    like: nn.Linear | None,
) -> nn.Module:
    widths = [] if hidden is None else [hidden] if isinstance(hidden, int) else list(hidden)
    parts: list[nn.Module] = []
    width = in_features
    for h in widths:
        parts += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    if dropout:
        parts.append(nn.Dropout(dropout))
    parts.append(nn.Linear(width, num_classes))
    head = parts[0] if len(parts) == 1 else nn.Sequential(*parts)
    if like is not None:
        head = head.to(device=like.weight.device, dtype=like.weight.dtype)
    return head


def _sync_num_classes(model: nn.Module, num_classes: int) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        config.num_labels = num_classes  # HF also resets id2label / label2id
    if isinstance(getattr(model, "num_labels", None), int):
        model.num_labels = num_classes
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes


@recorded("replace_head")
def replace_head(
    model: nn.Module,
    num_classes: int,
    *,
    hidden: int | list[int] | None = None,
    dropout: float = 0.0,
    pool: str | None = None,
) -> nn.Module:
    """Replace the final Linear of the head (see :func:`find_head`) with a fresh classifier
    for ``num_classes``: ``[Linear, ReLU] * hidden, Dropout(dropout), Linear``. The rest of the
    model is untouched; for a Hugging Face base model the pooler then outputs the logits (its
    tanh is dropped). A model with two heads (DeiT distilled, see :func:`find_heads`) gets two
    new ones, so the average it outputs has ``num_classes`` logits; auxiliary classifiers
    used in training (Inception v3, GoogLeNet) get a new final Linear too. Returns ``model``,
    changed in place.

    ``pool`` chooses how a Hugging Face text encoder (BERT family) pools its token states for
    the classifier (:mod:`netgraft.pooling`): ``"mean"`` over the attention mask,
    ``"first"`` token, or its own ``"pooler"`` (first token, Linear, tanh). ``None`` (the
    default) leaves the pooling as it is, because the right choice follows how the checkpoint
    was trained and replace_head should change only the classifier: BERT's own pooler was
    trained for next-sentence prediction, sentence-transformers checkpoints (all-MiniLM-L6-v2)
    with the mask mean. Measured (``bench/text_heads.py``: all-MiniLM-L6-v2, classifier only,
    800 political passages, 3 seeds): ``"mean"`` 0.653 ± 0.009, ``"first"`` 0.643 ± 0.015,
    ``"pooler"`` 0.642 ± 0.005 validation accuracy: pass ``pool="mean"`` for such checkpoints."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise SurgeryError(f"num_classes must be a positive integer; found {num_classes!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise SurgeryError(f"dropout must be in [0, 1); found {dropout!r}")
    if pool is not None and _pooled_classifier(model, pool, num_classes, hidden, float(dropout)):
        return model
    reset = getattr(model, "reset_classifier", None)
    if callable(reset) and callable(getattr(model, "get_classifier", None)):
        reset(num_classes)  # timm keeps its own bookkeeping (num_classes, pooling) in step
        if hidden is None and not dropout:
            log.info("reset the timm classifier to %d classes", num_classes)
            return model
    for name, head in find_heads(model):
        _replace_one(model, name, head, num_classes, hidden, float(dropout))
    _replace_auxiliary(model, num_classes)
    return model


def _pooled_classifier(
    model: nn.Module, pool: str, num_classes: int, hidden: Any, dropout: float
) -> bool:
    """Set the text pooling; for a base model, whose pooler output is its classifier, also
    put the new classifier after the pooling (returns True: nothing else to replace)."""
    found = text_encoder(model)
    if found is None or found[0] != "" or pool == "pooler":
        set_text_pooling(model, pool)
        return False
    config = model.config  # type: ignore[attr-defined]
    like = getattr(model._modules["pooler"], "dense", None)
    head = _new_head(config.hidden_size, num_classes, hidden, dropout, like)
    set_text_pooling(model, pool, then=head)
    _sync_num_classes(model, num_classes)
    return True


def _replace_auxiliary(model: nn.Module, num_classes: int) -> None:
    """Give the auxiliary classifiers (Inception v3's ``AuxLogits``, GoogLeNet's ``aux1`` and
    ``aux2``) a new final Linear for ``num_classes``, as the main head got."""
    for attr in AUX_HEADS:
        aux = model._modules.get(attr)
        if isinstance(aux, nn.Module) and any(isinstance(m, nn.Linear) for m in aux.modules()):
            _replace_one(model, attr, aux, num_classes, None, 0.0)


def _replace_one(
    model: nn.Module,
    name: str,
    head: nn.Module,
    num_classes: int,
    hidden: int | list[int] | None,
    dropout: float,
) -> nn.Module:
    """Replace the final Linear (or 1×1 convolution) of the head ``name``."""
    conv = _final_pointwise_conv(name, head)
    if conv is not None:
        return _replace_conv_classifier(model, *conv, num_classes, hidden, dropout)
    target, old = _final_linear(name, head)
    new = _new_head(old.in_features, num_classes, hidden, dropout, old)
    new.train(old.training)  # a model in eval mode stays deterministic
    model.set_submodule(target, new)
    if name == "pooler" and _is_hf_pooler(head) and isinstance(head.activation, nn.Tanh):
        head.activation = nn.Identity()
    _sync_num_classes(model, num_classes)
    log.info(
        "replaced %s (%d -> %d) with %s",
        target,
        old.in_features,
        old.out_features,
        type(new).__name__,
    )
    return model


class Truncated(nn.Module):
    """The output of one module of ``model``: runs the model and stops there. Used by
    :func:`truncate` where the graph cannot be traced; holds the whole model."""

    def __init__(self, model: nn.Module, at: str):
        super().__init__()
        self.model = model
        self.at = at

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        captured: dict[str, Any] = {}

        class _Stop(Exception):
            pass

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured["output"] = output
            raise _Stop

        handle = self.model.get_submodule(self.at).register_forward_hook(hook)
        try:
            self.model(*args, **kwargs)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "output" not in captured:
            raise SurgeryError(f"the forward pass never called {self.at!r}")
        out = captured["output"]
        if isinstance(out, tuple) and len(out) == 1:
            return out[0]
        return out


@legacy(at="after")
@recorded("truncate")
def truncate(model: nn.Module, after: Selector) -> nn.Module:
    """A feature extractor whose output is the output of the module ``after`` picks: the
    prefix of :func:`netgraft.cut` (sharing the model's weights), or, where the graph cannot
    be cut (untraceable Hugging Face models, a skip connection around it), the model run up
    to that module and stopped there. The old ``at=`` still works and warns."""
    name, _ = resolve_module(model, after, what="truncate point")
    try:
        prefix, _ = cut(model, after=name)
    except SurgeryError as exc:
        log.info("truncating by stopping the forward at %s (%s)", name, exc)
        prefix = Truncated(model, name)
    return prefix


class Stacked(nn.Module):
    """``top(base(x))``: layers attached on top of a model. When the base returns a tuple or
    a Hugging Face output, its first element (``last_hidden_state``, ``logits``) goes on."""

    def __init__(self, base: nn.Module, top: nn.Sequential):
        super().__init__()
        self.base = base
        self.top = top

    def forward(self, x: Any = None, **kwargs: Any) -> Any:
        out = self.base(**kwargs) if x is None else self.base(x, **kwargs)
        if isinstance(out, dict):  # also a Hugging Face ModelOutput, which holds no Nones
            out = next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return self.top(out)


def _serialize_attach(args: dict[str, Any]) -> dict[str, Any]:
    return {"modules": [module_spec(m) if isinstance(m, nn.Module) else m for m in args["modules"]]}


@recorded("attach", serialize=_serialize_attach)
def attach(model: nn.Module, *modules: nn.Module | dict[str, Any]) -> nn.Module:
    """Add layers on top of the model's output: returns a :class:`Stacked` (``model`` itself,
    extended, when it already is one). Modules may be ``torch.nn`` layers or their recipe
    specs (``{"type": "Linear", "args": {...}}``); other modules work but make the recipe
    unsaveable."""
    if not modules:
        raise SurgeryError("attach needs at least one module to add")
    built = []
    for m in modules:
        try:
            built.append(build_module(m))
        except RecipeError as exc:
            raise SurgeryError(f"cannot attach {m!r}: {exc}") from exc
    for m in built:
        m.train(model.training)
    if isinstance(model, Stacked):
        for m in built:
            model.top.append(m)
        return model
    return Stacked(model, nn.Sequential(*built))
