"""The how-many-layers study on real digits: a CNN trained on 0–4 reused for 5–9."""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import netgraft
from netgraft import NetgraftError, study

pytestmark = pytest.mark.usefixtures("one_thread")


def build(num_classes: int = 5) -> nn.Module:
    """A small CNN for 1×8×8 digits (also the ``file.py:build`` of the CLI test)."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            fc=nn.Linear(64, num_classes),
        )
    )


@pytest.fixture(scope="module")
def tasks(digits):
    """A source network trained on digits 0–4, and 5–9 split into 50 training images and
    the rest for validation (labels 0–4)."""
    x, y = digits
    src = y < 5
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    source = build()
    netgraft.fit(source, (x[src], y[src]), epochs=3, lr=3e-3, batch_size=64, seed=0, quiet=True)
    torch.set_num_threads(before)
    tx, ty = x[~src], y[~src] - 5
    perm = torch.randperm(len(tx), generator=torch.Generator().manual_seed(0))
    train, val = perm[:50], perm[300:]
    return source, (tx[train], ty[train]), (tx[val], ty[val])


@pytest.mark.slow
def test_study_sweeps_k_per_mode_writes_table_json_csv_png_and_recommends_a_row(
    tasks, tmp_path, caplog
):
    source, train, val = tasks
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    caplog.set_level(logging.INFO, logger="netgraft")
    result = study(source, train, val, seeds=2, budget={"epochs": 6, "lr": 3e-3}, out_dir=tmp_path)

    assert [b.name for b in netgraft.blocks(source)] == ["conv1", "conv2", "fc1", "fc"]
    keys = [(r["model"], r["mode"], r["k"]) for r in result.rows]
    assert keys == [("scratch", "scratch", 0)] + [
        ("source", mode, k) for mode in ("frozen", "fine-tuned") for k in (1, 2, 3)
    ]
    by = {(r["mode"], r["k"]): r for r in result.rows}
    # frozen prefixes train fewer parameters, and only the head is left at k=3
    assert by[("frozen", 3)]["trained_params"] == 64 * 5 + 5
    assert (
        by[("frozen", 1)]["trained_params"]
        > by[("frozen", 2)]["trained_params"]
        > by[("frozen", 3)]["trained_params"]
    )
    assert by[("fine-tuned", 2)]["trained_params"] == by[("scratch", 0)]["trained_params"]
    for row in result.rows:
        assert len(row["accs"]) == 2 and 0.2 < row["acc_mean"] <= 1.0
        assert row["acc_std"] >= 0 and row["seconds"] > 0
    # frozen prefixes run once for all k and seeds (the shared frozen pass); every frozen
    # trial then reads its features from the feature cache
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("shared frozen pass: 3 cut point(s) for 3 setting(s)") for m in logged)
    assert sum(m.startswith("feature cache reused") for m in logged) == 3 * 2 * 2
    # the source model itself is never changed
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in weights.items())
    assert all(p.requires_grad for p in source.parameters())

    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["rows"] == result.rows and saved["unit"] == "block"
    assert saved["units"] == ["conv1", "conv2", "fc1", "fc"]
    rec = saved["recommended"]
    assert any(
        (r["model"], r["mode"], r["k"]) == (rec["model"], rec["mode"], rec["k"])
        for r in result.rows
    )
    best = max(r["acc_mean"] for r in result.rows)
    assert rec["acc_mean"] >= best - max(r["acc_std"] for r in result.rows)
    with open(tmp_path / "study.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(result.rows) and table[1]["mode"] == "frozen"
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_selffer_control_and_layer_counts_are_reused_the_same_way(tasks):
    source, train, val = tasks
    torch.manual_seed(1)
    control = build()
    netgraft.fit(control, train, epochs=5, lr=3e-3, seed=1, quiet=True)
    result = study(
        source,
        train,
        val,
        reuse=[2],
        modes=("frozen",),
        baseline=False,
        control=control,
        seeds=1,
        budget=3,
        unit="layer",
    )
    assert [(r["model"], r["k"], r["reused_up_to"]) for r in result.rows] == [
        ("source", 2, "conv2"),
        ("control", 2, "conv2"),
    ]
    assert result.units == ["conv1", "conv2", "fc1", "fc"]


def test_a_new_number_of_classes_gets_a_new_head(tasks):
    source, train, val = tasks
    x, y = train
    keep = y < 3  # a 3-class target: the 5-way head is replaced
    result = study(
        source,
        (x[keep], y[keep]),
        (val[0][val[1] < 3], val[1][val[1] < 3]),
        reuse=[3],
        modes=("frozen",),
        baseline=False,
        seeds=1,
        budget=2,
    )
    assert result.rows[0]["trained_params"] == 64 * 3 + 3
    assert result.settings["num_classes"] == 3


def test_reuse_counts_beyond_the_head_or_bad_modes_are_clear_errors(tasks):
    source, train, val = tasks
    with pytest.raises(NetgraftError, match=r"between 0 and 3 .*conv1, conv2, fc1"):
        study(source, train, val, reuse=[4])
    with pytest.raises(NetgraftError, match="modes must be some of"):
        study(source, train, val, modes=("thawed",))
    with pytest.raises(NetgraftError, match="budget"):
        study(source, train, val, budget="long")


def test_cli_study_on_an_image_folder_writes_its_results(tasks, tmp_path, cli):
    from PIL import Image
    from safetensors.torch import save_file

    source, (x, y), _ = tasks
    data = tmp_path / "digits"
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = data / f"digit{int(label) + 5}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img[0] * 255).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    code_file = tmp_path / "net.py"
    code_file.write_text(
        "from collections import OrderedDict\nfrom torch import nn\n\n"
        "def build():\n    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 16, 3, padding=1), "
        "relu1=nn.ReLU(), conv2=nn.Conv2d(16, 32, 3, padding=1), relu2=nn.ReLU(), "
        "pool=nn.MaxPool2d(2), flatten=nn.Flatten(), fc1=nn.Linear(512, 64), relu3=nn.ReLU(), "
        "fc=nn.Linear(64, 5)))\n"
    )
    weights = tmp_path / "source.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    out = tmp_path / "out"
    code, stdout, err = cli(
        "study",
        f"{code_file}:build",
        "--weights",
        str(weights),
        "--data",
        str(data),
        "--size",
        "8",
        "--reuse",
        "1,2",
        "--modes",
        "frozen",
        "--seeds",
        "1",
        "--epochs",
        "2",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "recommended" in stdout
    rows = json.loads((out / "study.json").read_text())["rows"]
    assert [(r["mode"], r["k"]) for r in rows] == [("scratch", 0), ("frozen", 1), ("frozen", 2)]
    assert (out / "study.csv").is_file() and (out / "study.png").is_file()


def test_cli_study_reports_a_missing_data_folder_in_one_line(tmp_path, cli):
    code, _, err = cli("study", "torchvision:resnet18", "--data", str(tmp_path / "nowhere"))
    assert code == 1
    assert "does not exist" in err and "Traceback" not in err


def test_surgical_mode_tunes_only_unit_k_and_keeps_every_other_units_weights(tasks, monkeypatch):
    source, train, val = tasks
    seen: list[dict[str, bool]] = []
    study_module = sys.modules["netgraft.study.trials"]
    original = study_module.fit_flat

    def spy(model, *args, **kwargs):
        seen.append({n: p.requires_grad for n, p in model.named_parameters()})
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = original(model, *args, **kwargs)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) != p.requires_grad, n
        return out

    monkeypatch.setattr(study_module, "fit_flat", spy)
    budget = {"epochs": 6, "lr": 3e-3}
    result = study(source, train, val, modes=("surgical",), baseline=False, seeds=1, budget=budget)
    assert [(r["mode"], r["k"], r["reused_up_to"]) for r in result.rows] == [
        ("surgical", k, name) for k, name in enumerate(["conv1", "conv2", "fc1", "fc"], 1)
    ]
    assert [r["trained_params"] for r in result.rows] == [160, 4640, 32832, 325]
    assert [sorted({n.split(".")[0] for n, g in s.items() if g}) for s in seen] == [
        ["conv1"],
        ["conv2"],
        ["fc1"],
        ["fc"],
    ]
    # tuning one unit of the source is enough to beat chance (0.2) on the new digits
    assert max(r["acc_mean"] for r in result.rows) > 0.35
    assert result.recommended["mode"] == "surgical"
    assert "only conv1 tuned" in str(result.rich_table().columns[3]._cells)


def test_surgical_mode_trains_a_replaced_head_with_the_unit_tuned(tasks):
    source, (x, y), (vx, vy) = tasks
    keep, vkeep = y < 3, vy < 3
    result = study(
        source, (x[keep], y[keep]), (vx[vkeep], vy[vkeep]),
        reuse=[1], modes=("surgical",), baseline=False, seeds=1, budget=1,
    )  # fmt: skip
    assert result.rows[0]["trained_params"] == 160 + 64 * 3 + 3
    with pytest.raises(NetgraftError, match=r"between 0 and 4 \(the blocks one of which is tuned"):
        study(source, (x, y), (vx, vy), reuse=[5], modes=("surgical",))
