"""Pretraining on an auxiliary task whose labels are cheap, so the lower layers can be reused.

When no model trained on a similar task exists and labels are scarce, :func:`pretrain_auxiliary`
trains the model's *body* (everything but its head) on one of two auxiliary tasks from the
Hands-On Machine Learning chapter on reusing layers:

- ``task="pairs"``: tell whether two inputs belong to the same group (same digit, same
  person). The body runs on both inputs (a Siamese network, weights shared); the auxiliary
  head compares the two feature vectors, either by a learned weighting of ``|a - b|``
  (``aux_head="distance"``, Koch et al. 2015) or by a small network on ``[a, b]``
  (``"concat"``, the book's exercise). Only the grouping is used, never what a group means.
- ``task="corrupt"``: real examples are "good", corrupted copies "bad" (patches shuffled in
  an image, a word replaced in a token sequence, or the caller's corruption). The auxiliary
  head classifies good against bad (``aux_head="binary"``), or scores each example and a
  margin loss ranks every good example above its corrupted copy (``"margin"``, Collobert and
  Weston 2008).

The model's head is set aside (replaced by ``nn.Identity`` while the auxiliary model trains
through :func:`netgraft.fit`), then put back untouched; the auxiliary head is thrown away.
The model keeps its architecture, recipe, train/eval modes and frozen state, ready for
:func:`netgraft.replace_head`, :func:`netgraft.fine_tune` or :func:`netgraft.study`.

Example::

    >>> result = netgraft.pretrain_auxiliary(model, (x_unlabelled, same_person_ids),
    ...                                      task="pairs", epochs=3)
    >>> netgraft.freeze(model, ":-1")
    >>> netgraft.fit(model, (x_few, y_few), epochs=20, lr=1e-3)

Inputs are tensors (images, token ids) held in memory; pairs are drawn once with ``seed``,
corruptions afresh at every epoch from ``(seed, epoch)`` (or once,
``AuxiliaryTask("corrupt", redraw=False)``). This module never uses class labels for
``"corrupt"`` and never adds layers to the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..deprecation import LEGACY, legacy, warn_old_keywords
from ..errors import DataError, NetgraftError, SelectionError, closest
from ..heads import find_head
from ..layers import evaluating, modes_kept
from ..options import RunOptions, run_options
from ..train import History
from ..train.batches import predictions
from ..train.loop import fit_flat
from .inputs import gather_inputs

__all__ = [
    "AUX_HEADS",
    "TASKS",
    "AuxiliaryResult",
    "AuxiliaryTask",
    "Corruption",
    "make_pairs",
    "patch_shuffle",
    "pretrain_auxiliary",
    "replace_word",
]

log = logging.getLogger(__name__)

TASKS = ("pairs", "corrupt")
AUX_HEADS = {"pairs": ("distance", "concat"), "corrupt": ("binary", "margin")}

Corruption = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""A corruption: a batch of examples and a generator in, the corrupted batch (same shape) out."""


def patch_shuffle(grid: int = 2) -> Corruption:
    """A corruption for images ``(N, C, H, W)``: cut each image into ``grid`` × ``grid``
    patches and put them back in a random order other than the original one (pixels past the
    last whole patch stay where they are)."""
    if not isinstance(grid, int) or grid < 2:
        raise NetgraftError(f"patch_shuffle needs a grid of at least 2; found {grid!r}")

    def corrupt(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] < grid or x.shape[-2] < grid:
            raise DataError(
                f"patch_shuffle expects images (N, C, H, W) of at least {grid}×{grid} pixels; "
                f"found shape {tuple(x.shape)}"
            )
        n, c, h, w = x.shape
        ph, pw = h // grid, w // grid
        inner = x[:, :, : ph * grid, : pw * grid]
        patches = inner.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, grid * grid, c, ph, pw)
        k = grid * grid
        # every patch moves: order[i] = perm[(perm⁻¹[i] + shift) % k] != i for shift in 1..k-1
        perm = torch.argsort(torch.rand(n, k, generator=generator), dim=1)
        shift = torch.randint(1, k, (n, 1), generator=generator)
        order = perm.gather(1, (torch.argsort(perm, dim=1) + shift) % k)
        moved = patches.gather(1, order.view(n, k, 1, 1, 1).expand_as(patches))
        moved = moved.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
        out = x.clone()
        out[:, :, : ph * grid, : pw * grid] = moved.reshape(n, c, ph * grid, pw * grid)
        return out

    return corrupt


def replace_word(vocabulary: torch.Tensor | None = None, pad_id: int | None = None) -> Corruption:
    """A corruption for token ids ``(N, L)``: in each sequence, one token that is not
    ``pad_id`` is replaced by another token drawn uniformly from ``vocabulary`` (default: the
    distinct tokens of the batch, ``pad_id`` excluded)."""

    def corrupt(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.ndim != 2 or x.is_floating_point():
            raise DataError(
                f"replace_word expects token ids (N, L) of an integer type; found "
                f"{x.dtype} of shape {tuple(x.shape)}"
            )
        real = x != pad_id if pad_id is not None else torch.ones_like(x, dtype=torch.bool)
        if not bool(real.any(1).all()):
            raise DataError("replace_word found a sequence made only of padding")
        words = torch.as_tensor(vocabulary) if vocabulary is not None else x[real].unique()
        if pad_id is not None:
            words = words[words != pad_id]
        if len(words) < 2:
            raise DataError(
                f"replace_word needs at least two distinct tokens to swap; found {len(words)}"
            )
        # a random real position per row: the argmax of random scores over real positions
        pos = torch.where(real, torch.rand(x.shape, generator=generator), -1.0).argmax(1)
        rows = torch.arange(len(x))
        old = x[rows, pos]
        new = words[torch.randint(len(words), (len(x),), generator=generator)]
        clash = new == old
        while bool(clash.any()):
            new[clash] = words[torch.randint(len(words), (int(clash.sum()),), generator=generator)]
            clash = new == old
        out = x.clone()
        out[rows, pos] = new
        return out

    return corrupt


def make_pairs(
    groups: torch.Tensor, n_pairs: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n_pairs`` index pairs ``(i, j, same)`` over examples labelled by ``groups``: half of
    them (rounded up) two different examples of one group (``same = 1``), the rest two
    examples of different groups (``same = 0``). A single group, fewer than two examples or no
    group with two examples is a :class:`DataError`."""
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise DataError(f"the number of pairs must be a positive integer; found {n_pairs!r}")
    groups = torch.as_tensor(groups).flatten()
    found, counts = groups.unique(return_counts=True)
    if len(groups) < 2:
        raise DataError(f"pairs need at least 2 examples; found {len(groups)}")
    if len(found) < 2:
        raise DataError(
            f"pairs need at least two groups to form 'different' pairs; found one group "
            f"({found[0].item()!r}, {len(groups)} examples)"
        )
    if int(counts.max()) < 2:
        raise DataError(
            f"pairs need a group with at least two examples to form 'same' pairs; found "
            f"{len(found)} groups of one example each"
        )
    n_same = (n_pairs + 1) // 2
    order = torch.argsort(groups, stable=True)  # examples grouped, groups in sorted order
    starts = torch.cumsum(counts, 0) - counts
    size_of = counts[torch.searchsorted(found, groups)]
    start_of = starts[torch.searchsorted(found, groups)]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    anchors = (size_of >= 2).nonzero().flatten()
    i_same = anchors[torch.randint(len(anchors), (n_same,), generator=generator)]
    offset = torch.randint(0, 2**31 - 1, (n_same,), generator=generator) % (size_of[i_same] - 1) + 1
    local = (rank[i_same] - start_of[i_same] + offset) % size_of[i_same]
    j_same = order[start_of[i_same] + local]
    n_diff = n_pairs - n_same
    i_diff = torch.randint(len(groups), (n_diff,), generator=generator)
    j_diff = torch.randint(len(groups), (n_diff,), generator=generator)
    clash = groups[i_diff] == groups[j_diff]
    while bool(clash.any()):
        j_diff[clash] = torch.randint(len(groups), (int(clash.sum()),), generator=generator)
        clash = groups[i_diff] == groups[j_diff]
    same = torch.cat([torch.ones(n_same), torch.zeros(n_diff)]).long()
    return torch.cat([i_same, i_diff]), torch.cat([j_same, j_diff]), same


class _Stacked(Dataset):
    """Examples ``stack([x[i], x[j]])`` (shape ``(2, ...)``) with targets ``y``."""

    def __init__(self, x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, y: torch.Tensor):
        self.x, self.i, self.j, self.y = x, i, j, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([self.x[self.i[k]], self.x[self.j[k]]]), self.y[k]


def _features(body: nn.Module, x: torch.Tensor, plain: bool) -> torch.Tensor:
    """The body's output for ``x``, one flat vector per example; ``plain`` bodies return a
    tensor (called directly, so torch.fx can trace the wrapper for the feature cache)."""
    return (body(x) if plain else predictions(body, x)).flatten(1)


class _Siamese(nn.Module):
    """The body on both inputs of a pair (one batch, shared weights), then a comparison into
    two logits: different (0) or same (1)."""

    def __init__(self, body: nn.Module, dim: int, aux_head: str, hidden: int):
        super().__init__()
        self.body, self.aux_head = body, aux_head
        if aux_head == "distance":
            self.compare: nn.Module = nn.Linear(dim, 2)
        else:
            self.compare = nn.Sequential(
                nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 2)
            )

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        f = _features(self.body, pair.flatten(0, 1), self.plain).view(len(pair), 2, -1)
        a, b = f[:, 0], f[:, 1]
        return self.compare((a - b).abs() if self.aux_head == "distance" else torch.cat([a, b], 1))


class _GoodBad(nn.Module):
    """The body, then two logits: corrupted (0) or real (1)."""

    def __init__(self, body: nn.Module, dim: int):
        super().__init__()
        self.body, self.classify = body, nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(_features(self.body, x, self.plain))


class _Ranker(nn.Module):
    """The body on a (real, corrupted) pair, one score each, returned as ``[s_bad, s_good]``
    so that accuracy counts the pairs ranked right."""

    def __init__(self, body: nn.Module, dim: int):
        super().__init__()
        self.body, self.score = body, nn.Linear(dim, 1)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        s = self.score(_features(self.body, pair.flatten(0, 1), self.plain)).view(len(pair), 2)
        return s.flip(1)


def _margin_loss(margin: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def margin_ranking(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return F.relu(margin - (out[:, 1] - out[:, 0])).mean()

    return margin_ranking


@dataclass
class AuxiliaryResult:
    """What :func:`pretrain_auxiliary` did: the task, the auxiliary head, how many auxiliary
    examples (pairs or good/bad examples) it trained on, and the training history (its
    ``acc`` is the auxiliary accuracy: same/different, good/bad, or pairs ranked right)."""

    task: str
    aux_head: str
    examples: int
    history: History

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the settings, the last epoch's row and every row."""
        return {
            "task": self.task,
            "aux_head": self.aux_head,
            "examples": self.examples,
            "last": self.history.last if len(self.history) else {},
            "history": self.history.rows,
        }

    def summary(self) -> str:
        """One line: task, head, examples and the last auxiliary accuracy."""
        last = self.history.last if len(self.history) else {}
        score = ", ".join(f"{k} {last[k]:.4f}" for k in ("acc", "val_acc") if k in last)
        return (
            f"auxiliary {self.task} ({self.aux_head}) on {self.examples:,} examples, "
            f"{len(self.history)} epochs: {score or 'no epochs'}"
        )


def _default_corruption(x: torch.Tensor, body: nn.Module) -> Corruption:
    if x.is_floating_point() and x.ndim == 4:
        return patch_shuffle(2)
    if not x.is_floating_point() and x.ndim == 2:
        emb = next((m for m in body.modules() if isinstance(m, nn.Embedding)), None)
        return replace_word(pad_id=getattr(emb, "padding_idx", None))
    raise DataError(
        "no built-in corruption for inputs of shape "
        f"{tuple(x.shape)} ({x.dtype}): images (N, C, H, W) get patch_shuffle, token ids "
        "(N, L) get replace_word; pass corruption=your_function(x, generator)"
    )


class _Corrupted(Dataset):
    """Real examples (``copies`` times each) and corrupted copies of them, drawn again by
    :meth:`draw` (an epoch's own generator): ``binary`` items are ``(x, 1)`` then
    ``(corrupted x, 0)``; otherwise ``(stack([x, corrupted x]), 1)`` for the ranking."""

    def __init__(self, x: torch.Tensor, corrupt: Corruption, copies: int, seed: int, binary: bool):
        if len(x) == 0:
            raise DataError("the data holds no examples; auxiliary pretraining needs some")
        self.good = x.repeat(copies, *([1] * (x.ndim - 1)))
        self.corrupt, self.seed, self.binary = corrupt, seed, binary
        self.epoch = -1
        self.draw(0)

    def draw(self, epoch: int) -> None:
        """Corrupt every example afresh with the generator of ``epoch`` (once per epoch)."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        bad = self.corrupt(self.good, g)
        if not isinstance(bad, torch.Tensor) or bad.shape != self.good.shape:
            found = tuple(bad.shape) if isinstance(bad, torch.Tensor) else type(bad).__name__
            raise DataError(
                f"the corruption must return a tensor of shape {tuple(self.good.shape)}; "
                f"found {found}"
            )
        self.bad = bad

    def __len__(self) -> int:
        return 2 * len(self.good) if self.binary else len(self.good)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.good)
        if self.binary:
            return (self.good[k], torch.tensor(1)) if k < n else (self.bad[k - n], torch.tensor(0))
        return torch.stack([self.good[k], self.bad[k]]), torch.tensor(1)


class _Redraw:
    """A :func:`netgraft.fit` callback: fresh corruptions at the start of every epoch."""

    def __init__(self, data: _Corrupted):
        self.data = data

    def on_epoch_begin(self, state: Any) -> None:
        self.data.draw(state.epoch)


def _task_data(
    x: torch.Tensor,
    groups: torch.Tensor | None,
    *,
    task: str,
    aux_head: str,
    n_pairs: int | None,
    corrupt: Corruption | None,
    copies: int,
    seed: int,
) -> Dataset:
    """The auxiliary examples: pairs with same/different targets, or real and corrupted
    examples (:class:`_Corrupted`)."""
    if task == "pairs":
        if groups is None:
            raise DataError("pairs need (inputs, groups); found inputs without groups")
        g = torch.Generator().manual_seed(seed)
        i, j, same = make_pairs(groups, 2 * len(x) if n_pairs is None else n_pairs, g)
        return _Stacked(x, i, j, same)
    assert corrupt is not None  # resolved by the caller for task="corrupt"
    return _Corrupted(x, corrupt, copies, seed, aux_head == "binary")


@contextmanager
def _headless(model: nn.Module, head: str) -> Iterator[nn.Module]:
    """``model`` with its head replaced by ``nn.Identity`` inside the block, the same head
    object put back after (even on error)."""
    original = model.get_submodule(head)
    model.set_submodule(head, nn.Identity())
    try:
        yield model
    finally:
        model.set_submodule(head, original)


def _wrapper(body: nn.Module, example: torch.Tensor, aux_head: str, hidden: int) -> nn.Module:
    with evaluating(body), torch.no_grad():
        out = body(example[:1].to(next(body.parameters()).device))
        plain = isinstance(out, torch.Tensor)
        dim = (out if plain else predictions(body, example[:1])).flatten(1).shape[1]
    if aux_head in AUX_HEADS["pairs"]:
        wrapper: nn.Module = _Siamese(body, dim, aux_head, hidden)
    else:
        wrapper = _GoodBad(body, dim) if aux_head == "binary" else _Ranker(body, dim)
    wrapper.plain = plain
    return wrapper


def _head_name(model: nn.Module, head: str | None) -> str:
    """``head``, or the model's head (:func:`netgraft.find_head`); a name that is no submodule
    is a :class:`SelectionError` naming the closest ones."""
    head = head if head is not None else find_head(model)[0]
    names = [n for n, _ in model.named_modules() if n]
    if head not in names:
        raise SelectionError(
            f"head must name a submodule of the model; found {head!r} "
            f"(closest: {', '.join(closest(head, names, always=True))})"
        )
    return head


def _val_data(
    val: Any, corrupt: Corruption | None, seed: int, options: dict[str, Any]
) -> Dataset | None:
    """The auxiliary validation examples of ``val`` (None without it); its errors say so."""
    if val is None:
        return None
    try:
        vx, vg = gather_inputs(val, second="groups", second_required=options["task"] == "pairs")
        return _task_data(vx, vg, corrupt=corrupt, seed=seed, **options)
    except DataError as exc:
        raise DataError(f"the validation data: {exc}") from exc


def _fit_options(
    train: Dataset, spec: AuxiliaryTask, callbacks: Any, run: RunOptions
) -> tuple[list[Any], RunOptions]:
    """The caller's callbacks with the redraw callback, and its run options without the
    feature cache where it cannot apply."""
    callbacks = list(callbacks)
    if isinstance(train, _Corrupted) and spec.redraw:
        # the inputs change every epoch, so no feature cache can hold them
        callbacks.append(_Redraw(train))
        run = run.replace(cache=False)
    if spec.aux_head != "binary":
        # two inputs per example go through the body as one batch of twice the size: the
        # cache's per-example features would not line up with the examples
        run = run.replace(cache=False)
    return callbacks, run


@dataclass
class AuxiliaryTask:
    """An auxiliary task for :func:`pretrain_auxiliary` with its own settings (a plain
    ``task="pairs"`` or ``"corrupt"`` takes the defaults).

    - ``name``: ``"pairs"`` (same group or not?) or ``"corrupt"`` (real or corrupted?).
    - ``aux_head``: ``"auto"`` (the first of each), for pairs ``"distance"`` (a learned
      weighting of ``|a - b|``) or ``"concat"`` (a hidden layer of ``hidden`` units on
      ``[a, b]``), for corrupt ``"binary"`` (good against bad) or ``"margin"`` (a hinge
      loss with ``margin`` ranking each good example above its corrupted copy).
    - ``pairs``: how many pairs to draw (default twice the examples), half same-group.
    - ``corruption``: ``corruption(x, generator)`` (default :func:`patch_shuffle` for
      images, :func:`replace_word` for token ids); ``copies``: corrupted copies per
      example; ``redraw``: corrupt afresh every epoch (seeded per epoch; no feature cache
      then), else once.
    """

    name: str
    aux_head: str = "auto"
    pairs: int | None = None
    hidden: int = 16
    corruption: Corruption | None = None
    copies: int = 1
    redraw: bool = True
    margin: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise NetgraftError(f"task must be one of {', '.join(TASKS)}; found {self.name!r}")
        heads = AUX_HEADS[self.name]
        if self.aux_head == "auto":
            self.aux_head = heads[0]
        if self.aux_head not in heads:
            raise NetgraftError(
                f"aux_head for task {self.name!r} must be one of {', '.join(heads)}; "
                f"found {self.aux_head!r}"
            )
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 1:
            raise NetgraftError(f"copies must be a positive integer; found {self.copies!r}")


_TASK_FIELDS = ("aux_head", "pairs", "hidden", "corruption", "copies", "redraw", "margin")


@legacy(
    quiet="run=RunOptions(progress=not quiet)",
    **{name: f"task=AuxiliaryTask(..., {name}=...)" for name in _TASK_FIELDS},
)
def pretrain_auxiliary(
    model: nn.Module,
    data: Any,
    val: Any = None,
    *,
    task: str | AuxiliaryTask,
    head: str | None = None,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    run: RunOptions | None = None,
    **fit_kwargs: Any,
) -> AuxiliaryResult:
    """Train ``model``'s body (all but ``head``, default :func:`netgraft.find_head`) on an
    auxiliary task, in place, and return an :class:`AuxiliaryResult`; see the module
    docstring for the tasks. ``task`` is ``"pairs"``, ``"corrupt"`` or an
    :class:`AuxiliaryTask` with its own settings.

    ``"pairs"``: ``data`` is ``(inputs, groups)`` (or a dataset of ``(input, group)``),
    the pairs drawn with ``seed``. ``"corrupt"``: ``data`` is inputs (labels, if any, are
    ignored). ``val`` is optional data of the same form, measured each epoch. Training is
    :func:`netgraft.fit` (``epochs``, ``lr``, ``batch_size``, ``seed``, ``run``, and other
    keywords such as ``optimizer`` and ``callbacks``); the feature cache can apply only to
    ``"binary"`` with ``redraw=False`` (elsewhere the body sees two inputs per example, or
    new inputs every epoch). The model's head is untouched, its frozen parameters stay
    frozen and its train/eval modes are restored. The old keywords (``aux_head``,
    ``pairs``, ``hidden``, ``corruption``, ``copies``, ``redraw``, ``margin``, ``quiet``)
    still work and warn.
    """
    spec, run = _spec_and_run(task, run, fit_kwargs)
    # fit's old keywords (device=, weight_decay=, ...) warn as this function's, at the
    # caller's line; fit_flat then folds them in without warning again as fit's
    warn_old_keywords("pretrain_auxiliary", LEGACY["fit"], fit_kwargs)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise NetgraftError(f"epochs must be a positive integer; found {epochs!r}")
    head = _head_name(model, head)
    x, groups = gather_inputs(data, second="groups", second_required=spec.name == "pairs")
    with modes_kept(model), _headless(model, head) as body:
        corrupt = spec.corruption
        if corrupt is None and spec.name == "corrupt":
            corrupt = _default_corruption(x, body)
        options = {"task": spec.name, "aux_head": spec.aux_head, "n_pairs": spec.pairs,
                   "copies": spec.copies}  # fmt: skip
        train = _task_data(x, groups, corrupt=corrupt, seed=seed, **options)  # type: ignore[arg-type]
        val_set = _val_data(val, corrupt, seed + 1, options)
        torch.manual_seed(seed)
        wrapper = _wrapper(body, x, spec.aux_head, spec.hidden)
        loss = _margin_loss(spec.margin) if spec.aux_head == "margin" else None
        callbacks, run = _fit_options(train, spec, fit_kwargs.pop("callbacks", ()), run)
        history = fit_flat(wrapper, train, val_set, epochs=epochs, lr=lr, batch_size=batch_size,
                           loss=loss, seed=seed, callbacks=callbacks, run=run, **fit_kwargs)  # fmt: skip
    result = AuxiliaryResult(spec.name, spec.aux_head, len(train), history)  # type: ignore[arg-type]
    log.info(result.summary())
    return result


def _spec_and_run(
    task: str | AuxiliaryTask, run: RunOptions | None, kwargs: dict[str, Any]
) -> tuple[AuxiliaryTask, RunOptions]:
    """The task as an :class:`AuxiliaryTask` and the run options, with the old keywords
    (task settings, ``quiet``) taken out of ``kwargs`` and folded in."""
    fields = {k: kwargs.pop(k) for k in _TASK_FIELDS if k in kwargs}
    if isinstance(task, AuxiliaryTask):
        spec = dataclasses.replace(task, **fields)
    elif isinstance(task, str):
        spec = AuxiliaryTask(task, **fields)
    else:
        raise NetgraftError(
            f"task must be 'pairs', 'corrupt' or an AuxiliaryTask; found {type(task).__name__}"
        )
    old = {"quiet": kwargs.pop("quiet")} if "quiet" in kwargs else {}
    return spec, run_options(run, old)
