"""fine_tune's held-out search (FineTuneConfig(search=True), the default): the setting is
chosen on a fifth of the training data held out (every fifth in turn on small data), never
on the validation data, and the winner is what trains; on the real ImageNet MobileNetV2 and
real scikit-learn digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import netgraft
from netgraft import FineTuneConfig
from netgraft.train import search

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_32(digits):
    """120 real digits as 3×32×32 images: 100 to train on, 20 to validate."""
    x, y = digits
    x, y = F.interpolate(x[:120], size=32, mode="bilinear").repeat(1, 3, 1, 1), y[:120]
    return (x[:100], y[:100]), (x[100:], y[100:])


def pretrained(weights_path) -> torch.nn.Module:
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    torch.manual_seed(0)
    netgraft.replace_head(model, num_classes=10)
    return model


CONFIG = FineTuneConfig(head_epochs=1)


@pytest.mark.slow
def test_search_scores_every_candidate_on_held_out_training_data_never_on_val(
    digits_32, mobilenet_v2_weights
):
    train, val = digits_32
    runs = []
    for v in (None, (val[0], val[1].flip(0))):  # the validation labels shuffled: no effect
        model = pretrained(mobilenet_v2_weights)
        history = netgraft.fine_tune(
            model, train, v, epochs=1, config=CONFIG, batch_size=16, progress=False
        )
        runs.append(history.search)
    found = runs[0]
    assert found == runs[1]
    labels = list(search.candidates(CONFIG.base_lr, CONFIG.lr_mult))
    assert list(found["scores"]) == labels and len(labels) == 3
    scores = found["scores"]
    best = max(labels, key=lambda k: (scores[k]["acc"], -scores[k]["loss"]))
    clear = scores[best]["acc"] - scores[labels[1]]["acc"] > (0.25 / 100) ** 0.5
    assert found["chosen"] == (best if clear else labels[1])  # the config's own unless beaten
    # 100 examples: a fifth is 20, so all five fifths in turn, every example scored once
    assert (found["held_out"], found["folds"]) == (100, 5)
    assert all(0 <= s["acc"] <= 1 and s["loss"] > 0 for s in scores.values())
    assert all(round(s["acc"] * 100) == pytest.approx(s["acc"] * 100) for s in scores.values())
    assert netgraft.train.History.from_dict(history.to_dict()).search == found


HEAD, ALL = 0, 2  # the head alone and everything at one rate, in candidates' order
COUNT = len(search.candidates(1e-3, 10.0))


def _prefer(monkeypatch, position: int) -> list[int]:
    """Make the held-out score prefer the candidate at ``position`` in
    :func:`search.candidates`' order on every split (the trials still train); return one
    entry per trial scored."""
    seen: list[int] = []

    def score(model, held, loss, batch_size):
        seen.append(len(seen))
        return {"acc": 1.0 if seen[-1] % COUNT == position else 0.5, "loss": 1.0}

    monkeypatch.setattr("netgraft.train.finetune.held_out_score", score)
    return seen


@pytest.mark.slow
def test_the_chosen_setting_is_what_trains(digits_32, mobilenet_v2_weights, monkeypatch):
    train, _ = digits_32
    # the head alone: the body is bit-identical afterwards and every epoch is a head epoch
    seen = _prefer(monkeypatch, HEAD)
    model = pretrained(mobilenet_v2_weights)
    body = {k: v.clone() for k, v in model.features.state_dict().items()}
    history = netgraft.fine_tune(model, train, epochs=2, config=CONFIG, batch_size=16)
    assert len(seen) == COUNT * 5 and history.search["chosen"] == search.HEAD_ONLY
    assert history["stage"] == ["head"] * 3
    assert all(torch.equal(v, model.features.state_dict()[k]) for k, v in body.items())

    # everything at one rate with norms trained, from the start: no head stage, one rate
    # for every group, norms changed
    _prefer(monkeypatch, ALL)
    model = pretrained(mobilenet_v2_weights)
    bn = model.features[1].conv[2]
    mean = bn.running_mean.clone()
    history = netgraft.fine_tune(model, train, epochs=1, config=CONFIG, batch_size=16)
    assert history.search["chosen"] == "all 0.0006 x1 from the start, norms trained"
    assert history["stage"] == ["all", "all"]
    rates = set(history.rows[-1]["lr"].values())
    assert len(rates) == 1
    assert not torch.equal(bn.running_mean, mean) and bn.weight.requires_grad


@pytest.mark.slow
def test_a_field_the_caller_set_is_kept_in_every_candidate(
    digits_32, mobilenet_v2_weights, monkeypatch
):
    labels = list(search.candidates(2e-3, 4.0))
    assert labels[1] == "body 0.002 x4"
    # lr_mult set by the caller stays in the one-rate candidate too
    train, _ = digits_32
    _prefer(monkeypatch, ALL)
    config = CONFIG.replace(lr_mult=4.0, head_epochs=2)  # head_epochs: the search's to divide
    model = pretrained(mobilenet_v2_weights)
    history = netgraft.fine_tune(model, train, epochs=1, config=config, batch_size=16)
    rates = history.rows[-1]["lr"].values()
    assert max(rates) / min(rates) == pytest.approx(4.0)
    assert history["stage"] == ["all"] * 3  # from the start, the 2 + 1 epochs


def test_too_little_data_or_a_loader_of_its_own_order_runs_the_settings_given(digits):
    x, y = digits
    x = F.interpolate(x[:19], size=32, mode="bilinear").repeat(1, 3, 1, 1)
    assert search.holdout_split((x, y[:19]), 0) is None
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y[:19]),
        sampler=torch.utils.data.WeightedRandomSampler([1.0] * 19, 19),
    )
    assert search.holdout_split(loader, 0) is None
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    history = netgraft.fine_tune(model, (x, y[:19]), epochs=1, config=CONFIG, batch_size=8)
    assert history.search is None and history["stage"] == ["head", "all"]


def test_the_split_is_four_fifths_and_one_fifth_disjoint_and_seeded(digits):
    x, y = digits
    fit_part, held = search.holdout_split((x[:100], y[:100]), seed=3)
    assert (len(fit_part), len(held)) == (80, 20)
    assert not set(fit_part.indices) & set(held.indices)
    again = search.holdout_split((x[:100], y[:100]), seed=3)
    assert again[1].indices == held.indices
    other = search.holdout_split((x[:100], y[:100]), seed=4)
    assert other[1].indices != held.indices
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:50], y[:50]), 7)
    fit_loader, held_loader = search.holdout_split(loader, 0)
    assert fit_loader.batch_size == 7 and len(held_loader.dataset) == 10


@pytest.mark.slow
def test_the_final_run_is_the_chosen_setting_run_alone(digits_32, mobilenet_v2_weights):
    """The trials leave no trace: the searched run ends with the weights of a run of the
    chosen setting without search."""
    train, _ = digits_32
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=16)
    searched = pretrained(mobilenet_v2_weights)
    history = netgraft.fine_tune(searched, loader, epochs=1, config=CONFIG)
    found = history.search
    assert found is not None and found["held_out"] == 100  # a DataLoader is split too
    changes = search.candidates(CONFIG.base_lr, CONFIG.lr_mult)[found["chosen"]]
    alone = pretrained(mobilenet_v2_weights)
    fixed, epochs = search.apply(CONFIG, 1, changes)
    assert fixed.head_epochs + epochs == CONFIG.head_epochs + 1  # every candidate: 2 epochs
    netgraft.fine_tune(alone, loader, epochs=epochs, config=fixed)
    pairs = zip(searched.state_dict().items(), alone.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        assert torch.equal(a, b), name


def test_a_loader_with_its_own_batches_or_a_model_that_cannot_be_copied_is_not_searched(
    digits, caplog
):
    x, y = digits
    data = torch.utils.data.TensorDataset(x[:40].repeat(1, 3, 1, 1), y[:40])
    batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data), 8, False)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches)
    assert search.holdout_split(loader, 0) is None

    class Uncopyable(torch.nn.Sequential):
        def __deepcopy__(self, memo):
            raise RuntimeError("this module refuses to be copied")

    torch.manual_seed(0)
    model = Uncopyable(torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.Linear(32, 10))
    with caplog.at_level("WARNING", logger="netgraft"):
        history = netgraft.fine_tune(model, data, epochs=1, config=CONFIG, batch_size=8)
    assert history.search is None and history["stage"] == ["head", "all"]
    assert "cannot be copied" in caplog.text


def test_a_regression_is_scored_by_its_loss_alone(digits):
    x, y = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    held = torch.utils.data.TensorDataset(x[:30], y[:30].float().unsqueeze(1))
    found = search.score(model, held, "mse", 16)
    assert set(found) == {"loss"} and found["loss"] > 0
    classes = torch.utils.data.TensorDataset(x[:30], y[:30])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert set(search.score(model, classes, None, 16)) == {"acc", "loss"}


def test_every_candidate_runs_the_same_epochs_the_one_rate_one_without_a_head_stage():
    config = FineTuneConfig(head_epochs=2, search=True)
    found = {
        label: search.apply(config, 3, changes)
        for label, changes in search.candidates(1e-3, 10.0).items()
    }
    assert all(c.head_epochs + n == 5 and not c.search for c, n in found.values())
    head, body, one = found.values()
    assert (head[0].head_epochs, body[0].head_epochs, one[0].head_epochs) == (5, 2, 0)
    assert (one[0].lr_mult, one[0].train_bn, body[0].base_lr) == (1.0, True, 1e-3)
    # a head_epochs kept (fine_tune never keeps it: the candidates divide the epochs) puts
    # the one-rate candidate after the head stage
    kept = search.candidates(1e-3, 10.0, keep={"head_epochs": 2})
    assert "head_epochs" not in list(kept.values())[-1]
    assert list(kept)[-1] == "all 0.0006 x1, norms trained"


def test_fifths_are_held_out_in_turn_until_100_examples_are_scored(digits):
    x, y = digits
    parts = search.folds((x[:100], y[:100]), seed=3)
    assert len(parts) == search.FOLDS
    held = [set(h.indices) for _, h in parts]
    assert sorted(i for h in held for i in h) == list(range(100))  # each example once
    for (fit_part, _), h in zip(parts, held, strict=True):
        assert len(h) == 20 and set(fit_part.indices) == set(range(100)) - h
    # the first fold is the single holdout's fifth
    assert held[0] == set(search.holdout_split((x[:100], y[:100]), seed=3)[1].indices)
    # 23 examples: five parts of 5 and 4 or 5
    assert sorted(len(h) for _, h in search.folds((x[:23], y[:23]), 0)) == [4, 4, 5, 5, 5]
    big = search.folds((x[:600], y[:600]), seed=3)
    one = search.holdout_split((x[:600], y[:600]), seed=3)
    assert len(big) == 1 and big[0][1].indices == one[1].indices
    # 200 examples: fifths of 40, three of them (120 scored); 300: two fifths of 60
    assert [len(h) for _, h in search.folds((x[:200], y[:200]), 0)] == [40, 40, 40]
    assert [len(h) for _, h in search.folds((x[:300], y[:300]), 0)] == [60, 60]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:50], y[:50]), 7)
    assert [len(h.dataset) for _, h in search.folds(loader, 0)] == [10] * 5
    # scores of the parts pooled by their sizes, as one pass over every example would
    pooled = search.pool([({"acc": 0.5, "loss": 1.0}, 20), ({"acc": 1.0, "loss": 0.5}, 80)])
    assert pooled == {"acc": 0.9, "loss": 0.6}


def test_the_configs_own_setting_stands_unless_clearly_beaten():
    def trials(**accs):
        return {k: {"acc": a, "loss": 1.0 - a} for k, a in accs.items()}

    # 20 held out: one standard error at its widest is sqrt(0.25 / 20) = 0.112
    chosen, _ = search.pick(trials(head=0.60, own=0.55, other=0.50), prior="own", held_out=20)
    assert chosen == "own"
    chosen, _ = search.pick(trials(head=0.70, own=0.55, other=0.50), prior="own", held_out=20)
    assert chosen == "head"
    # more held-out examples, a smaller margin
    chosen, _ = search.pick(trials(head=0.60, own=0.55, other=0.50), prior="own", held_out=400)
    assert chosen == "head"
    # a regression: the lowest loss
    regression = {k: {"loss": v} for k, v in {"own": 2.0, "b": 1.0}.items()}
    assert search.pick(regression, prior="own", held_out=20)[0] == "b"
