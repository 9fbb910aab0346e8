"""Image files: a class-per-folder tree read into train and validation sets, and every image
of a tree as one dataset for evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .transforms import DataConfig, data_config, image_transform

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

_VAL_NAMES = ("val", "valid", "validation")


def load_image(path: str | Path, channels: int = 3):
    """Open an image as a PIL image with ``channels`` channels (grey becomes RGB and colour
    becomes grey as needed); an unreadable file is a :class:`DataError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc


class ImageFiles(torch.utils.data.Dataset):
    """Image files with class labels: item ``i`` is ``(transform(image), label)``."""

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        classes: list[str],
        transform: Any,
        channels: int = 3,
    ):
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_image(path, self.channels)), label


@dataclass
class FolderSplit:
    """What :func:`image_folder` returns: train and validation sets, class names, config."""

    train: ImageFiles
    val: ImageFiles | None
    classes: list[str]
    config: DataConfig


def _scan_classes(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"data folder {str(root)!r} holds no class folders; expected ROOT/CLASS/IMAGE files"
        )
    samples: list[tuple[Path, int]] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(
            f
            for f in (root / name).rglob("*")
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            empty.append(name)
        samples += [(f, label) for f in files]
    if empty:
        raise DataError(
            f"data folder {str(root)!r}: class folder(s) {', '.join(empty)} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, samples


def _check_readable(samples: list[tuple[Path, int]]) -> None:
    from PIL import Image, UnidentifiedImageError

    for path, _ in samples:
        try:
            with Image.open(path) as img:
                img.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc


def image_folder(
    root: str | Path,
    model: torch.nn.Module | None = None,
    *,
    size: int | None = None,
    config: DataConfig | None = None,
    augment: bool | Sequence[str] = False,
    val_fraction: float = 0.2,
    seed: int = 0,
    verify: bool = True,
) -> FolderSplit:
    """Read a class-per-folder image tree into train and validation datasets.

    ``root/CLASS/*.png`` is split per class (``val_fraction`` of each class, chosen with
    ``seed``) unless ``root/train`` and ``root/val`` (or ``valid``/``validation``) exist.
    Images are converted to the model's channels, resized and normalised following
    :func:`data_config` (or ``config``); ``augment`` applies to the training set only.
    An empty folder, a single class or an unreadable image is a :class:`DataError`.
    """
    root = Path(root)
    cfg = config or data_config(model, size=size)
    channels = cfg.input_size[0]
    val_dir = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        classes, train_samples = _scan_classes(root / "train")
        val_classes, val_samples = _scan_classes(val_dir)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DataError(f"{str(val_dir)!r} has classes not in the training set: {unknown}")
        remap = {i: classes.index(name) for i, name in enumerate(val_classes)}
        val_samples = [(p, remap[label]) for p, label in val_samples]
    else:
        classes, samples = _scan_classes(root)
        train_samples, val_samples = _split_per_class(samples, len(classes), val_fraction, seed)
    if len(classes) < 2:
        raise DataError(
            f"data folder {str(root)!r} has a single class ({classes[0]}); classification needs "
            "at least two class folders"
        )
    if verify:
        _check_readable(train_samples + val_samples)
    train = ImageFiles(train_samples, classes, image_transform(cfg, augment), channels)
    val = ImageFiles(val_samples, classes, image_transform(cfg), channels) if val_samples else None
    return FolderSplit(train, val, classes, cfg)


def _split_per_class(
    samples: list[tuple[Path, int]], n_classes: int, fraction: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    if not 0 <= fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1); found {fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(n_classes):
        own = [s for s in samples if s[1] == label]
        order = rng.permutation(len(own))
        n_val = int(round(len(own) * fraction)) if len(own) > 1 else 0
        val += [own[i] for i in sorted(order[:n_val])]
        train += [own[i] for i in sorted(order[n_val:])]
    return train, val


def labelled_images(
    root: str | Path, config: DataConfig, classes: Sequence[str] | None = None
) -> ImageFiles:
    """Every image of a class-per-folder tree as one dataset for evaluation (no split, no
    augmentation); with ``classes`` (those a model was trained on) labels follow that list
    and a folder naming another class is a :class:`DataError`."""
    root = Path(root)
    found, samples = _scan_classes(root)
    names = list(classes) if classes is not None else found
    unknown = [c for c in found if c not in names]
    if unknown:
        raise DataError(
            f"{str(root)!r} has class folder(s) the model was not trained on: {unknown}; "
            f"known classes: {names}"
        )
    samples = [(p, names.index(found[label])) for p, label in samples]
    _check_readable(samples)
    return ImageFiles(samples, names, image_transform(config), config.input_size[0])
