"""The monitoring callbacks (one monitor helper) and their state across a resume, on the real
scikit-learn digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netgraft
from netgraft.train import Callback, Checkpoint, EarlyStopping, ReduceLROnPlateau
from netgraft.train.callbacks import Monitored

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = netgraft.RunOptions(progress=False, cache=False)
SCORES = {1: 1.0, 2: 3.0, 3: 2.0, 4: 1.0, 5: 0.5, 6: 0.25}


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class Score(Callback):
    """Puts a chosen ``score`` into each epoch's logs (best at epoch 2) and keeps a copy of
    the weights every epoch ended with."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, state):
        epoch = state.logs["epoch"]
        state.logs["score"] = SCORES[epoch]
        self.weights[epoch] = {k: v.clone() for k, v in state.model.state_dict().items()}


@pytest.fixture(scope="module")
def flat_digits(digits):
    x, y = digits
    return x[:300].flatten(1), y[:300]


def test_early_stopping_restores_the_best_epochs_weights_after_a_resume(flat_digits, tmp_path):
    first = Score()
    callbacks = [
        first,
        EarlyStopping(monitor="score", mode="max", patience=2, restore_best_weights=True),
        Checkpoint(tmp_path, monitor="score", mode="max"),
    ]
    netgraft.fit(make_mlp(), flat_digits, epochs=3, lr=1e-2, callbacks=callbacks, run=QUIET)
    # a new process: a fresh model and fresh callbacks, the best weights only in the checkpoint
    model = make_mlp()
    stop = EarlyStopping(monitor="score", mode="max", patience=2, restore_best_weights=True)
    callbacks = [Score(), stop, Checkpoint(tmp_path, monitor="score", mode="max")]
    history = netgraft.fit(model, flat_digits, epochs=6, lr=1e-2, callbacks=callbacks,
                           run=QUIET.replace(resume=tmp_path))  # fmt: skip
    assert stop.stopped_epoch == 4 and len(history) == 4
    best = first.weights[2]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def test_one_monitor_counts_for_plateau_and_early_stopping_and_round_trips(flat_digits):
    plateau = ReduceLROnPlateau(monitor="score", mode="max", patience=1, factor=0.5)
    stop = EarlyStopping(monitor="score", mode="max", patience=3)
    for callback in (plateau, stop):
        assert isinstance(callback, Monitored)
    model = make_mlp()
    netgraft.fit(
        model, flat_digits, epochs=4, lr=1e-2, callbacks=[Score(), plateau, stop], run=QUIET
    )
    # best at epoch 2, no improvement at 3 and 4: two epochs waited
    assert plateau.best == stop.best == 3.0 and stop.wait == 2
    assert plateau.reductions == 2  # patience 1: reduced after epochs 3 and 4
    again = ReduceLROnPlateau(monitor="score", mode="max")
    again.load_state_dict(plateau.state_dict())
    assert again.state_dict() == plateau.state_dict()


def test_a_monitor_mode_other_than_min_or_max_is_refused():
    with pytest.raises(netgraft.NetgraftError, match="mode must be 'min' or 'max'"):
        EarlyStopping(mode="up")
