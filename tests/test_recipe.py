"""save / load: a saved model is weights.safetensors + recipe.yaml and reloads exactly."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import netgraft
from netgraft import RecipeError, WeightsError
from netgraft.cut import cut
from netgraft.recipe import OPERATIONS, operation, recorded, replay, set_base


@pytest.fixture(scope="module")
def images(imagenet_batch):
    return imagenet_batch[0][:4]


@pytest.mark.slow
def test_replace_head_save_load_is_exact_and_keeps_the_backbone(
    tmp_path, mobilenet_v2_weights, images
):
    original = netgraft.load_model("torchvision:mobilenet_v2", weights=mobilenet_v2_weights)
    original.eval()
    with torch.no_grad():
        backbone_before = cut(original, at="features")[0](images)
    model = netgraft.replace_head(original, num_classes=10)
    folder = netgraft.save(model, tmp_path / "mnv2-10")
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml", "weights.safetensors"]
    loaded = netgraft.load(folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
        assert torch.equal(cut(loaded, at="features")[0](images), backbone_before)
    assert loaded.classifier[-1].out_features == 10
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    assert recipe["base"] == {"spec": "torchvision:mobilenet_v2"}
    assert recipe["operations"] == [{"op": "replace_head", "args": {"num_classes": 10}}]
    assert recipe["netgraft"] == netgraft.__version__ and recipe["torch"] == torch.__version__


def test_truncate_and_attach_replay_from_the_recipe(tmp_path):
    torch.manual_seed(0)
    model = netgraft.load_model("torchvision:resnet18")
    model = netgraft.truncate(model, at="layer4")
    model = netgraft.attach(model, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 3))
    model.eval()
    netgraft.save(model, tmp_path / "r18")
    loaded = netgraft.load(tmp_path / "r18").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    ops = [op["op"] for op in netgraft.get_recipe(loaded).operations]
    assert ops == ["truncate", "attach"]
    netgraft.save(loaded, tmp_path / "again")  # a loaded model can be saved again


def test_file_spec_model_with_tied_weights_survives_safetensors(tmp_path, monkeypatch):
    (tmp_path / "tiny_lm.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class TinyLM(nn.Module):
                def __init__(self, vocab, dim):
                    super().__init__()
                    self.embed = nn.Embedding(vocab, dim)
                    self.out = nn.Linear(dim, vocab, bias=False)
                    self.out.weight = self.embed.weight  # tied

                def forward(self, ids):
                    return self.out(self.embed(ids))

            def build(vocab=20, dim=8):
                return TinyLM(vocab, dim)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    model = netgraft.load_model("tiny_lm.py:build", vocab=30)
    with torch.no_grad():
        model.embed.weight.normal_()
    netgraft.save(model, tmp_path / "lm")
    monkeypatch.chdir(tmp_path.parent)  # the recorded spec is absolute
    loaded = netgraft.load(tmp_path / "lm")
    assert loaded.out.weight is loaded.embed.weight
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    ids = torch.tensor([[1, 2, 29]])
    assert torch.equal(loaded(ids), model(ids))


def test_a_model_without_base_is_refused_with_how_to_fix(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RecipeError, match="load_model.*set_base"):
        netgraft.save(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    set_base(model, "torchvision:resnet18")  # wrong architecture: load must say so
    netgraft.save(model, tmp_path / "x")
    with pytest.raises(WeightsError, match="does not fit"):
        netgraft.load(tmp_path / "x")


def test_attaching_a_custom_module_makes_save_refuse_and_write_nothing(tmp_path):
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    model = netgraft.load_model("torchvision:resnet18")
    model = netgraft.attach(model, Scale())
    with pytest.raises(RecipeError, match="Scale.*not a standard torch.nn layer"):
        netgraft.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_foreign_folder_and_replaces_its_own(tmp_path):
    model = netgraft.load_model("torchvision:mobilenet_v3_small")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"not really")
    with pytest.raises(RecipeError, match="not a netgraft folder"):
        netgraft.save(model, foreign)
    assert (foreign / "cat.jpg").read_bytes() == b"not really"
    netgraft.save(model, tmp_path / "m")
    netgraft.replace_head(model, num_classes=4)
    netgraft.save(model, tmp_path / "m")
    assert netgraft.load(tmp_path / "m").classifier[-1].out_features == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "photos"]


def test_a_crash_while_saving_leaves_no_folder_under_the_final_name(tmp_path, monkeypatch):
    import safetensors.torch

    model = netgraft.load_model("torchvision:mobilenet_v3_small")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        netgraft.save(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_load_reports_a_truncated_weights_file(tmp_path):
    model = netgraft.load_model("torchvision:mobilenet_v3_small")
    netgraft.save(model, tmp_path / "m")
    weights = tmp_path / "m" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="corrupt, truncated"):
        netgraft.load(tmp_path / "m")


@pytest.mark.slow
def test_hf_sequence_classifier_round_trips(tmp_path, minilm_dir):
    from netgraft.zoo import input_for

    model = netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification").eval()
    netgraft.replace_head(model, num_classes=3, hidden=16)
    netgraft.save(model, tmp_path / "clf")
    loaded = netgraft.load(tmp_path / "clf").eval()
    x = input_for(model, (8,), batch=2)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)
    assert loaded.config.num_labels == 3


# --- the operation registry: explicit, whatever was imported before ---------------------

_FRESH_REPLAY = r"""
import json, sys, types
from collections import OrderedDict

# an empty netgraft package, so netgraft/__init__.py (which imports every module) never
# runs: only what netgraft.recipe itself imports is loaded
package = types.ModuleType("netgraft")
package.__path__ = [sys.argv[1]]
sys.modules["netgraft"] = package

import torch
import transformers
from torch import nn

import netgraft.recipe as recipe

before = sorted(m for m in sys.modules if m.startswith(("netgraft.heads", "netgraft.grow")))
recipes = json.loads(sys.stdin.read())
torch.manual_seed(0)
net = nn.Sequential(OrderedDict(
    conv=nn.Conv2d(1, 4, 3, padding=1), act=nn.ReLU(), flat=nn.Flatten(),
    hidden=nn.Linear(4 * 8 * 8, 16), hidden_act=nn.ReLU(), fc=nn.Linear(16, 10),
))
gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
))
out = {"before": before}
for key, base in (("net", net), ("gpt2", gpt2)):
    model = recipe.replay(base, recipes[key])
    out[key] = {k: list(v.shape) for k, v in model.state_dict().items()}
    out[key + "_repr"] = repr(model)
out["after"] = sorted(m for m in sys.modules if m.startswith(("netgraft.heads", "netgraft.grow")))
print(json.dumps(out))
"""


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 4, 3, padding=1),
            act=nn.ReLU(),
            flat=nn.Flatten(),
            hidden=nn.Linear(4 * 8 * 8, 16),
            hidden_act=nn.ReLU(),
            fc=nn.Linear(16, 10),
        )
    )


def _small_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def test_replay_in_a_fresh_interpreter_that_imported_only_netgraft_recipe():
    net = _small_net().eval()
    x = torch.randn(2, 1, 8, 8)
    netgraft.replace_head(net, num_classes=5)
    netgraft.deepen(net, "hidden_act", activation="relu", example_input=x)
    netgraft.widen(net, "conv", 6, example_input=x)
    gpt2 = _small_gpt2()
    netgraft.expand_blocks(gpt2, every=1)
    netgraft.replace_head(gpt2, num_classes=3)
    recipes = {
        "net": netgraft.get_recipe(net).operations,
        "gpt2": netgraft.get_recipe(gpt2).operations,
    }
    assert [op["op"] for op in recipes["net"]] == ["replace_head", "deepen", "widen"]
    assert [op["op"] for op in recipes["gpt2"]] == ["expand_blocks", "replace_head"]

    package_dir = Path(netgraft.__file__).parent
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_REPLAY, str(package_dir)],
        input=json.dumps(recipes),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["before"] == []  # importing netgraft.recipe loaded no operation module
    assert "netgraft.heads" in out["after"] and "netgraft.grow.expand" in out["after"]
    assert out["net"] == {k: list(v.shape) for k, v in net.state_dict().items()}
    assert out["net_repr"] == repr(net)
    assert out["gpt2"] == {k: list(v.shape) for k, v in gpt2.state_dict().items()}
    assert out["gpt2_repr"] == repr(gpt2)


def _recorded_in_source() -> dict[str, str]:
    """Every ``@recorded("name", ...)`` in src/netgraft, as name -> "module:function"."""
    root = Path(netgraft.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Call)
                    and getattr(deco.func, "id", getattr(deco.func, "attr", None)) == "recorded"
                ):
                    found[deco.args[0].value] = f"{module}:{node.name}"
    return found


def test_operation_table_lists_exactly_the_recorded_functions_in_the_source():
    assert OPERATIONS == _recorded_in_source()
    for name in OPERATIONS:
        assert callable(operation(name))


def test_an_operation_missing_from_the_table_is_refused_where_it_is_defined():
    with pytest.raises(RecipeError, match="not in netgraft.recipe.OPERATIONS"):

        @recorded("stretch")
        def stretch(model: nn.Module) -> nn.Module:
            return model


def test_replay_names_the_known_operations_for_an_unknown_one():
    with pytest.raises(RecipeError, match="'stretch'.*known: add_adapters, attach, deepen"):
        replay(_small_net(), [{"op": "stretch", "args": {}}])


def test_growth_records_resolved_arguments_and_never_the_probe_batch():
    net = _small_net().eval()
    x = torch.randn(2, 1, 8, 8)
    netgraft.deepen(net, "type:ReLU", example_input=x, atol=1e-4)
    netgraft.widen(net, "re:hid.*n", 20, example_input=x, verify=True)
    deepen, widen = netgraft.get_recipe(net).operations
    assert deepen == {
        "op": "deepen",
        "args": {
            "after": ["act", "hidden_act"],
            "mode": "identity",
            "output_shapes": {"act": [4, 8, 8], "hidden_act": [16]},
        },
    }
    assert widen == {
        "op": "widen",
        "args": {"layer": "hidden", "width": 20, "next_layer": "hidden_act.1", "norm": None},
    }
