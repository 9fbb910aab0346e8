"""Which layers to tune, without a sweep: relative gradient norms on a few target batches.

Surgical fine-tuning (Lee et al., ICLR 2023, "Surgical fine-tuning improves adaptation to
distribution shifts") found that the best block to tune depends on the shift: early blocks
for input-level shifts (corrupted images), later blocks for output-level shifts (new labels).
Its cheap proxy is the *relative gradient norm* ``‖g‖ / ‖θ‖`` of the target loss: a block
whose weights the target data pulls on hard, relative to their size, is the one to tune.

- :func:`suggest` measures it per block (:func:`netgraft.blocks`) on a few batches of the
  target data and returns a :class:`Suggestion`: the ranking, the recommended block(s), a
  text table, a bar plot (a matplotlib ``Figure``, never pyplot) and JSON/PNG files. A
  ``"surgical"`` :func:`netgraft.study` checks the suggestion by tuning each block alone.
- :class:`AutoRGN` applies the paper's Auto-RGN during :func:`netgraft.fit`: at every step
  each parameter tensor learns at its group's rate times its relative gradient norm divided
  by the largest one of that step.

Example::

    >>> s = netgraft.suggest(model, (x_target, y_target), batches=4)
    >>> print(s.table()); s.recommended
    ['conv1']
    >>> netgraft.fit(model, (x_target, y_target), epochs=5, lr=1e-3, callbacks=[netgraft.AutoRGN()])

:func:`suggest` never changes the model: its weights, gradients, requires_grad flags and
train/eval modes are as they were. :class:`AutoRGN` never changes what is frozen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from .adapters import adapter_stack, adapter_targets, require_peft
from .data import to_device
from .deprecation import legacy
from .errors import NetgraftError
from .layers import device_of, modes_kept
from .optim import block_of_parameters
from .options import RunOptions, run_options
from .results import results_table, write_png, write_results
from .train.batches import loss_fn, make_loader, predictions, resolve_device, split_batch, to_data
from .train.callbacks import Callback
from .train.engine import EpochSampler

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "AdapterSuggestion",
    "AutoRGN",
    "Suggestion",
    "relative_gradient_norms",
    "suggest",
    "suggest_adapters",
]


@dataclass
class Suggestion:
    """Blocks ranked by relative gradient norm on the target data.

    ``rows`` holds one dict per block in model order: ``block``, ``index``, ``params``,
    ``grad_norm`` and ``param_norm`` (over all the block's parameters), ``rgn`` (their
    ratio), ``relative`` (``rgn`` divided by the largest) and ``rank`` (1 = largest).
    ``ranking`` lists the block names by rank; ``recommended`` the first ``top`` of them;
    ``tensors`` the same measure per parameter tensor (``name``, ``block``, ``rgn``)."""

    rows: list[dict[str, Any]]
    recommended: list[str]
    tensors: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ranking(self) -> list[str]:
        """Block names, largest relative gradient norm first."""
        return [r["block"] for r in sorted(self.rows, key=lambda r: r["rank"])]

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain data (what ``suggest.json`` holds)."""
        return {
            "rows": self.rows,
            "ranking": self.ranking,
            "recommended": self.recommended,
            "tensors": self.tensors,
            "settings": self.settings,
        }

    def _cells(self) -> list[list[str]]:
        return [
            [
                str(r["rank"]),
                r["block"],
                f"{r['params']:,}",
                f"{r['grad_norm']:.3g}",
                f"{r['param_norm']:.3g}",
                f"{r['rgn']:.3g}",
                f"{r['relative']:.3f}",
                "★" if r["block"] in self.recommended else "",
            ]
            for r in self.rows
        ]

    _HEADERS = ("rank", "block", "params", "‖g‖", "‖θ‖", "‖g‖/‖θ‖", "relative", "")

    def table(self) -> str:
        """The rows as fixed-width text, in model order, recommended blocks marked with ★."""
        cells = [list(self._HEADERS), *self._cells()]
        widths = [max(len(row[c]) for row in cells) for c in range(len(self._HEADERS))]
        lines = ["  ".join(v.rjust(w) if c != 1 else v.ljust(w) for c, (v, w) in
                           enumerate(zip(row, widths, strict=True))).rstrip()
                 for row in cells]  # fmt: skip
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"recommended: {', '.join(self.recommended)}")
        return "\n".join(lines)

    def rich_table(self, title: str | None = None) -> Table:
        """The rows as a rich table."""
        justify = ["right", "left", "right", "right", "right", "right", "right", "left"]
        columns = list(zip(self._HEADERS, justify, strict=True))
        caption = f"★ recommended: {', '.join(self.recommended)}"
        return results_table(title or "relative gradient norm per block", columns, self._cells(),
                             caption)  # fmt: skip

    def figure(self) -> Figure:
        """A bar plot of the relative gradient norm per block, on its own Agg canvas (pyplot's
        state and the matplotlib backend are untouched)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.0))
        FigureCanvasAgg(fig)
        self._draw(fig.add_subplot())
        fig.tight_layout()
        return fig

    def save(self, out_dir: str | os.PathLike, stem: str = "suggest") -> dict[str, Path]:
        """Write ``STEM.json`` and the bar plot ``STEM.png`` into ``out_dir``, atomically."""
        return write_results(out_dir, stem, self.to_dict(), plot=self._draw, figsize=(6.4, 4.0))

    def write_png(self, path: str | os.PathLike) -> Path:
        """Write only the bar plot to ``path``."""
        write_png(Path(path), self._draw, (6.4, 4.0))
        return Path(path)

    def _draw(self, ax: Axes) -> None:
        names = [r["block"] for r in self.rows]
        colors = ["tab:orange" if n in self.recommended else "tab:blue" for n in names]
        ax.bar(range(len(names)), [r["rgn"] for r in self.rows], color=colors)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
        ax.set_ylabel("relative gradient norm ‖g‖/‖θ‖")
        ax.set_title("Which block to tune (orange: recommended)")
        ax.grid(axis="y", alpha=0.3)


def _target_batches(train: Any, batches: int, batch_size: int, seed: int) -> list[Any]:
    data = to_data(train)
    if isinstance(data, DataLoader):
        loader = data
    else:
        loader = make_loader(data, batch_size, EpochSampler(len(data), seed))  # type: ignore[arg-type]
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == batches:
            break
    if not out:
        raise NetgraftError("the target data yielded no batch; suggest needs examples")
    return out


def relative_gradient_norms(
    model: nn.Module,
    train: Any,
    *,
    batches: int = 4,
    batch_size: int = 32,
    loss: Any = None,
    seed: int = 0,
    device: Any = None,
) -> dict[str, tuple[float, float]]:
    """``{parameter name: (‖g‖, ‖θ‖)}`` for every parameter of ``model`` (frozen ones too),
    ``g`` being the mean gradient of the loss over the first ``batches`` batches of ``train``
    (seeded order), computed in eval mode. The model is left exactly as it was: weights,
    gradients, requires_grad flags and train/eval modes."""
    if not isinstance(batches, int) or batches < 1:
        raise NetgraftError(f"batches must be a positive integer; found {batches!r}")
    device = resolve_device(device) if device is not None else device_of(model)
    score = loss_fn(loss)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    with modes_kept(model):
        try:
            model.eval()
            for p in params.values():
                p.requires_grad_(True)
            seen = _target_batches(train, batches, batch_size, seed)
            for batch in seen:
                x, y = split_batch(to_device(batch, device))
                model.zero_grad(set_to_none=True)
                score(predictions(model, x), y).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        sums[n] += p.grad
        finally:
            for n, p in params.items():
                p.requires_grad_(flags[n])
                p.grad = grads[n]
    return {
        n: (float((sums[n] / len(seen)).norm()), float(p.detach().norm()))
        for n, p in params.items()
    }


def _ratio(g: float, theta: float) -> float:
    return g / theta if theta > 0 else math.inf if g > 0 else 0.0


@legacy(device="run=RunOptions(device=...)")
def suggest(
    model: nn.Module,
    train: Any,
    *,
    batches: int = 4,
    batch_size: int = 32,
    top: int = 1,
    exclude: Sequence[str] = (),
    loss: Any = None,
    seed: int = 0,
    run: RunOptions | None = None,
    **legacy_kwargs: Any,
) -> Suggestion:
    """Rank the blocks of ``model`` by relative gradient norm ``‖g‖/‖θ‖`` of the loss on the
    target data ``train`` (norms over all of a block's parameters, ``g`` the mean gradient of
    ``batches`` seeded batches of ``batch_size``, in eval mode) and recommend the first
    ``top`` blocks to tune (Auto-RGN's measure, Lee et al. 2023). ``exclude`` names blocks
    left out of the ranking (e.g. a freshly replaced head, which is trained anyway).

    The head counts as a block: for a new label set it often ranks first. The model is left
    exactly as it was (see :func:`relative_gradient_norms`). ``run``
    (:class:`~netgraft.RunOptions`) gives the device; the old ``device=`` warns.
    """
    device = run_options(run, legacy_kwargs).device
    names, owner = block_of_parameters(model)
    unknown = [b for b in exclude if b not in names]
    if unknown:
        raise NetgraftError(f"exclude names unknown blocks {unknown}; the blocks are {names}")
    if not isinstance(top, int) or not 1 <= top <= len(names) - len(exclude):
        raise NetgraftError(
            f"top must be between 1 and {len(names) - len(exclude)} (blocks ranked); found {top!r}"
        )
    norms = relative_gradient_norms(
        model, train, batches=batches, batch_size=batch_size, loss=loss, seed=seed, device=device
    )
    params = dict(model.named_parameters())
    rows = []
    for index, block in enumerate(names):
        own = [n for n in norms if owner[n] == index]
        if block in exclude or not own:
            continue
        g = math.sqrt(sum(norms[n][0] ** 2 for n in own))
        theta = math.sqrt(sum(norms[n][1] ** 2 for n in own))
        count = sum(params[n].numel() for n in own)
        rows.append({"block": block, "index": index, "params": count, "grad_norm": g,
                     "param_norm": theta, "rgn": _ratio(g, theta)})  # fmt: skip
    largest = max(r["rgn"] for r in rows)
    for rank, r in enumerate(sorted(rows, key=lambda r: -r["rgn"]), start=1):
        r["rank"] = rank
        r["relative"] = r["rgn"] / largest if largest > 0 else 0.0
    tensors = [{"name": n, "block": names[owner[n]], "rgn": _ratio(*norms[n])} for n in norms]
    ranked = [r["block"] for r in sorted(rows, key=lambda r: r["rank"])]
    settings = {"batches": batches, "batch_size": batch_size, "top": top, "seed": seed}
    return Suggestion(rows, ranked[:top], tensors, settings)


class AutoRGN(Callback):
    """Auto-RGN (Lee et al. 2023) inside :func:`netgraft.fit`: at every optimizer step each
    trainable parameter tensor moves by its group's learning rate times
    ``rgn / max(rgn)``, ``rgn = ‖g‖/‖θ‖`` measured on that step's gradient.

    It scales each tensor's update after the optimizer's step (``θ_old + s·(θ_new − θ_old)``),
    which is exactly a per-tensor learning rate for SGD (with momentum), Adam and AdamW,
    whatever the groups, schedulers or discriminative rates. A tensor whose norm is zero (a
    zero-initialised bias) keeps the full rate and does not set the maximum. ``scales`` holds
    the last step's factor per parameter name. Nothing is frozen or unfrozen.
    """

    def __init__(self) -> None:
        self.scales: dict[str, float] = {}
        self._names: dict[int, str] = {}
        self._before: dict[nn.Parameter, tuple[float, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def on_train_begin(self, state: Any) -> None:
        self._names = {id(p): n for n, p in state.model.named_parameters()}
        opt = state.optimizer
        self._handles = [opt.register_step_pre_hook(self._measure),
                         opt.register_step_post_hook(self._scale)]  # fmt: skip

    def on_train_end(self, state: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _measure(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        with torch.no_grad():
            grads = torch.stack([p.grad.norm() for p in params]).float()  # type: ignore[union-attr]
            sizes = torch.stack([p.norm() for p in params]).float()
            rgn = torch.where(sizes > 0, grads / sizes.clamp_min(1e-30), torch.nan)
            largest = rgn.nan_to_num(0.0).max()
            scale = (
                torch.where(sizes > 0, rgn / largest, 1.0) if largest > 0 else torch.ones_like(rgn)
            )
        self._before = {}
        for p, s in zip(params, scale.tolist(), strict=True):
            self.scales[self._names.get(id(p), f"param{len(self.scales)}")] = s
            if s < 1.0:
                self._before[p] = (s, p.detach().clone())

    def _scale(self, _optimizer: torch.optim.Optimizer, *_: Any) -> None:
        with torch.no_grad():
            for p, (s, old) in self._before.items():
                p.copy_(torch.lerp(old, p, s))
        self._before = {}


@dataclass
class AdapterSuggestion(Suggestion):
    """Where to put adapters (:func:`suggest_adapters`): ``rows`` are the blocks of the main
    stack ranked by the relative gradient norm of their target modules (``params`` being
    the adapter's parameters there), ``recommended`` the blocks chosen under the budget, and
    :attr:`lora` the :func:`netgraft.add_adapters` options that put them there."""

    @property
    def lora(self) -> dict[str, Any]:
        """``layers_to_transform``, ``layers_pattern``, ``target_modules`` and ``r`` for
        :func:`netgraft.add_adapters` (or ``peft.LoraConfig``)."""
        keys = ("layers_to_transform", "layers_pattern", "target_modules", "r")
        return {k: self.settings[k] for k in keys}


def _adapter_costs(model: nn.Module, target_modules: Sequence[str], r: int) -> dict[int, list]:
    """For each block of the main stack (by PEFT layer index): its target modules' parameter
    names and the parameters a rank-``r`` LoRA adds there (PEFT's own target matching)."""
    peft = require_peft()
    stack = adapter_stack(model)
    config = peft.LoraConfig(r=r, target_modules=list(target_modules))
    targets = adapter_targets(model, config)
    out: dict[int, list] = {}
    for i, block in enumerate(stack.blocks):
        names, cost = [], 0
        for t in targets:
            if any(t.startswith(m + ".") for m in block.modules):
                weight = model.get_submodule(t).weight
                names.append(f"{t}.weight")
                cost += r * (weight.shape[0] + weight[0].numel())
        out[i] = [names, cost, block.name]
    return out


def suggest_adapters(
    model: nn.Module,
    train: Any,
    *,
    budget: int,
    target_modules: Sequence[str],
    r: int = 8,
    contiguous: bool = False,
    batches: int = 4,
    batch_size: int = 32,
    loss: Any = None,
    seed: int = 0,
) -> AdapterSuggestion:
    """Choose the blocks of the main stack that LoRA adapters (rank ``r`` on
    ``target_modules``) should go on, within ``budget`` adapter parameters, from the relative
    gradient norm of each block's target weights on the target data (:func:`suggest`'s
    measure, on the model before it has adapters). Blocks are taken by rank while they fit;
    ``contiguous=True`` takes the top ``k`` blocks instead, for the largest ``k`` that
    fits, which lets ``fit`` cache everything below them. The model is left as it was.
    Raises :class:`NetgraftError` when not even one block fits the budget."""
    costs = _adapter_costs(model, target_modules, r)
    norms = relative_gradient_norms(
        model, train, batches=batches, batch_size=batch_size, loss=loss, seed=seed
    )
    rows = []
    for i, (names, cost, block) in costs.items():
        g = math.sqrt(sum(norms[n][0] ** 2 for n in names))
        theta = math.sqrt(sum(norms[n][1] ** 2 for n in names))
        rows.append({"block": block, "index": i, "params": cost, "grad_norm": g,
                     "param_norm": theta, "rgn": _ratio(g, theta)})  # fmt: skip
    order = sorted(rows, key=lambda row: -row["rgn"])
    largest = order[0]["rgn"] or 1.0
    for rank, row in enumerate(order, start=1):
        row["rank"], row["relative"] = rank, row["rgn"] / largest
    chosen = _within_budget(list(reversed(rows)) if contiguous else order, budget, contiguous)
    if not chosen:
        cheapest = min(row["params"] for row in rows)
        raise NetgraftError(
            f"a budget of {budget:,} adapter parameters fits no block: the cheapest takes "
            f"{cheapest:,} (rank {r} on {list(target_modules)}); raise the budget or lower r"
        )
    settings = {"budget": budget, "r": r, "target_modules": list(target_modules),
                "layers_to_transform": sorted(row["index"] for row in chosen),
                "layers_pattern": adapter_stack(model).pattern,
                "adapter_params": sum(row["params"] for row in chosen),
                "batches": batches, "batch_size": batch_size, "seed": seed}  # fmt: skip
    picked = [row["block"] for row in sorted(chosen, key=lambda row: row["rank"])]
    return AdapterSuggestion(rows, picked, [], settings)


def _within_budget(rows: list[dict[str, Any]], budget: int, stop_at_first: bool) -> list:
    """Rows taken in order while their parameters fit ``budget`` (stopping at the first
    that does not when ``stop_at_first``, skipping it otherwise)."""
    chosen, spent = [], 0
    for row in rows:
        if spent + row["params"] > budget:
            if stop_at_first:
                break
            continue
        chosen.append(row)
        spent += row["params"]
    return chosen
