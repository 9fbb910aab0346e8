"""Image folders, tensors and arrays, and the input config of real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import netgraft
from netgraft.data import (
    DataConfig,
    as_dataset,
    data_config,
    image_folder,
    read_data_info,
    write_data_info,
)
from netgraft.errors import DataError


def write_digit_folder(root: Path, digits, classes=(0, 1, 2), per_class=5, size=32) -> Path:
    """Real scikit-learn digits written as greyscale PNG files, one folder per class."""
    x, y = digits
    for c in classes:
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in (y == c).nonzero().flatten()[:per_class].tolist():
            pixels = (x[i, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(
                root / str(c) / f"{i}.png"
            )
    return root


def test_class_folders_split_per_class_and_become_normalised_rgb_tensors(tmp_path, digits):
    root = write_digit_folder(tmp_path / "d", digits, per_class=5)
    model = netgraft.load_model("torchvision:mobilenet_v2")
    split = image_folder(root, model, size=48, val_fraction=0.2, seed=0)
    assert split.classes == ["0", "1", "2"]
    assert len(split.train) == 12 and len(split.val) == 3
    assert sorted(label for _, label in split.val.samples) == [0, 1, 2]
    assert not {p for p, _ in split.train.samples} & {p for p, _ in split.val.samples}
    x, label = split.train[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    # a black background normalised with ImageNet statistics: (0 - mean) / std per channel
    corner = x[:, 0, 0]
    expected = -torch.tensor(split.config.mean) / torch.tensor(split.config.std)
    assert torch.allclose(corner, expected, atol=1e-5)


def test_torchvision_and_timm_models_give_their_own_data_config():
    tv = data_config(netgraft.load_model("torchvision:mobilenet_v2"))
    assert tv.input_size == (3, 224, 224) and tv.resize == 232  # torchvision's IMAGENET1K_V2
    timm_model = netgraft.load_model("timm:mobilenetv3_small_050")
    cfg = data_config(timm_model)
    assert cfg.interpolation == "bicubic" and cfg.resize == 256
    assert data_config(timm_model, size=112).resize == 128


def test_model_with_one_input_channel_gets_grey_images(tmp_path, digits):
    root = write_digit_folder(tmp_path / "d", digits, classes=(3, 4), per_class=3)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    split = image_folder(root, model, size=16, val_fraction=0.0)
    assert split.val is None
    assert split.config.input_size[0] == 1 and len(split.config.mean) == 1
    assert split.train[0][0].shape == (1, 16, 16)


def test_train_and_val_folders_are_used_when_present(tmp_path, digits):
    write_digit_folder(tmp_path / "d" / "train", digits, classes=(0, 1), per_class=4)
    write_digit_folder(tmp_path / "d" / "val", digits, classes=(1,), per_class=2)
    split = image_folder(tmp_path / "d", size=16)
    assert len(split.train) == 8 and len(split.val) == 2
    assert {label for _, label in split.val.samples} == {1}  # mapped to the training index


def test_augmentation_applies_to_training_set_only(tmp_path, digits):
    root = write_digit_folder(tmp_path / "d", digits, per_class=4)
    split = image_folder(root, size=32, augment=True)
    names = repr(split.train.transform)
    assert "RandomResizedCrop" in names and "ColorJitter" in names
    assert "Random" not in repr(split.val.transform)
    torch.manual_seed(0)
    a = split.train[0][0]
    torch.manual_seed(1)
    assert not torch.equal(a, split.train[0][0])
    with pytest.raises(DataError, match="unknown augmentation"):
        image_folder(root, size=32, augment=["rotate"])


@pytest.mark.parametrize(
    "problem", ["missing", "empty", "empty_class", "single_class", "bad_image"]
)
def test_bad_data_folders_raise_one_clear_error(tmp_path, digits, problem):
    root = tmp_path / "d"
    if problem == "empty":
        root.mkdir()
    elif problem == "empty_class":
        write_digit_folder(root, digits, classes=(0, 1), per_class=2)
        (root / "7").mkdir()
    elif problem == "single_class":
        write_digit_folder(root, digits, classes=(0,), per_class=3)
    elif problem == "bad_image":
        write_digit_folder(root, digits, classes=(0, 1), per_class=2)
        (root / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    messages = {
        "missing": "does not exist",
        "empty": "holds no class folders",
        "empty_class": "7 hold no images",
        "single_class": "single class",
        "bad_image": "broken.png",
    }
    with pytest.raises(DataError, match=messages[problem]):
        image_folder(root, size=16)


def test_tensors_and_numpy_arrays_become_datasets(digits):
    x, y = digits
    ds = as_dataset((x.numpy().astype(np.float64), y.numpy().astype(np.int32)))
    xi, yi = ds[0]
    assert xi.dtype == torch.float32 and yi.dtype == torch.int64 and len(ds) == len(y)
    with pytest.raises(DataError, match="same length"):
        as_dataset((x, y[:10]))
    with pytest.raises(DataError, match="expected a torch Dataset"):
        as_dataset("digits/")


def test_data_info_round_trips_classes_and_config(tmp_path):
    cfg = DataConfig(input_size=(1, 28, 28), mean=(0.5,), std=(0.25,), resize=32)
    write_data_info(tmp_path, ["cat", "dog"], cfg)
    classes, back = read_data_info(tmp_path)
    assert classes == ["cat", "dog"] and back == cfg
    with pytest.raises(DataError, match="data.json"):
        read_data_info(tmp_path / "nowhere")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from netgraft.cli import main

    monkeypatch.setattr("sys.argv", ["netgraft", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("problem", ["empty", "single_class", "bad_image"])
def test_cli_finetune_on_a_bad_folder_prints_one_line_and_exits_nonzero(
    tmp_path, digits, monkeypatch, capsys, problem
):
    root = tmp_path / "d"
    if problem == "empty":
        root.mkdir()
    elif problem == "single_class":
        write_digit_folder(root, digits, classes=(0,), per_class=2)
    else:
        write_digit_folder(root, digits, classes=(0, 1), per_class=2)
        (root / "0" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "finetune",
        "torchvision:mobilenet_v2",
        "--data",
        str(root),
        "-o",
        str(tmp_path / "out"),
        "--quiet",
    )
    assert code == 1 and out == ""
    assert err.startswith("netgraft: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_political_passages_are_real_labelled_text_split_by_speech():
    from netgraft.data import load_political_passages

    p = load_political_passages(words=64)
    assert len(p.texts) == len(p.labels) == len(p.documents) > 2000
    assert set(p.labels.tolist()) == {0, 1} and p.classes == ("democrat", "republican")
    # no speaker tags, stage notes or audience chants survive the cleaning
    joined = " ".join(p.texts[:300])
    assert "OBAMA:" not in joined and "(Cheers" not in joined and "AUDIENCE" not in joined
    assert all(32 <= len(t.split()) <= 64 for t in p.texts)
    # every speech belongs to one party
    for doc in p.documents.unique()[:40]:
        assert p.labels[p.documents == doc].unique().numel() == 1


def test_english_text_is_pydoc_topics():
    from netgraft.data import load_english_text

    text = load_english_text()
    assert len(text) > 400_000 and "assignment" in text
