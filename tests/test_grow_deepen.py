"""deepen: new layers in the middle of trained networks that change nothing until trained."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import netgraft
from netgraft.errors import EquivalenceError, NetgraftError, SelectionError, SurgeryError
from netgraft.recipe import replay


def tutorial_net() -> nn.Sequential:
    """The Keras tutorial network: conv -> flatten -> dense 20 relu -> dense 10."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 8, 3),
            conv_act=nn.ReLU(),
            flatten=nn.Flatten(),
            hidden=nn.Linear(8 * 6 * 6, 20),
            hidden_act=nn.ReLU(),
            out=nn.Linear(20, 10),
        )
    )


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


@pytest.fixture(scope="module")
def trained_digits(digits):
    x, y = digits
    torch.manual_seed(0)
    model = tutorial_net()
    fit(model, x[:1400], y[:1400], epochs=3, lr=3e-3)
    return model, (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.mark.slow
def test_deepen_after_hidden_dense_keeps_digits_accuracy_and_training_new_layer_keeps_or_improves(
    trained_digits,
):
    base, (x_train, y_train), (x_test, y_test) = trained_digits
    model = copy.deepcopy(base)
    before_acc = accuracy(model, x_test, y_test)
    before_logits = model(x_test).detach()
    netgraft.deepen(model, "hidden", activation="relu", example_input=x_train[:8])
    assert isinstance(model.hidden, netgraft.grow.Deepened)
    assert netgraft.grown_modules(model) == ["hidden.1"]
    assert accuracy(model, x_test, y_test) == before_acc
    assert (model(x_test) - before_logits).abs().max().item() <= 1e-5
    old = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("hidden.1.")}
    netgraft.train_only(model, netgraft.grown_modules(model))
    fit(model, x_train, y_train, epochs=3, lr=1e-3)
    after_acc = accuracy(model, x_test, y_test)
    print(
        f"digits test accuracy: trained {before_acc:.4f}, deepened + new layer trained {after_acc:.4f}"
    )
    assert after_acc >= before_acc, (before_acc, after_acc)
    for k, v in old.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_deepen_is_exact_in_float64_and_moves_the_original_to_dot_zero(trained_digits):
    base, (x_train, _), (x_test, _) = trained_digits
    model = copy.deepcopy(base).double()
    x = x_test.double()
    expected = model(x).detach()
    netgraft.deepen(model, "hidden", mode="residual", example_input=x_train[:4].double())
    netgraft.deepen(model, "hidden_act", mode="identity", activation="relu", example_input=x[:4])
    keys = set(model.state_dict())
    assert {"hidden.0.weight", "hidden.1.branch.0.weight", "hidden.1.branch.2.weight"} <= keys
    assert "hidden_act.1.weight" in keys
    assert torch.equal(model.hidden_act[1].weight, torch.eye(20, dtype=torch.float64))
    assert netgraft.verify_equivalence(copy.deepcopy(base).double(), model, x) <= 1e-10
    assert (model(x) - expected).abs().max().item() <= 1e-10


def test_zero_initialised_residual_still_receives_gradient(trained_digits):
    base, (x_train, y_train), _ = trained_digits
    model = copy.deepcopy(base)
    netgraft.deepen(model, "hidden", mode="residual", example_input=x_train[:4])
    nn.functional.cross_entropy(model(x_train[:64]), y_train[:64]).backward()
    last = model.hidden[1].branch[2]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0


def test_auto_picks_identity_after_relu_output_and_residual_after_linear(trained_digits):
    base, (x_train, _), _ = trained_digits
    model = copy.deepcopy(base)
    netgraft.deepen(model, ["hidden", "hidden_act"], activation="relu", example_input=x_train[:4])
    assert isinstance(model.hidden[1], netgraft.grow.Residual)
    assert isinstance(model.hidden_act[1], nn.Linear)
    assert isinstance(model.hidden_act[2], nn.ReLU)
    op = netgraft.get_recipe(model).operations[-1]
    assert op["op"] == "deepen"
    assert op["args"]["mode"] == {"hidden": "residual", "hidden_act": "identity"}


def test_recorded_deepen_replays_on_a_fresh_base_without_an_input(trained_digits):
    base, (x_train, _), (x_test, _) = trained_digits
    model = copy.deepcopy(base)
    netgraft.deepen(model, "hidden", activation="relu", example_input=x_train[:4])
    netgraft.deepen(model, "conv", example_input=x_train[:4])
    rebuilt = replay(tutorial_net(), netgraft.get_recipe(model).operations)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert torch.equal(rebuilt(x_test), model(x_test))


def test_refuses_identity_relu_after_a_layer_whose_output_can_be_negative(trained_digits):
    base, (x_train, _), (x_test, _) = trained_digits
    model = copy.deepcopy(base)
    with pytest.raises(SurgeryError, match="non-negative"):
        netgraft.deepen(
            model, "hidden", mode="identity", activation="relu", example_input=x_train[:4]
        )
    with pytest.raises(SurgeryError, match="tanh"):
        netgraft.deepen(
            model, "hidden_act", mode="identity", activation="tanh", example_input=x_train[:4]
        )
    assert isinstance(model.hidden, nn.Linear)  # nothing changed
    assert torch.equal(model(x_test), base(x_test))


def test_refuses_dirac_with_stride_two_or_unequal_channels(trained_digits):
    base, (x_train, _), _ = trained_digits
    model = copy.deepcopy(base)
    with pytest.raises(SurgeryError, match="stride"):
        netgraft.deepen(model, "conv", mode="identity", stride=2, example_input=x_train[:4])
    with pytest.raises(SurgeryError, match="equal channels"):
        netgraft.deepen(model, "conv", mode="identity", width=16, example_input=x_train[:4])
    with pytest.raises(SurgeryError, match="odd kernel"):
        netgraft.deepen(model, "conv", mode="identity", kernel_size=2, example_input=x_train[:4])
    with pytest.raises(SurgeryError, match="stride"):
        netgraft.deepen(model, "conv", stride=2, example_input=x_train[:4])
    assert isinstance(model.conv, nn.Conv2d)


def test_refuses_bad_arguments_with_clear_errors(trained_digits):
    base, (x_train, _), _ = trained_digits
    model = copy.deepcopy(base)
    with pytest.raises(NetgraftError, match="mode must be one of"):
        netgraft.deepen(model, "hidden", mode="nearly", example_input=x_train[:4])
    with pytest.raises(NetgraftError, match="activation must be one of"):
        netgraft.deepen(model, "hidden", activation="swishy", example_input=x_train[:4])
    with pytest.raises(SelectionError, match="hidden"):
        netgraft.deepen(model, "hiden", example_input=x_train[:4])


class _ShiftedAfterRelu(nn.Module):
    """Returns its ReLU's output tensor after shifting it in place: it looks non-negative to
    a structural proof but is not, which only verification can catch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.act(self.lin(x))
        out -= 0.5
        return out


def test_verification_catches_a_non_exact_insertion_and_puts_the_model_back():
    torch.manual_seed(0)
    model = nn.Sequential(_ShiftedAfterRelu(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    expected = model(x).detach()
    with pytest.raises(EquivalenceError, match=r"max \|Δ\| = \d"):
        netgraft.deepen(model, "0", mode="identity", activation="relu", example_input=x)
    assert isinstance(model[0], _ShiftedAfterRelu)
    assert torch.equal(model(x), expected)
    assert netgraft.get_recipe(model).operations == []


@pytest.mark.slow
def test_dirac_insertion_in_resnet18_keeps_logits_and_predictions():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    expected = model(x).detach()
    netgraft.deepen(model, "layer2.0.conv1", mode="identity", example_input=x[:2])
    netgraft.deepen(model, "layer3", mode="identity", activation="relu", example_input=x[:2])
    assert isinstance(model.layer2[0].conv1[1], nn.Conv2d)
    assert model.layer2[0].conv1[1].weight[:, :, 1, 1].equal(torch.eye(128, dtype=torch.float64))
    assert isinstance(model.layer3[2], nn.ReLU)  # the block's output is a ReLU output
    logits = model(x)
    assert (logits - expected).abs().max().item() <= 1e-10
    assert torch.equal(logits.argmax(1), expected.argmax(1))


@pytest.mark.slow
def test_residual_after_every_inverted_residual_of_pretrained_mobilenet_keeps_imagenet_predictions(
    mobilenet_v2_weights, imagenet_batch
):
    x, labels = imagenet_batch
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet_v2_weights, weights_only=True))
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert (expected.argmax(1) == labels).float().mean() >= 0.8  # the real weights are loaded
    netgraft.deepen(model, "type:InvertedResidual", mode="residual", example_input=x[:2])
    grown = netgraft.grown_modules(model)
    assert len(grown) == 17 and grown[0] == "features.1.1"
    with torch.no_grad():
        logits = model(x)
    assert (logits - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert torch.equal(logits.argmax(1), expected.argmax(1))


NETGRAFT = str(Path(sys.executable).with_name("netgraft"))
TUTORIAL_FILE = """
from collections import OrderedDict
from torch import nn

def build():
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 8, 3), conv_act=nn.ReLU(), flatten=nn.Flatten(),
        hidden=nn.Linear(8 * 6 * 6, 20), hidden_act=nn.ReLU(), out=nn.Linear(20, 10)))
"""


def _netgraft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NETGRAFT, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_grow_cli_saves_a_folder_that_reloads_to_the_same_function(tmp_path, trained_digits):
    base, _, (x_test, _) = trained_digits
    (tmp_path / "net.py").write_text(TUTORIAL_FILE)
    weights = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    spec = f"{tmp_path / 'net.py'}:build"
    out = tmp_path / "grown"
    result = _netgraft(
        "grow",
        spec,
        "--weights",
        str(weights),
        "--deepen",
        "hidden",
        "--activation",
        "relu",
        "--input-shape",
        "1,8,8",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "mode='residual'" in result.stdout and "verified" in result.stdout
    grown = netgraft.load_model(str(out)).eval()
    assert netgraft.grown_modules(grown) == ["hidden.1"]
    with torch.no_grad():
        assert (grown(x_test) - base(x_test)).abs().max().item() <= 1e-5
    wide = tmp_path / "wide"
    result = _netgraft(
        "grow", str(out), "--widen", "conv:12", "--input-shape", "1,8,8", "-o", str(wide)
    )
    assert result.returncode == 0, result.stderr
    assert netgraft.load_model(str(wide)).conv.out_channels == 12


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--deepen", "hidden", "--widen", "conv:12"], "exactly one of"),
        (["--deepen", "hidden", "--mode", "identity", "--activation", "relu"], "non-negative"),
    ],
)
def test_grow_cli_refuses_in_one_line(tmp_path, args, expected):
    (tmp_path / "net.py").write_text(TUTORIAL_FILE)
    spec = f"{tmp_path / 'net.py'}:build"
    result = _netgraft("grow", spec, *args, "--input-shape", "1,8,8", "-o", str(tmp_path / "o"))
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
