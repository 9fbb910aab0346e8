"""The ``data.json`` a served model folder keeps: its class names and input config."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write
from ..errors import DataError
from .transforms import DataConfig


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
