"""Check that a grown model computes what the model before it computed.

:func:`verify_equivalence` runs both models on the same inputs (eval mode, no gradients,
modes restored) and returns the largest absolute difference between their outputs.

Every growth operation goes through the same verified-growth steps, written once here:
:func:`growth_probe` picks the probe batch (none while a recipe replays or with
``verify=False``), :func:`apply_growth` snapshots the model, runs the operation's change
(which returns its undo), checks the result with :func:`check_growth` (the change is undone
and :class:`EquivalenceError` raised with the measured max |Δ| when it exceeds the
tolerance) and logs what it measured. A growth that is not meant to preserve the function
(``stack_blocks``) measures and logs the change of the probe loss instead of checking it.
Nothing here changes a model's weights except through the change it is given.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EquivalenceError, NetgraftError, SurgeryError
from ..layers import call_model, evaluating
from ..recipe import is_replaying

__all__ = [
    "GrowthCheck",
    "GrowthProbe",
    "apply_growth",
    "check_growth",
    "default_atol",
    "growth_probe",
    "snapshot",
    "verify_equivalence",
]

log = logging.getLogger(__name__)

# "Exact" in float64; in float32 the rounding of reordered sums (widening splits a weight
# into copies) stays far below 1e-5 of the output's magnitude.
_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-1}


def _tensors(output: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Floating-point tensors in a (nested) model output, keyed by their path."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point() or output.is_complex():
            yield path, output
    elif isinstance(output, dict) or hasattr(output, "keys") and hasattr(output, "items"):
        for key, value in output.items():
            yield from _tensors(value, f"{path}.{key}" if path else str(key))
    elif isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            yield from _tensors(value, f"{path}[{i}]")


def _run(model: nn.Module, inputs: Any) -> dict[str, torch.Tensor]:
    with evaluating(model):
        return dict(_tensors(call_model(model, inputs)))


def _max_delta(out_before: dict, out_after: dict) -> tuple[float, list[str]]:
    common = [k for k, t in out_before.items() if k in out_after and out_after[k].shape == t.shape]
    if not common:
        raise EquivalenceError(
            f"the two models' outputs have nothing in common to compare: before gives "
            f"{sorted(out_before) or 'no tensors'}, after gives {sorted(out_after) or 'no tensors'}"
        )
    delta = 0.0
    for key in common:
        a, b = out_before[key], out_after[key]
        if a.numel():
            diff = (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()
            delta = max(delta, diff if diff == diff else float("inf"))  # NaN is a failure
    return delta, common


def verify_equivalence(
    before: nn.Module, after: nn.Module, inputs: Any, *, atol: float | None = None
) -> float:
    """The largest absolute difference between the outputs of ``before`` and ``after`` on
    ``inputs`` (a tensor, a tuple of arguments or a dict of keyword arguments), both run in
    eval mode without gradients. Every floating-point tensor both outputs hold at the same
    place with the same shape is compared (HF ``logits``, ``last_hidden_state``, ...).

    With ``atol`` it raises :class:`EquivalenceError` when the difference exceeds it.
    """
    delta, common = _max_delta(_run(before, inputs), _run(after, inputs))
    if atol is not None and delta > atol:
        raise EquivalenceError(
            f"the outputs differ by max |Δ| = {delta:.3g}, more than atol = {atol:.3g} "
            f"(compared: {', '.join(common[:4])})"
        )
    return delta


def default_atol(model: nn.Module) -> float:
    """The tolerance growth operations verify with: 1e-10 in float64, 1e-5 in float32."""
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    return _ATOL.get(dtype, 1e-5)


def snapshot(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` to compare the grown model against."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # a model holding something uncopyable cannot be verified
        raise NetgraftError(
            f"cannot copy {type(model).__name__} to verify the growth ({type(exc).__name__}: "
            f"{exc}); pass verify=False to skip the check"
        ) from exc


def check_growth(
    before: nn.Module,
    after: nn.Module,
    inputs: Any,
    *,
    atol: float | None,
    what: str,
    undo: Callable[[], None] | None = None,
    computes_in: torch.dtype | None = None,
) -> float:
    """Verify a growth operation and return the measured max |Δ|.

    The tolerance is ``atol``, by default :func:`default_atol` scaled by the output's
    magnitude when that exceeds 1 (that of ``computes_in`` when the model computes parts of
    its function in a coarser precision than its parameters', as Gemma's norms do in
    float32). When the outputs differ by more, ``undo`` (which puts
    the model back as it was) runs and :class:`EquivalenceError` names ``what``.
    """
    out_before = _run(before, inputs)
    try:
        out_after = _run(after, inputs)
    except Exception as exc:
        if undo is not None:
            undo()
        raise SurgeryError(
            f"{what} produced a model that no longer runs on the probe batch "
            f"({type(exc).__name__}: {exc}); the model was left unchanged"
        ) from exc
    delta, _ = _max_delta(out_before, out_after)
    tol = default_atol(after) if atol is None else atol
    if atol is None and computes_in is not None:
        tol = max(tol, _ATOL.get(computes_in, tol))
    if atol is None:
        scale = max((t.abs().max().item() for t in out_before.values() if t.numel()), default=1.0)
        tol *= max(1.0, scale)
    if delta > tol:
        if undo is not None:
            undo()
        raise EquivalenceError(
            f"{what} changed the model's outputs by max |Δ| = {delta:.3g} on the probe batch "
            f"(tolerance {tol:.3g}); the model was left unchanged"
            + ("" if undo is not None else " (could not be undone: it is grown)")
        )
    return delta


def probe_input(model: nn.Module, example_input: Any = None, *, what: str) -> Any:
    """The batch a growth operation traces and verifies with: ``example_input`` when given,
    else a small random one guessed from the model (token ids for a Hugging Face text model,
    ``(2, in_features)`` when the first layer is a Linear, ``(2, C, 32, 32)`` for a Conv2d).
    Raises :class:`SurgeryError` asking for ``example_input`` when no guess runs."""
    if example_input is not None:
        return example_input
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    guess: Any = None
    config = getattr(model, "config", None)
    if config is not None and getattr(model, "main_input_name", None) == "input_ids":
        vocab = max(int(getattr(config, "vocab_size", 100)), 2)
        ids = torch.randint(0, vocab, (2, 8), generator=g).to(device)
        guess = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
        if isinstance(first, nn.Linear):
            guess = torch.randn(2, first.in_features, generator=g, dtype=dtype).to(device)
        elif isinstance(first, nn.Conv2d):
            guess = torch.randn(2, first.in_channels, 32, 32, generator=g, dtype=dtype).to(device)
    if guess is not None:
        try:
            _run(model, guess)
            return guess
        except Exception:
            pass
    raise SurgeryError(
        f"{what} needs an example batch to trace and verify {type(model).__name__}, and none "
        f"could be guessed; pass example_input= (a tensor, tuple of arguments or dict)"
    )


@dataclass(frozen=True)
class GrowthProbe:
    """How one growth operation checks itself: its name (``what``, used in messages), the
    probe batch (None when nothing is checked), the tolerance (None: the default) and the
    coarsest precision the model computes in, when coarser than its parameters'."""

    what: str
    inputs: Any
    check: bool
    atol: float | None = None
    computes_in: torch.dtype | None = None


def growth_probe(
    model: nn.Module,
    example_input: Any,
    *,
    what: str,
    verify: bool,
    atol: float | None = None,
    needs_inputs: bool = False,
    computes_in: torch.dtype | None = None,
) -> GrowthProbe:
    """The probe a growth operation uses: it checks itself when ``verify`` is set and no
    recipe is replaying (a replay loads the weights afterwards, so a check on the fresh base
    would be meaningless). The batch is :func:`probe_input`'s, taken also when the operation
    ``needs_inputs`` to trace the model."""
    check = verify and not is_replaying()
    inputs = probe_input(model, example_input, what=what) if check or needs_inputs else None
    return GrowthProbe(what, inputs, check, atol, computes_in)


@dataclass(frozen=True)
class GrowthCheck:
    """What a growth measured on its probe batch: the largest change of the outputs, and,
    for a language model probed with token ids, the next-token loss before and after."""

    max_delta: float
    loss_before: float | None = None
    loss_after: float | None = None


def apply_growth(
    model: nn.Module,
    probe: GrowthProbe,
    change: Callable[[], Callable[[], None]],
    *,
    view: Callable[[nn.Module], nn.Module] | None = None,
    exact: bool = True,
) -> GrowthCheck | None:
    """Run ``change`` (which grows ``model`` in place and returns what undoes it) as a
    verified growth: snapshot the model first, then compare the grown model (seen through
    ``view`` when its outputs must be cut to compare) with the snapshot on the probe batch.

    ``exact``: the change is undone and :class:`EquivalenceError` raised when the outputs
    differ by more than the tolerance (:func:`check_growth`). Not ``exact``: the change of
    outputs and of the probe loss is measured and logged, never refused. Returns what was
    measured, or None when the probe does not check (``verify=False``, a replay)."""
    before = snapshot(model) if probe.check else None
    undo = change()
    if before is None:
        return None
    after = view(model) if view is not None else model
    if exact:
        delta = check_growth(
            before,
            after,
            probe.inputs,
            atol=probe.atol,
            what=probe.what,
            undo=undo,
            computes_in=probe.computes_in,
        )
        log.info("%s: verified on the probe batch, max |Δ| = %.3g", probe.what, delta)
        return GrowthCheck(delta)
    out_before = _run(before, probe.inputs)
    try:
        out_after = _run(after, probe.inputs)
    except Exception as exc:
        undo()
        raise SurgeryError(
            f"{probe.what} produced a model that no longer runs on the probe batch "
            f"({type(exc).__name__}: {exc}); the model was left unchanged"
        ) from exc
    delta = _max_delta(out_before, out_after)[0]
    result = GrowthCheck(
        delta, _lm_loss(out_before, probe.inputs), _lm_loss(out_after, probe.inputs)
    )
    log.info(
        "%s: not function-preserving; on the probe batch max |Δ| = %.3g, next-token loss %s -> %s",
        probe.what,
        delta,
        *(f"{v:.4f}" if v is not None else "n/a" for v in (result.loss_before, result.loss_after)),
    )
    return result


def _lm_loss(outputs: dict[str, torch.Tensor], inputs: Any) -> float | None:
    """Next-token cross-entropy of ``logits`` on the probe's ``input_ids`` (None when the
    probe is not a language model's)."""
    logits = outputs.get("logits", outputs.get(""))
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not torch.is_tensor(ids) or ids.is_floating_point():
        return None
    if logits is None or ids.shape[-1] < 2 or logits.dim() != 3:
        return None
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float64)
    return float(F.cross_entropy(pred, ids[:, 1:].reshape(-1).to(pred.device)))
