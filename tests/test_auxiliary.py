"""Auxiliary-task pretraining (pairs, corrupt) on real digits and real political speeches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import netgraft
from netgraft import DataError, NetgraftError, pretrain_auxiliary
from netgraft.models import digits_cnn, text_cnn, tokenize, vocabulary
from netgraft.pretrain.auxiliary import make_pairs, patch_shuffle, replace_word

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def passages():
    from netgraft.data import load_political_passages

    p = load_political_passages(words=32)
    vocab = vocabulary(p.texts)
    return tokenize(p.texts, vocab, 32), p.labels, len(vocab) + 2


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return digits_cnn(10)


def test_pairs_pretraining_learns_same_digit_and_leaves_head_modes_and_frozen_layers(digits):
    x, y = digits
    model = _model()
    netgraft.freeze(model, "conv1")
    model.eval()
    head, conv1, fc = (
        copy.deepcopy(model.get_submodule(n).state_dict()) for n in ("head", "conv1", "dense")
    )
    result = pretrain_auxiliary(model, (x[:1000], y[:1000]), (x[1000:1400], y[1000:1400]),
                                task="pairs", epochs=3, device="cpu")  # fmt: skip
    assert result.task == "pairs" and result.aux_head == "distance" and result.examples == 2000
    assert result.history.last["val_acc"] > 0.7  # same digit or not, on digits never trained on
    assert isinstance(model.head, nn.Linear)
    assert all(torch.equal(v, model.head.state_dict()[k]) for k, v in head.items())
    assert all(torch.equal(v, model.conv1.state_dict()[k]) for k, v in conv1.items())
    assert not torch.equal(fc["weight"], model.dense.weight)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.conv1.parameters())
    assert all(p.requires_grad for p in model.dense.parameters())
    assert "auxiliary pairs (distance)" in result.summary()


def test_pretrained_body_is_ready_for_replace_head_and_fit(digits):
    x, y = digits
    model = _model()
    pretrain_auxiliary(model, (x[:600], y[:600]), task="pairs", aux_head="concat", pairs=500,
                       epochs=1, device="cpu")  # fmt: skip
    netgraft.replace_head(model, 3)
    netgraft.freeze(model, ":head")
    keep = (y >= 0) & (y < 3)
    history = netgraft.fit(
        model, (x[keep][:90], y[keep][:90]), epochs=1, lr=1e-3, quiet=True, seed=0
    )
    assert model(x[:2]).shape == (2, 3)
    assert len(history) == 1
    assert netgraft.get_recipe(model).operations[-1]["op"] == "replace_head"


def test_corrupt_binary_learns_to_spot_shuffled_patches(digits, monkeypatch):
    monkeypatch.setattr("netgraft.deprecation._warned", set())
    x, _ = digits
    model = _model()
    with pytest.warns(DeprecationWarning) as record:  # fit's old keyword, named as ours
        result = pretrain_auxiliary(model, x[:800], x[800:1100], task="corrupt", epochs=3,
                                    device="cpu")  # fmt: skip
    ours = [w for w in record if "is deprecated; use" in str(w.message)]
    assert [str(w.message) for w in ours] == [
        "pretrain_auxiliary(device=...) is deprecated; use run=RunOptions(device=...)"
    ]
    assert ours[0].filename == __file__  # the caller's line
    assert result.aux_head == "binary" and result.examples == 1600
    assert result.history.last["val_acc"] > 0.85


def test_corrupt_margin_ranks_real_passages_above_ones_with_a_word_replaced(passages):
    tokens, _, vocab = passages
    torch.manual_seed(0)
    model = text_cnn(vocab, dim=32)
    emb = model.embed.weight.detach().clone()
    result = pretrain_auxiliary(model, tokens[:1500], tokens[1500:2000], task="corrupt",
                                aux_head="margin", copies=2, epochs=4, lr=3e-3, device="cpu")  # fmt: skip
    first, last = result.history.rows[0], result.history.last
    assert last["loss"] < first["loss"]
    assert last["val_acc"] > 0.6  # pairs ranked right; chance is 0.5
    assert not torch.equal(emb[2:], model.embed.weight[2:])


def test_frozen_lower_layers_are_cached_where_the_cache_applies(digits, caplog):
    x, y = digits
    for task, options in (("corrupt", {"redraw": False}), ("pairs", {})):
        model = _model()
        netgraft.freeze(model, ["conv1", "conv2"])
        conv2 = model.conv2.weight.detach().clone()
        caplog.clear()
        with caplog.at_level("INFO", logger="netgraft.train"):
            result = pretrain_auxiliary(model, (x[:300], y[:300]), task=task, epochs=2,
                                        device="cpu", **options)  # fmt: skip
        cached = "feature cache: frozen prefix up to 'body.flatten'" in caplog.text
        assert cached == (
            task == "corrupt"
        )  # a pair is two inputs: per-example features do not fit
        assert torch.equal(conv2, model.conv2.weight) and result.history.last["acc"] > 0.5


def test_a_user_corruption_replaces_the_built_in_one(digits):
    x, _ = digits
    seen = []

    def blank_rows(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seen.append(len(batch))
        out = batch.clone()
        out[:, :, torch.randint(8, (1,), generator=generator)] = 0.0
        return out

    pretrain_auxiliary(_model(), x[:200], task="corrupt", corruption=blank_rows, copies=2,
                       epochs=2, device="cpu")  # fmt: skip
    assert seen == [400, 400]  # drawn afresh each epoch
    pretrain_auxiliary(_model(), x[:200], task="corrupt", corruption=blank_rows, epochs=2,
                       redraw=False, device="cpu")  # fmt: skip
    assert seen == [400, 400, 200]


def test_patch_shuffle_moves_whole_patches_and_never_keeps_the_order(digits):
    x = digits[0][:64]
    out = patch_shuffle(2)(x, torch.Generator().manual_seed(0))
    patches = lambda t: t.unfold(2, 4, 4).unfold(3, 4, 4).reshape(len(t), 4, 16)  # noqa: E731
    a, b = patches(x), patches(out)
    for i in range(len(x)):
        rows_a = sorted(map(tuple, a[i].tolist()))
        assert rows_a == sorted(map(tuple, b[i].tolist()))
    distinct = [i for i in range(len(x)) if len({tuple(p) for p in a[i].tolist()}) == 4]
    assert distinct and all(not torch.equal(x[i], out[i]) for i in distinct)


def test_replace_word_changes_exactly_one_real_token_per_passage(passages):
    tokens = passages[0][:200]
    out = replace_word(pad_id=0)(tokens, torch.Generator().manual_seed(1))
    changed = out != tokens
    assert changed.sum(1).tolist() == [1] * len(tokens)
    assert bool((tokens[changed] != 0).all()) and bool((out[changed] != 0).all())


def test_make_pairs_is_balanced_and_labels_same_group_correctly(digits):
    y = digits[1][:300]
    i, j, same = make_pairs(y, 501, torch.Generator().manual_seed(0))
    assert len(same) == 501 and int(same.sum()) == 251
    assert torch.equal((y[i] == y[j]).long(), same)
    assert bool((i != j).all())


def test_bad_inputs_are_one_clear_error(digits):
    x, y = digits
    model = _model()
    with pytest.raises(DataError, match="at least two groups"):
        pretrain_auxiliary(model, (x[:50], torch.full((50,), 3)), task="pairs", epochs=1)
    with pytest.raises(DataError, match="at least 2 examples"):
        pretrain_auxiliary(model, (x[:1], y[:1]), task="pairs", epochs=1)
    with pytest.raises(DataError, match="groups of one example"):
        pretrain_auxiliary(model, (x[:5], torch.arange(5)), task="pairs", epochs=1)
    with pytest.raises(DataError, match="number of pairs must be a positive integer; found 0"):
        pretrain_auxiliary(model, (x[:50], y[:50]), task="pairs", pairs=0, epochs=1)
    with pytest.raises(DataError, match="validation data: pairs need at least two groups"):
        pretrain_auxiliary(
            model, (x[:50], y[:50]), (x[50:60], torch.zeros(10)), task="pairs", epochs=1
        )
    with pytest.raises(DataError, match="without groups"):
        pretrain_auxiliary(model, x[:50], task="pairs", epochs=1)
    with pytest.raises(NetgraftError, match="task must be one of pairs, corrupt"):
        pretrain_auxiliary(model, x[:50], task="jigsaw", epochs=1)
    with pytest.raises(NetgraftError, match="aux_head for task 'corrupt' must be one of binary"):
        pretrain_auxiliary(model, x[:50], task="corrupt", aux_head="distance", epochs=1)
    with pytest.raises(netgraft.SelectionError, match=r"found 'heads' \(closest: head"):
        pretrain_auxiliary(model, x[:50], task="corrupt", head="heads", epochs=1)
    with pytest.raises(DataError, match="no built-in corruption"):
        pretrain_auxiliary(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.randn(20, 4),
                           task="corrupt", epochs=1)  # fmt: skip
    assert isinstance(model.head, nn.Linear)  # refusals leave the model as it was


NET = (
    "from torch import nn\n\n\n"
    "def build():\n"
    "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
    "                         nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))\n"
)


@pytest.fixture
def image_tree(tmp_path, digits):
    """Twelve real 8×8 digit images each of the classes zero, one and seven, and a model file."""
    import numpy as np
    from PIL import Image

    x, y = digits
    root = tmp_path / "data"
    for c, name in ((0, "zero"), (1, "one"), (7, "seven")):
        (root / name).mkdir(parents=True)
        for i in (y == c).nonzero().flatten()[:12].tolist():
            Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8)).save(root / name / f"{i}.png")
    (tmp_path / "net.py").write_text(NET)
    return root, f"{tmp_path / 'net.py'}:build"


@pytest.mark.parametrize("task", ["pairs", "corrupt", "layerwise"])
def test_cli_pretrain_saves_a_model_that_finetune_takes(cli, image_tree, tmp_path, task):
    import json

    root, spec = image_tree
    out = tmp_path / "pre"
    code, stdout, err = cli("pretrain", spec, "--data", str(root), "--task", task, "-o", str(out),
                            "--epochs", "1", "--size", "8", "--val-fraction", "0.25", "--quiet")  # fmt: skip
    assert code == 0, err
    assert f"saved to {out}" in stdout
    details = json.loads((out / "pretrain.json").read_text())
    assert details["task"] == task
    assert (out / "history.json").is_file() == (task != "layerwise")
    model = netgraft.load(out)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    code, stdout, err = cli("finetune", str(out), "--data", str(root), "-o", str(tmp_path / "ft"),
                            "--epochs", "1", "--size", "8", "--quiet")  # fmt: skip
    assert code == 0, err


def test_cli_pretrain_bad_task_or_one_folder_is_one_line(cli, image_tree, tmp_path):
    root, spec = image_tree
    code, _, err = cli(
        "pretrain", spec, "--data", str(root), "--task", "jigsaw", "-o", str(tmp_path / "o")
    )
    assert code == 1 and err.strip() == (
        "netgraft: error: task must be one of pairs, corrupt, layerwise; found 'jigsaw'"
    )
    code, _, err = cli("pretrain", spec, "--data", str(root / "zero"), "--task", "pairs",
                       "-o", str(tmp_path / "o"), "--size", "8")  # fmt: skip
    assert code == 1 and err.startswith("netgraft: error:") and "Traceback" not in err
