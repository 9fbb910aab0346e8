"""Choosing which block to tune: suggest (relative gradient norms) and AutoRGN, on real digits;
the suggestion set against a surgical study on an input-level and an output-level shift."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from reuse_experiments import shift_experiment
from torch import nn

import netgraft
from netgraft import AutoRGN, NetgraftError, suggest
from netgraft.models import digits_cnn

BLOCKS = ["conv1", "conv2", "dense", "head"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(digits):
    x, y = digits
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test one_thread
    torch.manual_seed(0)
    model = digits_cnn(10)
    netgraft.fit(model, (x[:900], y[:900]), epochs=4, lr=2e-3, seed=0, quiet=True)
    torch.set_num_threads(before)
    return model


def test_suggest_ranks_every_block_and_leaves_the_model_as_it_was(trained, digits):
    x, y = digits
    model = copy.deepcopy(trained)
    netgraft.freeze(model, "conv1")
    model.eval()
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)
    state = copy.deepcopy(model.state_dict())
    s = suggest(model, (1.0 - x[900:1100], y[900:1100]), batches=3)
    assert sorted(s.ranking) == BLOCKS
    assert [r["block"] for r in s.rows] == BLOCKS  # model order
    assert s.recommended == s.ranking[:1]
    top = next(r for r in s.rows if r["rank"] == 1)
    assert top["relative"] == 1.0 and all(0 < r["relative"] <= 1 for r in s.rows)
    assert all(r["rgn"] == pytest.approx(r["grad_norm"] / r["param_norm"]) for r in s.rows)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 7.0))
    assert model.conv1.weight.grad is None and not model.conv1.weight.requires_grad
    assert not any(m.training for m in model.modules())
    assert "★" in s.table() and f"recommended: {s.recommended[0]}" in s.table()


def test_suggest_excludes_blocks_and_draws_without_pyplot(trained, digits, tmp_path):
    import matplotlib.pyplot as plt

    x, y = digits
    figures = plt.get_fignums()
    s = suggest(trained, (x[900:1000], y[900:1000]), batches=2, top=2, exclude=["head"])
    assert sorted(s.ranking) == ["conv1", "conv2", "dense"] and len(s.recommended) == 2
    fig = s.figure()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["conv1", "conv2", "dense"]
    paths = s.save(tmp_path)
    assert json.loads(paths["json"].read_text())["ranking"] == s.ranking
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert plt.get_fignums() == figures


def test_suggest_refuses_bad_arguments_with_one_clear_error(trained, digits):
    data = (digits[0][:64], digits[1][:64])
    with pytest.raises(NetgraftError, match="batches must be a positive integer"):
        suggest(trained, data, batches=0)
    with pytest.raises(NetgraftError, match="top must be between 1 and 4"):
        suggest(trained, data, top=5)
    with pytest.raises(NetgraftError, match=r"unknown blocks \['fc'\]"):
        suggest(trained, data, exclude=["fc"])


def test_autorgn_gives_each_tensor_its_relative_gradient_norm_share_of_the_rate(digits):
    x, y = digits[0][:64], digits[1][:64]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    start = copy.deepcopy(model)
    nn.functional.cross_entropy(start(x), y).backward()
    rgn = {n: float(p.grad.norm() / p.detach().norm()) for n, p in start.named_parameters()}
    largest = max(rgn.values())
    cb = AutoRGN()
    netgraft.fit(model, (x, y), epochs=1, lr=0.1, optimizer="sgd", batch_size=64, seed=0,
                 callbacks=[cb], cache=False, quiet=True)  # fmt: skip
    for name, p in start.named_parameters():
        expected = p - 0.1 * (rgn[name] / largest) * p.grad
        assert torch.allclose(dict(model.named_parameters())[name], expected, atol=1e-6), name
        assert cb.scales[name] == pytest.approx(rgn[name] / largest, rel=1e-5)
    assert max(cb.scales.values()) == 1.0 and cb._handles == []


def test_autorgn_never_moves_frozen_layers_and_trains_the_rest(trained, digits):
    x, y = digits
    model = copy.deepcopy(trained)
    netgraft.freeze(model, "conv1")
    before = copy.deepcopy(model.state_dict())
    cb = AutoRGN()
    netgraft.fit(model, (1.0 - x[900:1100], y[900:1100]), epochs=2, lr=1e-3, seed=0,
                 callbacks=[cb], quiet=True)  # fmt: skip
    after = model.state_dict()
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["dense.weight"], after["dense.weight"])
    assert not any(name.startswith("conv1.") for name in cb.scales)


@pytest.mark.slow
def test_suggest_against_a_surgical_study_on_an_input_and_an_output_level_shift(capsys):
    """The issue's comparison, computed and shown: the block suggest ranks first, the best
    block of a surgical study (each block tuned alone), and whether they agree."""
    results = {kind: shift_experiment(kind, per_class=10, seeds=2, epochs=12)
               for kind in ("noisy", "new-labels")}  # fmt: skip
    with capsys.disabled():
        print()
        for kind, r in results.items():
            accs = {row["reused_up_to"]: row["acc_mean"] for row in r["surgical_rows"]}
            print(f"{kind:>10}: suggest {r['suggest_ranking']} (without head "
                  f"{r['suggest_ranking_without_head']}) · surgical {r['surgical_ranking']} "
                  f"{accs} · agree {r['agree']} / without head {r['agree_without_head']}")  # fmt: skip
    for r in results.values():
        assert sorted(r["suggest_ranking"]) == BLOCKS and sorted(r["surgical_ranking"]) == BLOCKS
        assert r["agree"] == (r["suggest_ranking"][0] == r["surgical_ranking"][0])
    # Lee et al.'s finding, on real digits: tuning the first block alone beats tuning the
    # dense block alone for an input-level shift, and the other way round for new labels
    acc = {kind: {row["reused_up_to"]: row["acc_mean"] for row in r["surgical_rows"]}
           for kind, r in results.items()}  # fmt: skip
    assert acc["noisy"]["conv1"] > acc["noisy"]["dense"]
    assert acc["new-labels"]["dense"] > acc["new-labels"]["conv1"]
