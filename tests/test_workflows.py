"""The workflows the CLI calls, as library functions, and the results helper the demo and the
study share (rows, CSV, PNG without touching the caller's matplotlib backend)."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from netgraft import FineTuneConfig
from netgraft.demo import QUICK, DemoResult
from netgraft.errors import DataError, NetgraftError
from netgraft.results import rows_csv, seeded_row
from netgraft.study import StudyResult
from netgraft.workflows import (
    evaluate_folder,
    finetune_folder,
    grow_folder,
    inspect_model,
    predict_files,
    study_folder,
    transfer_folder,
)

NET = (
    "from torch import nn\n\n\n"
    "def build():\n"
    "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
    "                         nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10))\n"
)


@pytest.fixture
def image_tree(tmp_path, digits):
    """Eight real 8×8 digit images each of the classes zero, one and seven, and a model file."""
    x, y = digits
    root = tmp_path / "data"
    for c, name in ((0, "zero"), (1, "one"), (7, "seven")):
        (root / name).mkdir(parents=True)
        for i in (y == c).nonzero().flatten()[:8].tolist():
            pixels = (x[i, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (tmp_path / "net.py").write_text(NET)
    return root, f"{tmp_path / 'net.py'}:build"


def _study_rows() -> list[dict]:
    key = [
        ("scratch", "scratch", 0, None),
        ("source", "frozen", 1, "a"),
        ("source", "frozen", 2, "b"),
    ]
    return [
        {"model": m, "mode": mode, "k": k, "reused_up_to": up, "acc_mean": 0.6 + 0.1 * k,
         "acc_std": 0.02, "accs": [0.58 + 0.1 * k, 0.62 + 0.1 * k], "trained_params": 100 - k,
         "seconds": 0.5}
        for m, mode, k, up in key
    ]  # fmt: skip


def test_seeded_row_gives_population_mean_and_std_per_seed_accuracies_and_the_last_count():
    row = seeded_row({"method": "m", "per_class": 10}, lambda seed: (0.5 + 0.1 * seed, 7), range(3))
    assert list(row) == [
        "method",
        "per_class",
        "acc_mean",
        "acc_std",
        "accs",
        "trained_params",
        "seconds",
    ]
    assert row["acc_mean"] == 0.6 and row["acc_std"] == round(float(np.std([0.5, 0.6, 0.7])), 4)
    assert row["accs"] == [0.5, 0.6, 0.7] and row["trained_params"] == 7
    assert row["seconds"] >= 0


def test_rows_csv_joins_per_seed_accuracies_and_leaves_missing_values_empty():
    text = rows_csv(_study_rows()[:1], ("model", "k", "reused_up_to", "accs"))
    assert text == "model,k,reused_up_to,accs\nscratch,0,,0.5800;0.6200\n"


def test_writing_study_and_demo_pngs_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    caller = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        study = StudyResult(_study_rows(), "block", ["a", "b", "c"], None)
        paths = study.save(tmp_path / "study")
        demo_rows = [
            {"method": m, "per_class": 10, "acc_mean": 0.8, "acc_std": 0.01, "accs": [0.8, 0.8],
             "trained_params": 10, "seconds": 0.1}
            for m in QUICK.methods
        ]  # fmt: skip
        demo_paths = DemoResult(demo_rows, QUICK).save(tmp_path / "demo")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(caller)
    for png in (paths["png"], demo_paths["png"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(demo_paths["json"].read_text()) == demo_rows
    assert json.loads(paths["json"].read_text())["rows"] == study.rows


def test_finetune_folder_saves_a_servable_folder_that_evaluates_and_predicts_by_class_name(
    image_tree, tmp_path
):
    root, spec = image_tree
    result = finetune_folder(spec, root, tmp_path / "model", size=8, seed=3, quiet=True)
    assert result.classes == ["one", "seven", "zero"]
    assert {p.name for p in result.folder.iterdir()} >= {
        "weights.safetensors",
        "recipe.yaml",
        "history.json",
        "history.png",
        "data.json",
    }
    assert result.summary().startswith(f"fine-tuned {len(result.history)} epochs, val_acc ")
    assert result.summary().endswith(f"; saved to {result.folder}")
    scores = evaluate_folder(result.folder, root)
    assert scores["n"] == 24 and 0.0 <= scores["acc"] <= 1.0
    images = sorted((root / "seven").iterdir())[:2]
    top = predict_files(result.folder, images, k=2)
    assert list(top) == [str(p) for p in images]
    for ranked in top.values():
        assert len(ranked) == 2 and {t["class"] for t in ranked} <= set(result.classes)
        assert ranked[0]["prob"] >= ranked[1]["prob"]


def test_finetune_folder_with_one_seed_gives_the_same_weights_twice(image_tree, tmp_path):
    root, spec = image_tree
    models = []
    for run in ("a", "b"):
        torch.manual_seed(len(models))  # whatever the global stream, the seed decides
        finetune_folder(spec, root, tmp_path / run, size=8, seed=3, epochs=1, quiet=True)
        models.append(load_file(tmp_path / run / "weights.safetensors"))
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_finetune_folder_refuses_a_number_of_classes_other_than_the_folders(image_tree, tmp_path):
    root, spec = image_tree
    with pytest.raises(DataError, match="does not match the 3 class folders"):
        finetune_folder(spec, root, tmp_path / "model", size=8, num_classes=5, quiet=True)
    assert not (tmp_path / "model").exists()


def test_inspect_model_shows_layers_traced_or_blocks_with_their_modules(image_tree):
    _, spec = image_tree
    traced = inspect_model(spec, input_shape=(3, 8, 8))
    assert traced.to_dict()["spec"] == spec
    assert [r["name"] for r in traced.to_dict()["layers"]] == ["0", "3", "5"]
    view = inspect_model(spec, show_blocks=True)
    data = view.to_dict()
    assert set(data) == {"spec", "blocks"} and [b["name"] for b in data["blocks"]] == [
        "0",
        "3",
        "5",
    ]
    table = view.rich_table()
    assert table.title == f"{spec} · 3 blocks"
    assert [c.header for c in table.columns] == ["#", "block", "params", "modules"]


def test_study_folder_needs_validation_images(image_tree, tmp_path):
    root, spec = image_tree
    for folder in root.iterdir():
        for extra in sorted(folder.iterdir())[1:]:
            extra.unlink()
    with pytest.raises(NetgraftError, match="gives no validation images"):
        study_folder(spec, root, tmp_path / "out", size=8)


def test_grow_folder_saves_the_verified_operation_and_needs_exactly_one(image_tree, tmp_path):
    _, spec = image_tree
    result = grow_folder(spec, tmp_path / "grown", widen=("3", 24), input_shape=(3, 8, 8))
    assert result.operation["op"] == "widen" and result.operation["args"]["width"] == 24
    assert result.summary() == (
        f"widen(layer='3', width=24, next_layer='5', norm=None) verified; saved to {result.folder}"
    )
    assert (result.folder / "weights.safetensors").is_file()
    with pytest.raises(NetgraftError, match="exactly one of deepen, widen, expand_every"):
        grow_folder(spec, tmp_path / "none")


def test_transfer_folder_reports_every_tensor_writes_the_report_and_saves(image_tree, tmp_path):
    _, spec = image_tree
    result = transfer_folder(spec, spec, tmp_path / "dst", report_path=tmp_path / "report.json")
    assert result.report.summary().startswith("transfer from module Sequential: 6 copied")
    assert json.loads((tmp_path / "report.json").read_text())
    assert (result.folder / "weights.safetensors").is_file()


@pytest.mark.parametrize("train_bn", [False, True])
def test_finetune_folder_keeps_batch_norms_frozen_unless_train_bn(image_tree, tmp_path, train_bn):
    from netgraft.zoo import load_model

    root, _ = image_tree
    torch.manual_seed(0)
    model = load_model("torchvision:resnet18")  # random weights, its spec recorded for saving
    stats = model.layer2[0].bn1.running_mean.clone()
    config = FineTuneConfig(train_bn=train_bn, search=False)
    finetune_folder(model, root, tmp_path / "model", config=config, size=32, epochs=1, seed=0,
                    quiet=True)  # fmt: skip
    changed = not torch.equal(model.layer2[0].bn1.running_mean, stats)
    assert changed == train_bn
