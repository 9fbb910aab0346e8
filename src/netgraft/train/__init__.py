"""Training: the :func:`fit` loop, callbacks, checkpoints and :func:`fine_tune` schedules."""

from .callbacks import Callback, Checkpoint, EarlyStopping, ReduceLROnPlateau, load_checkpoint
from .finetune import fine_tune, head_name
from .history import History
from .loop import EpochSampler, TrainState, evaluate, fit, predict

__all__ = [
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "EpochSampler",
    "History",
    "ReduceLROnPlateau",
    "TrainState",
    "evaluate",
    "fine_tune",
    "fit",
    "head_name",
    "load_checkpoint",
    "predict",
]
