"""Training: :func:`fit` (:mod:`.loop`) over the engine (:mod:`.engine`), callbacks,
checkpoints (:mod:`.checkpoint`), :func:`fine_tune` schedules (:mod:`.finetune`) and
training from cached features (:mod:`.cached`)."""

from .batches import evaluate, predict
from .callbacks import Callback, Checkpoint, EarlyStopping, ReduceLROnPlateau
from .checkpoint import load_checkpoint
from .engine import EpochSampler, TrainState
from .finetune import FineTuneConfig, fine_tune, head_name
from .growing import Grow, GrowthEvent, grow_with_optimizer
from .history import History
from .loop import fit
from .optimizers import Optimization

__all__ = [
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "EpochSampler",
    "FineTuneConfig",
    "Grow",
    "GrowthEvent",
    "History",
    "Optimization",
    "ReduceLROnPlateau",
    "TrainState",
    "evaluate",
    "fine_tune",
    "fit",
    "grow_with_optimizer",
    "head_name",
    "load_checkpoint",
    "predict",
]
