"""Resumable studies: every finished trial is a small JSON file under the study's key.

The *study key* is a SHA-256 of everything a trial's numbers depend on: the training budget,
the unit, the number of classes, the weights and structure of the source (and control)
model, and the training and validation data (hashed as the feature cache hashes them,
:func:`netgraft.cache.cache_key`). Trials live in ``OUT/trials/<key>/``, one file per
trial written atomically as it finishes, so a killed study loses only the trials that were
running, and a study run again with the same key reads them instead of training again.
Another budget, model or data gives another key and another folder: results of different
studies never mix. The modes, counts and seeds asked for only choose which trials run, so
a study asking for more seeds reuses the ones already done. This module never trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from ..atomic import atomic_write
from ..cache import cache_key
from ..data import as_dataset
from .trials import Trial, TrialResult

__all__ = ["TrialStore", "study_key"]

log = logging.getLogger("netgraft.study")

FORMAT = 1
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _dataset(data: Any) -> Any:
    return data.dataset if isinstance(data, DataLoader) else as_dataset(data)


def study_key(
    models: Mapping[str, nn.Module], train: Any, val: Any, settings: Mapping[str, Any]
) -> str:
    """The hex key of a study's trials: ``settings`` (the budget, unit and classes, as
    plain data; other values by their repr) with the models' weights and the data."""
    h = hashlib.sha256()
    text = json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=repr)
    h.update(_ADDRESS.sub("", text).encode())
    train_data, val_data = _dataset(train), _dataset(val)
    for name in sorted(models):
        h.update(f";{name}=".encode())
        h.update(cache_key(models[name], train_data).encode())
    h.update(cache_key(nn.Identity(), val_data, cut_point="val").encode())
    return h.hexdigest()


class TrialStore:
    """The finished trials of one study key under ``out_dir/trials/<key>/``."""

    def __init__(self, out_dir: str | Path, key: str) -> None:
        self.key = key
        self.folder = Path(out_dir) / "trials" / key[:24]

    def _path(self, trial: Trial) -> Path:
        return self.folder / f"{trial.name}.json"

    def load(self, trials: list[Trial]) -> dict[Trial, TrialResult]:
        """The results of ``trials`` already written for this key (a file that does not
        parse or names another key is ignored: the trial runs again)."""
        done = {}
        for trial in trials:
            path = self._path(trial)
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text())
                if data["key"] != self.key or data["trial"] != trial.name:
                    raise ValueError("written for another study")
                done[trial] = TrialResult(
                    float(data["acc"]), int(data["trained_params"]), float(data["seconds"])
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("trial file %s is not usable (%s); running the trial again", path, exc)
        return done

    def save(self, trial: Trial, result: TrialResult) -> Path:
        """Write ``trial``'s result atomically."""
        text = json.dumps({"key": self.key, "trial": trial.name, **result.to_dict()}, indent=1)
        return atomic_write(self._path(trial), lambda p: p.write_text(text))
