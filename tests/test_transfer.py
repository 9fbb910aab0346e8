"""transfer(): names, suffixes, structural alignment, mappings, policies and the report."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

import netgraft
from netgraft import NetgraftError, SelectionError, ShapeMismatchError, WeightsError
from netgraft.transfer.formats.torch_files import load_state_dict_file


def _resnet18(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(**kwargs)


def _mobilenet_with_extra_block() -> nn.Module:
    """torchvision MobileNetV2 with one new inverted-residual block after features.10; its
    expansion (4 instead of 6) gives it a shape no pretrained block has."""
    model = torchvision.models.mobilenet_v2()
    feats = list(model.features)
    feats.insert(11, InvertedResidual(64, 64, stride=1, expand_ratio=4))
    model.features = nn.Sequential(*feats)
    return model


def _source_index(name: str) -> str:
    """Where a tensor of the grown MobileNet comes from in the pretrained one."""
    parts = name.split(".")
    if parts[0] == "features" and int(parts[1]) > 11:
        parts[1] = str(int(parts[1]) - 1)
    return ".".join(parts)


@pytest.mark.slow
def test_mobilenet_v2_imagenet_weights_align_around_an_inserted_block(
    mobilenet_v2_weights, imagenet_batch
):
    state = load_state_dict_file(mobilenet_v2_weights)
    model = _mobilenet_with_extra_block()
    report = netgraft.transfer(mobilenet_v2_weights, model, example_input=torch.randn(1, 3, 64, 64))

    assert report.mismatched == []
    assert report.unexpected == []
    new = [n for n in report.records if n.startswith("features.11.")]
    assert new and all(report.records[n].status == "kept" for n in new)
    after = report.records["features.12.conv.0.0.weight"]
    assert after.status == "copied" and after.source == "features.11.conv.0.0.weight"
    assert after.how == "structure"
    own = model.state_dict()
    for name, record in report.records.items():
        if name.startswith("features.11."):
            continue
        assert record.status == "copied", name
        assert record.source == _source_index(name), name
        assert torch.equal(own[name], state[record.source]), name
    assert report.loaded_fraction == pytest.approx(
        1
        - sum(p.numel() for p in model.features[11].parameters())
        / sum(p.numel() for p in model.parameters())
    )

    # with its last BatchNorm zeroed the new residual block is an identity: the grown model
    # then classifies the real ImageNet images exactly like the pretrained one
    with torch.no_grad():
        model.features[11].conv[-1].weight.zero_()
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(state)
    x = imagenet_batch[0][:6]
    with torch.no_grad():
        got, want = model.eval()(x), reference.eval()(x)
    assert (got - want).abs().max().item() < 1e-4
    assert (want.argmax(1) == imagenet_batch[1][:6]).float().mean() >= 0.5


def test_dataparallel_checkpoint_loads_fully(tmp_path):
    src = _resnet18()
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(src).state_dict(), path)
    dst = torchvision.models.resnet18()

    report = netgraft.transfer(path, dst)

    report.assert_complete()
    assert report.loaded_fraction == 1.0
    assert report.counts["copied"] == len(dst.state_dict())
    assert report.records["layer1.0.bn1.num_batches_tracked"].source == (
        "module.layer1.0.bn1.num_batches_tracked"
    )
    assert all(r.how == "exact" for r in report.records.values())
    for name, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], value)


def test_other_architecture_under_default_policy_raises_with_names_and_shapes_and_changes_nothing():
    dst = torchvision.models.resnet50()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ShapeMismatchError) as info:
        netgraft.transfer(_resnet18().state_dict(), dst)
    message = str(info.value)
    assert "layer1.0.conv1.weight (64, 64, 1, 1) <- layer1.0.conv1.weight (64, 64, 3, 3)" in message
    assert "nothing was changed" in message
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_skip_policy_reinitialises_mismatched_head_and_reports_both_shapes():
    src = _resnet18()
    dst = torchvision.models.resnet18(num_classes=10)
    report = netgraft.transfer(src, dst, on_mismatch="skip")
    assert report.records["fc.weight"].status == "reinitialised"
    assert report.records["fc.bias"].status == "reinitialised"
    assert [(m.name, m.shape, m.source_shape) for m in report.mismatched] == [
        ("fc.weight", (10, 512), (1000, 512)),
        ("fc.bias", (10,), (1000,)),
    ]
    assert report.counts["copied"] == len(dst.state_dict()) - 2
    with pytest.raises(WeightsError, match=r"fc.weight \(reinitialised\)"):
        report.assert_complete()


def test_adapt_policy_sums_first_conv_channels_and_keeps_chosen_classifier_rows():
    src = _resnet18()
    dst = torchvision.models.resnet18(num_classes=3)
    dst.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    classes = [7, 0, 999]
    report = netgraft.transfer(src, dst, on_mismatch="adapt", classes=classes)

    assert report.records["conv1.weight"].rule == "in_channels_sum"
    assert torch.equal(dst.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    assert report.records["fc.weight"].describe() == "adapted(fc.weight, classifier_rows)"
    assert torch.equal(dst.fc.weight, src.fc.weight[classes])
    assert torch.equal(dst.fc.bias, src.fc.bias[classes])
    assert report.loaded_fraction == 1.0


def test_adapt_policy_repeats_first_conv_for_more_channels_and_resizes_vit_position_embedding():
    src = _resnet18()
    dst = torchvision.models.resnet18()
    dst.conv1 = nn.Conv2d(4, 64, 7, 2, 3, bias=False)
    report = netgraft.transfer(src, dst, on_mismatch="adapt")
    assert report.records["conv1.weight"].rule == "in_channels_repeat"
    expected = torch.cat([src.conv1.weight, src.conv1.weight[:, :1]], 1) * 3 / 4
    assert torch.allclose(dst.conv1.weight, expected)

    from torchvision.models.vision_transformer import VisionTransformer

    def vit(size: int) -> nn.Module:
        torch.manual_seed(size)
        return VisionTransformer(
            image_size=size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
        )

    vit64, vit32 = vit(64), vit(32)
    report = netgraft.transfer(vit64, vit32, on_mismatch="adapt")
    record = report.records["encoder.pos_embedding"]
    assert record.rule == "pos_embed_2d" and record.source_shape == (1, 65, 32)
    assert vit32.encoder.pos_embedding.shape == (1, 17, 32)
    # the class token's position is kept, the 8x8 grid is resized to 4x4
    assert torch.equal(vit32.encoder.pos_embedding[:, 0], vit64.encoder.pos_embedding[:, 0])
    assert report.counts["adapted"] == 1
    assert report.counts["copied"] == len(vit32.state_dict()) - 1


def test_adapt_policy_copies_into_widened_layers_and_refuses_rank_changes():
    src = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    wide = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 2))
    report = netgraft.transfer(src, wide, on_mismatch="adapt")
    assert report.records["0.weight"].rule == "copy_into_larger"
    assert torch.equal(wide[0].weight[:8], src[0].weight)
    assert report.records["2.weight"].rule == "copy_into_larger"
    narrow = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    report = netgraft.transfer(src, narrow, on_mismatch="adapt")
    assert report.records["0.weight"].rule == "slice_from_larger"
    assert torch.equal(narrow[0].weight, src[0].weight[:6])

    conv = nn.Sequential(nn.Conv1d(4, 8, 1))
    with pytest.raises(ShapeMismatchError, match="no adapter fits"):
        netgraft.transfer(
            {"0.weight": torch.zeros(8, 4), "0.bias": torch.zeros(8)}, conv, on_mismatch="adapt"
        )


def test_include_restores_only_selected_layers_and_reports_the_rest():
    src = _resnet18()
    dst = torchvision.models.resnet18()
    report = netgraft.transfer(src, dst, include="re:layer[12]\\..*")
    copied = report.copied
    assert copied and all(n.startswith(("layer1.", "layer2.")) for n in copied)
    assert report.records["conv1.weight"].status == "kept"
    assert report.records["conv1.weight"].note == "not selected"
    assert "fc.weight" in report.not_selected and report.unexpected == []
    assert torch.equal(dst.layer2[1].conv2.weight, src.layer2[1].conv2.weight)
    assert not torch.equal(dst.conv1.weight, src.conv1.weight)
    report.assert_complete(allow_unexpected=True)

    report = netgraft.transfer(src, torchvision.models.resnet18(), exclude="fc")
    assert report.records["fc.weight"].status == "kept"
    with pytest.raises(SelectionError):
        netgraft.transfer(src, dst, include="nothing_here")


def test_mapping_wins_over_names_and_maps_whole_layers():
    src = _resnet18()
    state = {
        ("head." + k[3:] if k.startswith("fc.") else k): v for k, v in src.state_dict().items()
    }
    dst = torchvision.models.resnet18()
    report = netgraft.transfer(
        state, dst, mapping={"fc": "head", r"layer1\.0\.conv1\.weight": "layer1.0.conv2.weight"}
    )
    assert report.records["fc.weight"].source == "head.weight"
    assert report.records["fc.weight"].how == "mapping"
    assert report.records["layer1.0.conv1.weight"].source == "layer1.0.conv2.weight"
    assert torch.equal(dst.layer1[0].conv1.weight, src.layer1[0].conv2.weight)
    assert report.unexpected == ["layer1.0.conv1.weight"]  # mapped around, so reported
    with pytest.raises(NetgraftError, match="does not exist"):
        netgraft.transfer(state, dst, mapping={"fc": "classifier"})


def test_suffix_match_finds_wrapped_names_and_ambiguity_names_the_candidates():
    src = _resnet18()
    wrapped = nn.Sequential(torchvision.models.resnet18())
    report = netgraft.transfer(src, wrapped)
    report.assert_complete()
    assert report.records["0.layer3.1.conv2.weight"].how == "suffix"

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

    twins = {f"{side}.fc.{p}": t for side in "ab" for p, t in nn.Linear(3, 2).state_dict().items()}
    with pytest.raises(NetgraftError, match=r"a\.fc\.weight, b\.fc\.weight"):
        netgraft.transfer(twins, Head())
    report = netgraft.transfer(twins, Head(), match=("exact", "structure"))
    side = report.records["fc.weight"].source.split(".")[0]
    other = "b" if side == "a" else "a"
    assert report.records["fc.bias"].source == f"{side}.fc.bias"
    assert sorted(report.unexpected) == [f"{other}.fc.bias", f"{other}.fc.weight"]


def test_structural_alignment_survives_renamed_and_removed_layers():
    src = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 3),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    # renamed modules, one conv+bn removed from the middle
    dst = nn.ModuleDict(
        {
            "stem": nn.Conv2d(3, 8, 3),
            "norm": nn.BatchNorm2d(8),
            "mix": nn.Conv2d(8, 16, 3),
            "mix_bn": nn.BatchNorm2d(16),
            "fc": nn.Linear(16, 4),
        }
    )
    report = netgraft.transfer(src, dst)
    assert report.records["stem.weight"].source == "0.weight"
    assert report.records["mix_bn.running_var"].source == "3.running_var"
    assert report.records["fc.weight"].source == "6.weight"
    assert report.unexpected == ["4.weight", "4.bias"]
    assert report.mismatched == []


def test_report_serialises_to_json_and_renders_a_table(tmp_path):
    report = netgraft.transfer(
        _resnet18(), torchvision.models.resnet18(num_classes=10), on_mismatch="skip"
    )
    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert data == json.loads((tmp_path / "r.json").read_text())
    assert data["counts"]["reinitialised"] == 2
    assert data["mismatched"][0]["source_shape"] == [1000, 512]
    row = next(t for t in data["tensors"] if t["name"] == "layer4.1.bn2.running_mean")
    assert row["status"] == "copied" and row["how"] == "exact"
    console = Console(record=True, width=200)
    console.print(report.table())
    text = console.export_text()
    assert "reinitialised" in text and "fc.weight" in text and "mismatched:" in text


def test_bad_source_and_policy_are_clear_errors(tmp_path):
    dst = nn.Linear(2, 2)
    with pytest.raises(NetgraftError, match="on_mismatch must be one of"):
        netgraft.transfer(nn.Linear(2, 2), dst, on_mismatch="ignore")
    with pytest.raises(WeightsError, match="does not exist"):
        netgraft.transfer(tmp_path / "missing.safetensors", dst)
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="not a Keras 3 archive"):
        netgraft.transfer(bad, dst)


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the ``netgraft`` entry point in this process (a subprocess would import torch again)."""
    from netgraft.cli import main

    monkeypatch.setattr("sys.argv", ["netgraft", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli_transfer_saves_a_reloadable_folder_and_a_json_report(tmp_path, monkeypatch, capsys):
    src = _resnet18(num_classes=10)
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(src).state_dict(), path)
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    args = ["transfer", str(path), "torchvision:resnet18", "-o", str(out)]
    code, stdout, stderr = _cli(
        monkeypatch,
        capsys,
        *args,
        "--on-mismatch",
        "skip",
        "--map",
        "layer1.0.conv1=layer1.0.conv2",
        "--report",
        str(report_path),
    )
    assert code == 0, stderr
    assert "reinitialised" in stdout and "saved to" in stdout
    data = json.loads(report_path.read_text())
    assert data["counts"] == {"copied": 120, "adapted": 0, "kept": 0, "reinitialised": 2}
    assert "module.layer1.0.conv1.weight" in data["unexpected"]
    loaded = netgraft.load(out)
    assert torch.equal(loaded.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert torch.equal(loaded.layer1[0].conv1.weight, src.layer1[0].conv2.weight)

    code, stdout, stderr = _cli(monkeypatch, capsys, *args, "-o", str(tmp_path / "other"))
    assert code == 1
    assert stderr.startswith("netgraft: error:") and "fc.weight (1000, 512) <-" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "other").exists()
