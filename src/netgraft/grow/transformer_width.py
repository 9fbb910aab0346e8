"""Widen a trained Hugging Face transformer without changing what it computes.

:func:`widen_transformer` grows the hidden size, the MLP width and the number of attention
heads of GPT-2, BERT-style encoders (BERT, MiniLM) and Llama-layout decoders (Llama and
SmolLM2, Mistral, Qwen2, Qwen3, Gemma 1/2/3) by copying units, as Net2WiderNet and bert2BERT's function-preserving
initialisation do:

- hidden size ×k: every hidden vector ``h`` becomes ``[h, h, …]`` (k copies). Embeddings,
  norms and every layer writing the hidden vector copy their outputs; every layer reading it
  divides its input weights among the copies. ``[h, h]`` has the mean and variance of ``h``
  (and its mean square, for RMSNorm), so norms with copied weights stay exact; that is why
  the hidden size must grow by a whole factor;
- attention heads ×k: whole heads are copied, so ``head_dim`` never changes (nor the score
  scale ``1/√head_dim`` or rotary frequencies). Query and key-value heads grow by the same
  factor, so under grouped-query attention each copy reads a copy of its own key-value
  head; the output projection divides its weights among a head's copies;
- MLP width: units are copied (round-robin, the remainder chosen at random with ``seed``)
  and the down-projection divides its weights among each unit's copies; exact for any
  elementwise activation or gate, and for any larger width.

A tied output head (GPT-2's ``lm_head`` is its token embedding) stays tied. It reads the k
copies of the final norm's output through the copied embedding, which would multiply the
logits by k, so the final norm's affine parameters are divided by k instead: that norm's
output is ``[h, h, …]/k`` and the logits are unchanged.

The Gemma variants: its RMSNorm scales by ``1 + w``, so the final norm's division is
``w' = (1 + w)/d − 1``; its token embeddings are multiplied by ``sqrt(hidden_size)``, so
the grown embedding is divided by ``sqrt(k)`` (and the stored ``embed_scale`` set to the
grown ``sqrt(hidden_size)``), which makes a tied head's division ``d = sqrt(k)``; its norms
after attention and MLP (Gemma 2/3) are copied like any other. Qwen3's and Gemma 3's
per-head query/key norms are kept (whole heads are copied).

Llama-family RMSNorms normalise in float32 whatever the model's dtype, and the mean over
``[h, h]`` rounds differently from the mean over ``h``: those models are verified at the
float32 tolerance (outputs agree to about 1e-6), also when the model is in float64.

With ``noise`` the division among copies uses random shares that still sum to one, which
leaves the function exact and lets training tell the copies apart.

Config fields and the sizes attention modules cache are updated, so ``generate()`` with a
key-value cache works and the model rebuilds from its config. This module never
approximates: a hidden size that is not a whole multiple, a change of ``head_dim``, another
model type, a parameter it has no rule for, are refused with :class:`SurgeryError` before
the model is touched.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import NetgraftError, SurgeryError
from ..recipe import PROBE_ARGUMENTS, recorded
from .carry import is_tracking, record_growth
from .verify import apply_growth, growth_probe

__all__ = ["widen_transformer"]

log = logging.getLogger(__name__)

# The role of one tensor dimension: (space, reads). A dimension in a space follows that
# space's copy map; a dimension that reads the space also divides its weights among the
# copies of each unit, so the copies add up to the original contribution.
Axis = tuple[str, bool] | None
_H, _H_IN = ("hidden", False), ("hidden", True)
_Q, _Q_IN = ("heads", False), ("heads", True)
_KV = ("kv_heads", False)
_QKV = ("qkv", False)  # GPT-2's fused query|key|value output
_M, _M_IN = ("mlp", False), ("mlp", True)

# task heads reading the final hidden vector, shared by the families
_HEAD_RULES: tuple[tuple[str, tuple[Axis, ...]], ...] = (
    (r"(lm_head|score|classifier|qa_outputs|cls\.seq_relationship)\.weight", (None, _H_IN)),
    (r"(lm_head|score|classifier|qa_outputs|cls\.seq_relationship)\.bias", (None,)),
)


@dataclass(frozen=True)
class _Family:
    """Where one family of Hugging Face models keeps its width."""

    name: str
    model_types: tuple[str, ...]
    fields: dict[str, str]  # size -> config attribute holding it
    derived_head_dim: bool  # head_dim is hidden_size / heads, not a config field
    rules: tuple[tuple[str, tuple[Axis, ...]], ...]  # parameter-name suffix (regex) -> axes
    final_norm: str  # the norm a tied output head reads (module-name suffix, regex)
    attrs: dict[str, str]  # size-caching attribute of its modules -> size
    norm_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma: 1 + w)
    computes_in: torch.dtype | None = None  # norms compute in it whatever the model's dtype
    scaled_embedding: str | None = None  # the embedding multiplied by sqrt(hidden_size)


_GPT2 = _Family(
    name="GPT-2",
    model_types=("gpt2",),
    fields={"hidden": "n_embd", "heads": "n_head", "intermediate": "n_inner"},
    derived_head_dim=True,
    rules=(
        (r"(wte|wpe)\.weight", (None, _H)),
        (r"(h\.\d+\.ln_[12]|ln_f)\.(weight|bias)", (_H,)),
        (r"h\.\d+\.attn\.c_attn\.weight", (_H_IN, _QKV)),
        (r"h\.\d+\.attn\.c_attn\.bias", (_QKV,)),
        (r"h\.\d+\.attn\.c_proj\.weight", (_Q_IN, _H)),
        (r"h\.\d+\.(attn|mlp)\.c_proj\.bias", (_H,)),
        (r"h\.\d+\.mlp\.c_fc\.weight", (_H_IN, _M)),
        (r"h\.\d+\.mlp\.c_fc\.bias", (_M,)),
        (r"h\.\d+\.mlp\.c_proj\.weight", (_M_IN, _H)),
        *_HEAD_RULES,
    ),
    final_norm=r"ln_f",
    attrs={"embed_dim": "hidden", "num_heads": "heads", "split_size": "attn"},
)

_BERT = _Family(
    name="BERT",
    model_types=("bert",),
    fields={
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "intermediate": "intermediate_size",
    },
    derived_head_dim=True,
    rules=(
        (r"embeddings\.(word|position|token_type)_embeddings\.weight", (None, _H)),
        (r"LayerNorm\.(weight|bias)", (_H,)),
        (r"attention\.self\.(query|key|value)\.weight", (_Q, _H_IN)),
        (r"attention\.self\.(query|key|value)\.bias", (_Q,)),
        (r"attention\.output\.dense\.weight", (_H, _Q_IN)),
        (r"intermediate\.dense\.weight", (_M, _H_IN)),
        (r"intermediate\.dense\.bias", (_M,)),
        (r"layer\.\d+\.output\.dense\.weight", (_H, _M_IN)),
        (r"(pooler|cls\.predictions\.transform)\.dense\.weight", (_H, _H_IN)),
        (r"(attention\.output|layer\.\d+\.output|pooler|transform)\.dense\.bias", (_H,)),
        (r"cls\.predictions\.decoder\.weight", (None, _H_IN)),
        (r"cls\.predictions\.(decoder\.)?bias", (None,)),
        *_HEAD_RULES,
    ),
    final_norm=r"cls\.predictions\.transform\.LayerNorm",
    attrs={"num_attention_heads": "heads", "all_head_size": "attn"},
)

_LLAMA = _Family(
    name="Llama-style",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    fields={
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "intermediate": "intermediate_size",
    },
    derived_head_dim=False,
    rules=(
        (r"embed_tokens\.weight", (None, _H)),
        (r"(input_layernorm|post_attention_layernorm|norm)\.weight", (_H,)),
        (r"self_attn\.[qk]_norm\.weight", (None,)),  # per head: whole heads are copied
        (r"self_attn\.q_proj\.weight", (_Q, _H_IN)),
        (r"self_attn\.q_proj\.bias", (_Q,)),
        (r"self_attn\.[kv]_proj\.weight", (_KV, _H_IN)),
        (r"self_attn\.[kv]_proj\.bias", (_KV,)),
        (r"self_attn\.o_proj\.weight", (_H, _Q_IN)),
        (r"(self_attn\.o_proj|mlp\.down_proj)\.bias", (_H,)),
        (r"mlp\.(gate|up)_proj\.weight", (_M, _H_IN)),
        (r"mlp\.(gate|up)_proj\.bias", (_M,)),
        (r"mlp\.down_proj\.weight", (_H, _M_IN)),
        *_HEAD_RULES,
    ),
    final_norm=r"norm",
    attrs={"hidden_size": "hidden", "intermediate_size": "intermediate"},
    computes_in=torch.float32,  # their RMSNorms normalise in float32 whatever the dtype
)

# Gemma 1/2/3: Llama's layout plus norms after attention and MLP (2, 3), RMSNorm scaling by
# 1 + w, and token embeddings multiplied by sqrt(hidden_size)
_GEMMA = dataclasses.replace(
    _LLAMA,
    name="Gemma",
    model_types=("gemma", "gemma2", "gemma3_text"),
    rules=(
        (r"(pre|post)_feedforward_layernorm\.weight", (_H,)),
        *_LLAMA.rules,
    ),
    norm_offset=1.0,
    scaled_embedding=r"embed_tokens\.weight",
)

_FAMILIES = (_GPT2, _BERT, _LLAMA, _GEMMA)
# outputs of a base model that are hidden vectors: compared on their first copy
_HIDDEN_OUTPUTS = ("last_hidden_state", "pooler_output")


@dataclass(frozen=True)
class _Sizes:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def attn(self) -> int:
        return self.heads * self.head_dim


def _suffix(pattern: str, name: str) -> bool:
    """Whether ``name`` ends with dotted parts matching ``pattern``."""
    return re.fullmatch(r"(?:.*\.)?(?:" + pattern + ")", name) is not None


def _family(model: nn.Module) -> tuple[_Family, Any]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in _FAMILIES:
        if model_type in family.model_types:
            return family, config
    known = ", ".join(t for f in _FAMILIES for t in f.model_types)
    raise SurgeryError(
        f"widen_transformer knows Hugging Face models of type {known}; "
        f"{type(model).__name__} is "
        + (f"of type {model_type!r}" if config is not None else "not a Hugging Face model")
        + " (use netgraft.widen for a single Linear or Conv2d)"
    )


def _read_sizes(config: Any, family: _Family) -> _Sizes:
    fields = family.fields
    hidden = int(getattr(config, fields["hidden"]))
    heads = int(getattr(config, fields["heads"]))
    kv_heads = getattr(config, fields.get("kv_heads", ""), None) or heads
    head_dim = getattr(config, fields.get("head_dim", ""), None) or hidden // heads
    # GPT-2 leaves n_inner None to mean 4 × n_embd
    intermediate = getattr(config, fields["intermediate"]) or 4 * hidden
    return _Sizes(hidden, heads, int(kv_heads), int(head_dim), int(intermediate))


def _check_growth_size(name: str, value: Any, old: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < old:
        raise SurgeryError(
            f"widen_transformer grows a model: {name} must be an integer of at least {old} "
            f"(its size now); found {value!r}"
        )
    return value


def _target_sizes(
    old: _Sizes, family: _Family, hidden: int | None, intermediate: int | None, heads: int | None
) -> _Sizes:
    """The sizes after growing, checked to be reachable exactly."""
    hidden = _check_growth_size("hidden_size", old.hidden if hidden is None else hidden, old.hidden)
    if hidden % old.hidden:
        raise SurgeryError(
            f"hidden_size must be a multiple of {old.hidden}: the hidden vector grows by "
            f"copying it whole ([h, h, ...]), the only way LayerNorm/RMSNorm over it stays "
            f"exact; found {hidden}"
        )
    default_heads = old.heads * (hidden // old.hidden)
    heads = _check_growth_size("num_heads", default_heads if heads is None else heads, old.heads)
    if heads % old.heads:
        raise SurgeryError(
            f"num_heads must be a multiple of {old.heads}: attention grows by copying whole "
            f"heads; found {heads}"
        )
    if family.derived_head_dim and heads * old.head_dim != hidden:
        raise SurgeryError(
            f"{family.name} derives head_dim = hidden_size / num_heads; hidden_size={hidden} "
            f"with num_heads={heads} would change it from {old.head_dim} to "
            f"{hidden / heads:g}, and copying whole heads keeps head_dim (the attention scale "
            f"1/sqrt(head_dim) depends on it); pass num_heads={hidden // old.head_dim}"
        )
    intermediate = _check_growth_size(
        "intermediate_size",
        old.intermediate if intermediate is None else intermediate,
        old.intermediate,
    )
    kv_heads = old.kv_heads * (heads // old.heads)
    return _Sizes(hidden, heads, kv_heads, old.head_dim, intermediate)


def _head_units(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _copy_maps(old: _Sizes, new: _Sizes, g: torch.Generator) -> dict[str, tuple[torch.Tensor, int]]:
    """For each space, ``(the old unit each new unit copies, the old size)``."""
    q = _head_units(torch.arange(new.heads) % old.heads, old.head_dim)
    kv = _head_units(torch.arange(new.kv_heads) % old.kv_heads, old.head_dim)
    rest = new.intermediate % old.intermediate
    extra = torch.randperm(old.intermediate, generator=g)[:rest]
    mlp = torch.cat([torch.arange(new.intermediate - rest) % old.intermediate, extra.sort().values])
    return {
        "hidden": (torch.arange(new.hidden) % old.hidden, old.hidden),
        "heads": (q, old.attn),
        "kv_heads": (kv, old.kv_heads * old.head_dim),
        "qkv": (torch.cat([q + i * old.attn for i in range(3)]), 3 * old.attn),
        "mlp": (mlp, old.intermediate),
    }


def _shares(
    t: torch.Tensor, dim: int, index: torch.Tensor, old: int, noise: float, g: torch.Generator
) -> torch.Tensor:
    """The share of each weight of ``t`` (copies along ``dim``) when it is divided among the
    copies of its unit: equal, or random shares that sum to one."""
    parts = torch.ones(t.shape, dtype=torch.float64)
    if noise > 0:
        parts = torch.exp(noise * torch.randn(t.shape, generator=g, dtype=torch.float64))
    shape = list(t.shape)
    shape[dim] = old
    total = torch.zeros(shape, dtype=torch.float64).index_add_(dim, index, parts)
    return parts / total.index_select(dim, index)


def _grown_tensor(
    p: torch.Tensor,
    axes: tuple[Axis, ...],
    maps: dict[str, tuple[torch.Tensor, int]],
    noise: float,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The grown value of ``p`` (in float64), and, when growth is being tracked
    (:func:`is_tracking`), for each of its elements the flat index of the old element it
    copies and the factor that element was multiplied by (else None: they cost as much
    memory as the grown model)."""
    track = is_tracking()
    out = p.detach().to(torch.float64)
    index = torch.arange(p.numel()).reshape(p.shape) if track else None
    for dim, axis in enumerate(axes):
        if axis is not None:
            out = out.index_select(dim, maps[axis[0]][0].to(out.device))
            if index is not None:
                index = index.index_select(dim, maps[axis[0]][0])
    factor = torch.ones(out.shape, dtype=torch.float64) if track else None
    for dim, axis in enumerate(axes):
        if axis is not None and axis[1]:
            share = _shares(out, dim, *maps[axis[0]], noise, g)
            out = out * share.to(out.device)
            factor = factor * share if factor is not None else None
    return out, index, factor


def _axes(family: _Family, name: str) -> tuple[Axis, ...] | None:
    return next((axes for pattern, axes in family.rules if _suffix(pattern, name)), None)


def _tied_embedding(model: nn.Module) -> nn.Parameter | None:
    """The input-embedding weight when the output head is tied to it."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    inp = get_in() if callable(get_in) else None
    out = get_out() if callable(get_out) else None
    if inp is None or out is None or getattr(out, "weight", None) is not inp.weight:
        return None
    return inp.weight


def _shared_parameters(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """Every place each parameter is held, ``(module, attribute, full name)``."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None and (id(module), attr) not in seen:
                seen.add((id(module), attr))
                name = f"{prefix}.{attr}" if prefix else attr
                owners.setdefault(id(p), []).append((module, attr, name))
    return owners


# (every place a parameter is held, its new value in its dtype, the old element and factor of
# each value: None unless growth is tracked)
Plan = list[
    tuple[list[tuple[nn.Module, str, str]], torch.Tensor, torch.Tensor | None, torch.Tensor | None]
]


def _plan(
    model: nn.Module, family: _Family, old: _Sizes, new: _Sizes, noise: float, seed: int
) -> Plan:
    """The new value of every parameter that changes, with every place that holds it;
    computed without touching the model. Raises :class:`SurgeryError` for a parameter no
    rule covers, or one whose shape contradicts the config."""
    g = torch.Generator().manual_seed(seed)
    maps = _copy_maps(old, new, g)
    tied = _tied_embedding(model)
    factor = new.hidden // old.hidden
    plan: Plan = []
    unknown: list[str] = []
    norm_found = False
    for owners in _shared_parameters(model).values():
        module, attr, name = owners[0]
        p = module._parameters[attr]
        if p is tied:  # the head reads it too; the final norm below makes up for that
            name = next(n for m, _, n in owners if isinstance(m, nn.Embedding))
        axes = _axes(family, name)
        if axes is None:
            unknown.append(name)
            continue
        if p is not tied and {_axes(family, n) for _, _, n in owners} != {axes}:
            raise SurgeryError(
                f"{name} is shared with {', '.join(n for _, _, n in owners[1:])} in roles "
                f"widen_transformer cannot grow together"
            )
        _check_shape(name, p, axes, maps)
        value, index, scale = _grown_tensor(p, axes, maps, noise, g)
        if family.scaled_embedding and _suffix(family.scaled_embedding, name):
            # the model multiplies it by sqrt(hidden_size), now sqrt(factor) times larger
            value, scale = _divided(value, scale, factor**0.5)
        if tied is not None and _suffix(family.final_norm + r"\.(weight|bias)", name):
            value, scale = _divided_norm(family, value, scale, factor)
            norm_found = True
        if any(a is not None for a in axes):
            plan.append((owners, value.to(p.dtype), index, scale))
    if unknown:
        raise SurgeryError(
            f"widen_transformer has no {family.name} rule for {len(unknown)} parameter(s) "
            f"({', '.join(unknown[:4])}), so it cannot widen them exactly; nothing was changed"
        )
    if tied is not None and not norm_found and factor > 1:
        raise SurgeryError(
            f"the output head is tied to the input embedding, and no final norm "
            f"({family.final_norm}) feeds it, so its logits could not be kept exact"
        )
    return plan


def _divided(
    value: torch.Tensor, scale: torch.Tensor | None, d: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return value / d, None if scale is None else scale / d


def _divided_norm(
    family: _Family, value: torch.Tensor, scale: torch.Tensor | None, factor: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The final norm's grown weight (or bias) and factor, its output divided so that a tied
    head reading ``factor`` copies (of an embedding scaled down by sqrt(factor) where the
    family scales it up) gives the same logits. A ``1 + w`` norm gets ``w' = (1 + w)/d − 1``;
    its recorded factor ``1/d`` is then the derivative, which is what moments follow."""
    d = factor**0.5 if family.scaled_embedding else float(factor)
    offset = family.norm_offset
    return (offset + value) / d - offset, None if scale is None else scale / d


def _check_shape(name: str, p: torch.Tensor, axes: tuple[Axis, ...], maps: dict) -> None:
    expected = [maps[a[0]][1] if a is not None else p.shape[d] for d, a in enumerate(axes)]
    if p.dim() != len(axes) or list(p.shape) != expected:
        raise SurgeryError(
            f"{name} has shape {tuple(p.shape)}, but the model's config implies "
            f"{tuple(expected)}; widen_transformer reads the sizes from the config"
        )


# size attributes torch and transformers layers cache beside their weights
_LAYER_SIZES = ("in_features", "out_features", "embedding_dim", "normalized_shape", "nf", "nx")


def _sync_sizes(model: nn.Module, family: _Family, new: _Sizes) -> None:
    """Set the sizes layers and attention modules cache to what their weights now hold."""
    for m in model.modules():
        weight = m._parameters.get("weight")
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = weight.shape
        elif isinstance(m, nn.Embedding):
            m.embedding_dim = weight.shape[1]
        elif isinstance(m, nn.LayerNorm) and weight is not None:
            m.normalized_shape = tuple(weight.shape)
        elif type(m).__name__ == "Conv1D":  # transformers' transposed Linear (GPT-2)
            m.nx, m.nf = weight.shape
        for attr, size in family.attrs.items():
            if isinstance(m.__dict__.get(attr), int):
                setattr(m, attr, getattr(new, size))


def _rescale_embeddings(model: nn.Module, hidden: int) -> None:
    """Set the sqrt(hidden_size) factor scaled embeddings hold (transformers'
    ``...ScaledWordEmbedding``: ``embed_scale`` buffer and ``scalar_embed_scale``) to what
    the grown config gives, as a model rebuilt from it would hold."""
    for m in model.modules():
        buffer = m._buffers.get("embed_scale")
        if buffer is not None and "scalar_embed_scale" in m.__dict__:
            m.scalar_embed_scale = hidden**0.5
            m._buffers["embed_scale"] = torch.full_like(buffer, hidden**0.5)


def _apply(
    model: nn.Module, family: _Family, config: Any, plan: Plan, new: _Sizes
) -> Callable[[], None]:
    """Put the planned parameters in place, resize cached sizes and the config; return
    what undoes it all."""
    attrs = (*_LAYER_SIZES, *family.attrs, "scalar_embed_scale")
    saved = [
        (
            m,
            dict(m._parameters),
            dict(m._buffers),
            {a: m.__dict__[a] for a in attrs if a in m.__dict__},
        )
        for m in model.modules()
    ]
    old_config = {f: getattr(config, f, None) for f in family.fields.values()}
    for owners, value, index, scale in plan:
        module, attr, _ = owners[0]
        old = module._parameters[attr]
        param = nn.Parameter(value, requires_grad=old.requires_grad)
        for module, attr, _ in owners:
            module._parameters[attr] = param
        if index is not None:
            record_growth(param, old, lambda t, index=index: t.flatten()[index], factor=scale)
    _sync_sizes(model, family, new)
    if family.scaled_embedding:
        _rescale_embeddings(model, new.hidden)
    sizes = dataclasses.asdict(new)
    for size, field in family.fields.items():
        setattr(config, field, sizes[size])

    def undo() -> None:
        for m, params, buffers, cached in saved:
            m._parameters.update(params)
            m._buffers.update(buffers)
            m.__dict__.update(cached)
        for field, value in old_config.items():
            setattr(config, field, value)

    return undo


class _FirstCopy(nn.Module):
    """The widened model with its hidden-vector outputs cut to their first copy, so they
    can be compared with the original model's."""

    def __init__(self, model: nn.Module, hidden: int):
        super().__init__()
        self.model = model
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        if not hasattr(out, "items"):
            return out
        return {
            k: v[..., : self.hidden] if k in _HIDDEN_OUTPUTS and torch.is_tensor(v) else v
            for k, v in out.items()
        }


def _log_widening(family: _Family, old: _Sizes, new: _Sizes, *, tied: bool) -> None:
    log.info(
        "widen_transformer: %s hidden %d -> %d, heads %d -> %d (key-value %d -> %d, head_dim "
        "%d kept), MLP %d -> %d%s",
        family.name,
        old.hidden,
        new.hidden,
        old.heads,
        new.heads,
        old.kv_heads,
        new.kv_heads,
        new.head_dim,
        old.intermediate,
        new.intermediate,
        f"; tied output head kept tied, final norm divided by {new.hidden // old.hidden}"
        if tied and new.hidden > old.hidden
        else "",
    )


@recorded("widen_transformer", omit=PROBE_ARGUMENTS)
def widen_transformer(
    model: nn.Module,
    *,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    noise: float = 0.0,
    seed: int = 0,
    example_input: Any = None,
    verify: bool = True,
    atol: float | None = None,
) -> nn.Module:
    """Widen a Hugging Face GPT-2, BERT-style or Llama-layout model (Llama, SmolLM2, Mistral,
    Qwen2/3, Gemma 1/2/3; see the module docstring for each family's norms and embeddings)
    so it computes exactly
    what it computed before; return the model, changed in place (parameters are replaced:
    build the optimizer after growing, or grow with :class:`netgraft.Grow` /
    :func:`netgraft.grow.grow_with_optimizer`, which carry its state).

    ``hidden_size`` must be a multiple of the current one (each hidden vector becomes k
    copies of itself); ``num_heads`` a multiple of the current count (whole heads are
    copied, key-value heads by the same factor; by default heads grow with the hidden size,
    keeping ``head_dim``, which never changes); ``intermediate_size`` any larger MLP width.
    A tied output head stays tied, with the final norm's output divided by the hidden
    factor (see the module docstring). ``noise`` > 0 divides weights among copies in random
    shares summing to one (``seed``). The config is updated. A base model's hidden outputs
    (``last_hidden_state``, ``pooler_output``) hold the copies side by side: their first
    ``hidden_size`` (old) units are the original values. Verification works as in
    :func:`netgraft.deepen` (random token ids when no ``example_input`` is given).
    """
    family, config = _family(model)
    if hidden_size is None and intermediate_size is None and num_heads is None:
        raise NetgraftError(
            "widen_transformer needs at least one of hidden_size=, intermediate_size=, num_heads="
        )
    if noise < 0:
        raise NetgraftError(f"noise must be >= 0; found {noise}")
    old = _read_sizes(config, family)
    new = _target_sizes(old, family, hidden_size, intermediate_size, num_heads)
    plan = _plan(model, family, old, new, noise, seed)
    probe = growth_probe(
        model,
        example_input,
        what="widen_transformer",
        verify=verify,
        atol=atol,
        computes_in=family.computes_in,
    )
    apply_growth(
        model,
        probe,
        lambda: _apply(model, family, config, plan, new),
        view=lambda grown: _FirstCopy(grown, old.hidden),
    )
    _log_widening(family, old, new, tied=_tied_embedding(model) is not None)
    return model
