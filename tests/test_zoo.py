"""Model specs and weights files: real weights load, pickles never run, errors are one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import netgraft
from netgraft import SpecError, WeightsError
from netgraft.zoo import load_model, load_weights, parse_spec

NETGRAFT = str(Path(sys.executable).with_name("netgraft"))
PYTHON_M = [sys.executable, "-m", "netgraft"]


@pytest.mark.slow
def test_real_mobilenet_v2_weights_classify_foolbox_imagenet_images(
    mobilenet_v2_weights, imagenet_batch
):
    model = load_model("torchvision:mobilenet_v2", weights=mobilenet_v2_weights).eval()
    x, y = imagenet_batch
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    assert len(y) == 20 and correct >= 17, f"{correct}/20 right"


def test_wrapped_checkpoint_with_module_prefix_is_unwrapped(tmp_path):
    torch.manual_seed(0)
    source = load_model("torchvision:mobilenet_v3_small")
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pth")
    model = load_model("torchvision:mobilenet_v3_small", weights=tmp_path / "ckpt.pth")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())


def test_weights_that_do_not_fit_name_what_is_wrong(tmp_path):
    torch.save({"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"mismatched: weight \(file \(3, 2\), model \(4, 2\)\)"):
        load_weights(nn.Linear(2, 4), tmp_path / "w.pt")


class _RunsCode:
    """Unpickling this object opens (creates) a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _RunsCode(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(WeightsError, match="trust_pickle=True.*--trust-pickle"):
        load_weights(nn.Linear(2, 2), evil)
    assert not marker.exists()
    # the marker does detect execution: trusting the file runs its code
    with pytest.raises(WeightsError, match="holds no state dict"):
        load_weights(nn.Linear(2, 2), evil, trust_pickle=True)
    assert marker.exists()


def test_pretrained_offline_is_one_error_saying_how_to_pass_a_file(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SpecError, match="weights='FILE'"):
        load_model("torchvision:resnet18", pretrained=True)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty model spec"),
        ("torchvision:", "names no model"),
        ("torchvision:resnet81", "did you mean resnet18"),
        ("timm:resnet1", "timm has no model"),
        ("model.py", "names a file but no function"),
        ("nowhere/model.py:build", "does not exist"),
        ("nosuch:thing", "unknown model spec"),
    ],
)
def test_bad_specs_are_one_clear_error(spec, message):
    with pytest.raises(SpecError, match=message):
        load_model(spec)


def test_parse_spec_kinds(tmp_path):
    assert parse_spec("timm:resnet18") == ("timm", "resnet18")
    assert parse_spec("hf:some/folder") == ("hf", "some/folder")
    assert parse_spec("a/b.py:build") == ("file", "a/b.py:build")
    assert parse_spec(str(tmp_path)) == ("folder", str(tmp_path))


def _write_builder(folder: Path) -> Path:
    path = folder / "net.py"
    path.write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build(classes=3):
                return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, classes))
            """
        )
    )
    return path


def test_file_spec_passes_kwargs_and_records_its_base(tmp_path):
    path = _write_builder(tmp_path)
    model = load_model(f"{path}:build", classes=5)
    assert model[-1].out_features == 5
    assert netgraft.get_recipe(model).base == {"spec": f"{path.resolve()}:build", "classes": 5}
    with pytest.raises(SpecError, match="has no function 'buld'.*did you mean build"):
        load_model(f"{path}:buld")


@pytest.mark.slow
def test_cli_inspect_accepts_every_spec_kind_and_bad_weights_are_one_line(tmp_path, minilm_dir):
    builder = _write_builder(tmp_path)
    saved = tmp_path / "saved"
    netgraft.save(netgraft.replace_head(load_model(f"{builder}:build"), num_classes=4), saved)
    good = load_model("torchvision:mobilenet_v3_small")
    netgraft.save(good, tmp_path / "mnv3")
    weights = (tmp_path / "mnv3" / "weights.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    ok_runs = {
        "torchvision": ["torchvision:resnet18", "--blocks"],
        "timm": ["timm:resnet18", "--blocks"],
        "hf": [f"hf:{minilm_dir}", "--input-shape", "8"],
        "file": [f"{builder}:build", "--input-shape", "3,2,2"],
        "folder": [str(saved), "--input-shape", "3,2,2"],
    }
    # a bad spec and a missing file are covered by test_cli_inspect.py; the pickle by the
    # library test above
    bad_runs = {
        "truncated": (
            [
                "torchvision:mobilenet_v3_small",
                "--weights",
                str(tmp_path / "truncated.safetensors"),
            ],
            "corrupt or truncated",
        ),
        "corrupt": (
            ["torchvision:mobilenet_v3_small", "--weights", str(tmp_path / "corrupt.pt")],
            "corrupt or truncated",
        ),
    }
    # all at once: each run mostly waits on importing torch
    procs = {
        name: subprocess.Popen(
            [*(PYTHON_M if name == "file" else [NETGRAFT]), "inspect", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in [*ok_runs.items(), *((k, v[0]) for k, v in bad_runs.items())]
    }
    results = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    for name in ok_runs:
        code, out, err = results[name]
        assert code == 0, f"{name}: {err}"
    assert "fc" in results["torchvision"][1] and "layer4" in results["timm"][1]
    assert "encoder.layer.5" in results["hf"][1] and "3.weight" not in results["file"][1]
    assert "Linear" in results["folder"][1]
    for name, (_, expected) in bad_runs.items():
        code, out, err = results[name]
        lines = [line for line in err.splitlines() if line.strip()]
        assert code != 0, name
        assert "Traceback" not in out + err, f"{name}: {err}"
        assert len(lines) == 1 and expected in lines[0], f"{name}: {err}"
