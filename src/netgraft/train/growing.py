"""Grow a model in the middle of a training run, carrying the optimizer's state across.

:class:`Grow` is a :func:`netgraft.fit` callback: before epoch ``at_epoch`` it runs a growth
operation (``"expand_blocks"``, ``"widen_transformer"``, ``"deepen"``, ``"widen"``,
``"stack_blocks"`` or any callable ``op(model, **kwargs)``), checks that the loss on a fixed
probe batch is the same right after as right before (and reports both; ``stack_blocks``,
which is not function-preserving, is only reported), and rewrites the optimizer in place so its
scheduler continues: every group keeps its hyper-parameters (``lr``, ``initial_lr``,
weight decay, ...), parameters the growth kept keep their state, parameters it replaced get
their old state mapped through the growth, and new parameters start with none (zero
moments, step 0), in the group their block has (:func:`netgraft.param_groups`' names).
:func:`grow_with_optimizer` does the same outside ``fit``.

How moments are mapped. A growth operation records, for each replaced parameter, the old
element each new element copies (``i = π(j)``) and the factor ``c_j`` it was multiplied
by (:mod:`netgraft.grow.carry`): a copied row has ``c = 1``, a weight reading a unit that
now has ``k`` copies ``c = 1/k`` (its share), GPT-2's final norm before a tied head ``1/k``.
Since the grown model computes the same function, ``F'(T(w)) = F(w)`` for every ``w``, so
the chain rule gives ``Σ_{j: π(j)=i} c_j g'_j = g_i``; when the copies are symmetric (equal
shares, ``noise=0``) all copies of an element get the same gradient, so
``g'_j = a_j g_i`` with ``a_j = 1 / Σ_{π(j')=i} c_j'``: a copied output row gets ``1/k`` of
the gradient (its consumers read it with a ``1/k`` share), a divided input weight the same
gradient (it reads the same value), GPT-2's tied final norm ``1`` (``k`` copies of
``1/k``). Moments are sums of past gradients (and of their squares), so Adam's ``exp_avg``
and SGD's ``momentum_buffer`` map like the gradient (``m'_j = a_j m_i``) and
``exp_avg_sq`` / ``max_exp_avg_sq`` like its square (``v'_j = a_j² v_i``): exactly the
moments the grown model would hold had it seen the same batches at the grown images of the
same weights. Step counts are kept. Where an operation knows the gradient factor exactly
it records it (``widen``: a copy's share in its consumer, also with ``noise``). With
``noise`` in ``widen_transformer`` the shares differ per weight and no elementwise map is
exact; the equal-share map is used then. Weight decay inside the gradient (Adam's or
SGD's ``weight_decay``) is mapped with it, which is exact only when it is decoupled
(AdamW) or zero.

The growth is recorded in the model's recipe, and checkpoints carry the recipe, so
``fit(..., run=RunOptions(resume=...))`` on a fresh model replays it before loading the
grown weights (:mod:`netgraft.train.checkpoint`). This module never trains.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..data import to_device
from ..errors import EquivalenceError, NetgraftError, SurgeryError
from ..grow.carry import ParamGrowth, tracking
from ..grow.verify import default_atol, probe_input
from ..layers import device_of, evaluating
from ..optim import param_groups
from ..recipe import operation
from .batches import loss_fn, predictions, split_batch
from .callbacks import Callback

__all__ = ["Grow", "GrowthEvent", "grow_with_optimizer"]

log = logging.getLogger("netgraft.train")

GROWTH_OPERATIONS = ("expand_blocks", "widen_transformer", "deepen", "widen", "stack_blocks")
# growth operations that change the function on purpose: their loss jump is reported, not checked
NOT_PRESERVING = ("stack_blocks",)
# optimizer state entries that sum gradients, sum squared gradients, or count steps
_FIRST = ("exp_avg", "momentum_buffer")
_SECOND = ("exp_avg_sq", "max_exp_avg_sq")
_KEPT = ("step",)


@dataclass
class GrowthEvent:
    """What one growth did: parameter counts, how the optimizer's state was carried
    (``mapped`` replaced parameters, ``kept`` unchanged ones, ``new`` ones with fresh state,
    ``dropped`` optimizer parameters the grown model no longer has), and the probe loss
    before and after (None without a probe batch with targets) with the largest difference
    between the model's predictions."""

    op: str
    epoch: int
    params_before: int
    params_after: int
    mapped: int = 0
    kept: int = 0
    new: int = 0
    dropped: int = 0
    loss_before: float | None = None
    loss_after: float | None = None
    max_delta: float | None = None

    def describe(self) -> str:
        """One line for the run's report."""
        probe = (
            f"probe loss {self.loss_before:.6f} -> {self.loss_after:.6f}"
            if self.loss_before is not None and self.loss_after is not None
            else "probe"
        )
        return (
            f"Grow: {self.op} before epoch {self.epoch + 1}: {self.params_before:,} -> "
            f"{self.params_after:,} parameters; {probe} (predictions max |Δ| = "
            f"{self.max_delta:.3g}); optimizer state: {self.mapped} mapped, {self.kept} kept, "
            f"{self.new} new" + (f", {self.dropped} dropped" if self.dropped else "")
        )


def _resolve_op(op: str | Callable[..., Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    """The growth function ``op`` names, with ``kwargs`` checked against its signature."""
    if callable(op):
        return op
    if op not in GROWTH_OPERATIONS:
        raise SurgeryError(
            f"Grow knows the growth operations {', '.join(GROWTH_OPERATIONS)} (or takes a "
            f"function op(model, **kwargs)); found {op!r}"
        )
    fn = operation(op)
    params = list(inspect.signature(fn).parameters)[1:]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise SurgeryError(
            f"{op} takes {', '.join(params)}; Grow got unknown argument(s) {', '.join(unknown)}"
        )
    return fn


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose state this module cannot map, before anything changes."""
    known = {*_FIRST, *_SECOND, *_KEPT}
    found = {k for st in optimizer.state.values() for k in st}
    if found - known:
        raise SurgeryError(
            f"Grow maps the state of Adam, AdamW and SGD ({', '.join(sorted(known))}); "
            f"{type(optimizer).__name__} also keeps {', '.join(sorted(found - known))}, which "
            f"it cannot carry across a growth"
        )


def _mapped_state(state: dict[str, Any], growth: ParamGrowth) -> dict[str, Any]:
    """``state`` of ``growth.old`` mapped onto ``growth.new`` (see the module docstring)."""
    grad = growth.grad
    if grad is None:
        total = torch.zeros(growth.old.numel(), dtype=torch.float64)
        total.index_add_(0, growth.index.flatten(), growth.factor.flatten())
        total = torch.where(total == 0, torch.inf, total)
        grad = 1.0 / total[growth.index]
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in _KEPT or not torch.is_tensor(value):
            out[key] = value.clone() if torch.is_tensor(value) else value
            continue
        power = 1 if key in _FIRST else 2
        picked = value.detach().to(torch.float64).flatten()[growth.index.to(value.device)]
        out[key] = (picked * grad.to(value.device) ** power).to(value.dtype)
    return out


_NO_DECAY = " (no decay)"


def _groups_by_block(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, str]:
    """For each trainable parameter name, the name of the group :func:`netgraft.param_groups`
    puts it in (how ``fit`` builds its optimizer); empty when the optimizer's groups are not
    named that way."""
    names = {g.get("name") for g in optimizer.param_groups}
    if None in names:
        return {}
    decay = any(str(n).endswith(_NO_DECAY) for n in names)
    groups = param_groups(model, 1.0, weight_decay=1.0 if decay else 0.0)
    return {pn: g["name"] for g in groups for pn in g["param_names"]}


def _carry(
    optimizer: torch.optim.Optimizer, model: nn.Module, records: list[ParamGrowth], event: Any
) -> None:
    """Rewrite ``optimizer``'s groups and state in place for the grown ``model``."""
    group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    states = {id(p): st for p, st in optimizer.state.items()}
    old_ids = set(group_of)
    mapped: set[int] = set()
    for growth in records:  # in order, so a parameter grown twice maps through both
        gi = group_of.get(id(growth.old))
        if gi is None:
            continue  # not trained (frozen): nothing to carry
        group_of[id(growth.new)] = gi
        mapped.add(id(growth.new))
        if states.get(id(growth.old)):
            states[id(growth.new)] = _mapped_state(states[id(growth.old)], growth)
    wanted = _groups_by_block(optimizer, model)
    index = {g.get("name"): gi for gi, g in enumerate(optimizer.param_groups)}
    members: list[list[tuple[str, nn.Parameter]]] = [[] for _ in optimizer.param_groups]
    previous = {False: 0, True: 0}  # the group of the last parameter of each decay kind
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = wanted.get(name, "").endswith(_NO_DECAY)
        gi = group_of.get(id(p))
        if gi is None:  # new: its block's group, else (a block without one) its neighbour's
            gi = index.get(wanted.get(name), previous[kind])
            event.new += 1
        elif id(p) in old_ids:
            event.kept += 1
        elif id(p) in mapped:
            event.mapped += 1
        previous[kind] = gi
        members[gi].append((name, p))
    present = {id(p) for group in members for _, p in group}
    event.dropped = len(old_ids - present - {id(r.old) for r in records})
    for group, chosen in zip(optimizer.param_groups, members, strict=True):
        group["params"] = [p for _, p in chosen]
        if "param_names" in group:
            group["param_names"] = [n for n, _ in chosen]
    carried = {p: states[id(p)] for group in members for _, p in group if states.get(id(p))}
    optimizer.state.clear()
    optimizer.state.update(carried)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def grow_with_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    op: str | Callable[..., Any],
    *,
    epoch: int = 0,
    **op_kwargs: Any,
) -> GrowthEvent:
    """Grow ``model`` in place with ``op`` (a growth operation's name or a function
    ``op(model, **op_kwargs)``) and rewrite ``optimizer`` in place to train the grown model:
    state of kept parameters kept, of replaced ones mapped through the growth (see the
    module docstring), none for new ones; groups keep their settings, so a scheduler bound
    to the optimizer continues. Raises :class:`SurgeryError` before anything changes for an
    unknown operation or argument, or an optimizer whose state cannot be mapped; the
    growth operation itself refuses what it cannot do exactly before touching the model."""
    fn = _resolve_op(op, op_kwargs)
    _check_optimizer(optimizer)
    name = op if isinstance(op, str) else getattr(op, "__name__", type(op).__name__)
    event = GrowthEvent(op=name, epoch=epoch, params_before=_count(model), params_after=0)
    with tracking() as records:
        result = fn(model, **op_kwargs)
    if isinstance(result, nn.Module) and result is not model:
        raise SurgeryError(
            f"Grow needs a growth that changes the model in place; {name} returned a new "
            f"{type(result).__name__}"
        )
    _carry(optimizer, model, records, event)
    event.params_after = _count(model)
    return event


class Grow(Callback):
    """Grow the model before epoch ``at_epoch`` (0-based: after ``at_epoch`` epochs) of
    :func:`netgraft.fit`, carrying the optimizer's state across (see the module docstring).

    ``op`` is ``"expand_blocks"``, ``"widen_transformer"``, ``"deepen"``, ``"widen"``,
    ``"stack_blocks"`` (not function-preserving: its loss jump is reported, not checked) or
    a function ``op(model, **op_kwargs)``; ``op_kwargs`` go to it. ``probe`` is a batch
    ``(inputs, targets)`` (or a dict with ``labels``) whose loss under ``loss`` (fit's
    default: cross-entropy) is measured right before and right after the growth and must
    agree within ``probe_atol`` (by default 1e-10 in float64, 1e-5 in float32, relative to
    the loss when it exceeds 1), else :class:`EquivalenceError`; without ``probe`` the
    model's predictions on the growth operation's own probe batch are compared. The
    probe's inputs are the operation's ``example_input`` unless given. The result is
    reported as one line and kept in :attr:`events`; the callback's state (grown or not)
    is saved in checkpoints, and the model's recipe records the growth, so a resumed run
    rebuilds the grown model and does not grow it twice.

    Example::

        >>> netgraft.fit(model, train, val, epochs=8, lr=3e-4, loss=lm_loss,
        ...              callbacks=[netgraft.Grow(at_epoch=3, op="expand_blocks", every=1)])
    """

    def __init__(
        self,
        *,
        at_epoch: int,
        op: str | Callable[..., Any],
        probe: Any = None,
        loss: Any = None,
        probe_atol: float | None = None,
        **op_kwargs: Any,
    ):
        if isinstance(at_epoch, bool) or not isinstance(at_epoch, int) or at_epoch < 0:
            raise NetgraftError(f"at_epoch must be a non-negative integer; found {at_epoch!r}")
        _resolve_op(op, op_kwargs)
        self.at_epoch, self.op, self.op_kwargs = at_epoch, op, dict(op_kwargs)
        self.probe, self.loss, self.probe_atol = probe, loss_fn(loss), probe_atol
        self.done = False
        self.events: list[GrowthEvent] = []

    def on_train_begin(self, state: Any) -> None:
        if getattr(state, "world_size", 1) > 1:
            raise NetgraftError(
                f"Grow changes the model's parameters, which a data-parallel run of "
                f"{state.world_size} processes cannot follow; grow in a run of one process "
                f"(its checkpoints rebuild the grown model on resume)"
            )

    def on_epoch_begin(self, state: Any) -> None:
        if self.done or state.epoch < self.at_epoch:
            return
        event = self.grow(state.model, state.optimizer, state.epoch)
        state.report(event.describe())

    def grow(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> GrowthEvent:
        """Grow ``model`` now, carry ``optimizer``'s state and check the probe loss."""
        inputs, targets = self._probe_batch(model)
        kwargs = dict(self.op_kwargs)
        if isinstance(self.op, str):
            kwargs.setdefault("example_input", inputs)
        loss_before, out_before = self._measure(model, inputs, targets)
        event = grow_with_optimizer(model, optimizer, self.op, epoch=epoch, **kwargs)
        loss_after, out_after = self._measure(model, inputs, targets)
        event.max_delta = (out_before.double() - out_after.double()).abs().max().item()
        event.loss_before, event.loss_after = loss_before, loss_after
        self._check(model, event)
        self.done = True
        self.events.append(event)
        log.info("%s", event.describe())
        return event

    def _probe_batch(self, model: nn.Module) -> tuple[Any, Any]:
        if self.probe is None:
            return probe_input(model, None, what="Grow"), None
        return split_batch(to_device(self.probe, device_of(model)))

    def _measure(
        self, model: nn.Module, inputs: Any, targets: Any
    ) -> tuple[float | None, torch.Tensor]:
        with evaluating(model):
            out = predictions(model, inputs)
            loss = float(self.loss(out, targets)) if targets is not None else None
        return loss, out

    def _check(self, model: nn.Module, event: GrowthEvent) -> None:
        if event.loss_before is None or event.loss_after is None or self.op in NOT_PRESERVING:
            return
        tol = self.probe_atol
        if tol is None:
            tol = default_atol(model) * max(1.0, abs(event.loss_before))
        delta = abs(event.loss_after - event.loss_before)
        if not delta <= tol:
            raise EquivalenceError(
                f"after {event.op} the probe loss is {event.loss_after:.8g}, before it was "
                f"{event.loss_before:.8g} (|Δ| = {delta:.3g} > {tol:.3g}); the model is grown"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "events": [asdict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state.get("done", False))
        self.events = [GrowthEvent(**e) for e in state.get("events", [])]
