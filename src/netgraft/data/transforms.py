"""How a model expects its images (:class:`DataConfig`, :func:`data_config`) and the
torchvision transforms that give it that (resize, crop, normalise, augment)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import DataError
from ..recipe import recipe_of

AUGMENTATIONS = ("flip", "crop", "jitter")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    base = recipe_of(model).base or {}
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
