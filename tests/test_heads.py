"""find_head / replace_head / truncate / attach on every architecture the heads issue lists."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netgraft
from netgraft import SurgeryError
from netgraft.heads import Stacked
from netgraft.zoo import input_for, load_model


def _image(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _run(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out


# spec, builder kwargs, expected head name, truncate point, expected feature shape
ARCHITECTURES = [
    ("torchvision:resnet18", {}, "fc", "layer4", (2, 512, 2, 2)),
    ("torchvision:mobilenet_v2", {}, "classifier", "features", (2, 1280, 2, 2)),
    ("torchvision:mobilenet_v3_small", {}, "classifier", "features", (2, 576, 2, 2)),
    ("torchvision:efficientnet_b0", {}, "classifier", "features", (2, 1280, 2, 2)),
    ("torchvision:vgg11", {}, "classifier", "features", (2, 512, 2, 2)),
    ("torchvision:convnext_tiny", {}, "classifier", "features", (2, 768, 2, 2)),
    ("torchvision:vit_b_16", {"image_size": 64}, "heads", "encoder", (2, 17, 768)),
    ("timm:resnet18", {}, "fc", "layer4", (2, 512, 2, 2)),
    ("timm:efficientnet_b0", {}, "classifier", "bn2", (2, 1280, 2, 2)),
    ("timm:vit_tiny_patch16_224", {"img_size": 64}, "head", "blocks.11", (2, 17, 192)),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,kwargs,head,at,features", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES]
)
def test_replace_truncate_attach_give_expected_shapes(spec, kwargs, head, at, features):
    torch.manual_seed(0)
    model = load_model(spec, **kwargs).eval()
    x = _image()
    assert netgraft.find_head(model)[0] == head
    netgraft.replace_head(model, num_classes=7)
    assert _run(model, x).shape == (2, 7)
    extractor = netgraft.truncate(model, at=at)
    assert tuple(_run(extractor, x).shape) == features
    stacked = netgraft.attach(model, nn.ReLU(), nn.Linear(7, 4))
    assert _run(stacked, x).shape == (2, 4)
    assert [op["op"] for op in netgraft.get_recipe(stacked).operations] == [
        "replace_head",
        "attach",
    ]


def test_replace_head_keeps_the_backbone_and_builds_hidden_layers():
    torch.manual_seed(0)
    model = load_model("torchvision:resnet18").eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    netgraft.replace_head(model, num_classes=10, hidden=32, dropout=0.25)
    assert [type(m) for m in model.fc] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.fc[0].in_features == 512 and model.fc[-1].out_features == 10
    assert model.fc[2].p == 0.25
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert _run(model, _image()).shape == (2, 10)


def test_replace_head_keeps_the_layers_inside_a_sequential_head():
    torch.manual_seed(0)
    model = load_model("torchvision:mobilenet_v2").eval()
    dropout = model.classifier[0]
    netgraft.replace_head(model, num_classes=5)
    assert model.classifier[0] is dropout and model.classifier[1].out_features == 5


def test_timm_head_goes_through_reset_classifier():
    model = load_model("timm:resnet18")
    netgraft.replace_head(model, num_classes=3, hidden=16)
    assert model.num_classes == 3
    assert model.get_classifier()[-1].out_features == 3


@pytest.mark.slow
def test_bert_model_pooler_becomes_the_classifier(minilm_dir):
    model = load_model(f"hf:{minilm_dir}").eval()
    x = input_for(model, (8,), batch=2)
    assert netgraft.find_head(model)[0] == "pooler"
    netgraft.replace_head(model, num_classes=3)
    out = _run(model, x)
    assert out.pooler_output.shape == (2, 3)
    assert isinstance(model.pooler.activation, nn.Identity)  # logits, not tanh(logits)
    features = netgraft.truncate(model, at="encoder.layer.2")
    assert _run(features, x).shape == (2, 8, 384)
    stacked = netgraft.attach(model, nn.Linear(384, 4))
    assert _run(stacked, x).shape == (2, 8, 4)  # on last_hidden_state


@pytest.mark.slow
def test_sequence_classifier_keeps_config_num_labels_consistent(minilm_dir):
    model = load_model(f"hf:{minilm_dir}", task="sequence-classification").eval()
    x = input_for(model, (8,), batch=2)
    assert netgraft.find_head(model)[0] == "classifier"
    netgraft.replace_head(model, num_classes=3)
    assert model.config.num_labels == 3 and model.num_labels == 3
    assert len(model.config.id2label) == 3
    assert _run(model, x).logits.shape == (2, 3)
    features = netgraft.truncate(model, at="bert.encoder.layer.2")
    assert _run(features, x).shape == (2, 8, 384)
    stacked = netgraft.attach(model, nn.Softmax(dim=-1))
    probs = _run(stacked, x)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))


def test_sequential_head_is_its_last_linear_and_truncate_slices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 2))
    assert netgraft.find_head(model)[0] == "4"
    netgraft.replace_head(model, num_classes=3)
    x = torch.randn(4, 6)
    assert model(x).shape == (4, 3)
    features = netgraft.truncate(model, at="2")
    assert type(features) is nn.Sequential and features(x).shape == (4, 5)
    assert features[0] is model[0]  # shares the real layers
    assert netgraft.attach(model, nn.Linear(3, 1))(x).shape == (4, 1)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Linear(4, 6)

    def forward(self, x):
        return self.out(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_subclassed_module_head_is_the_last_linear_in_execution_order():
    torch.manual_seed(0)
    model = _Net()
    assert netgraft.find_head(model)[0] == "out"
    netgraft.replace_head(model, num_classes=2)
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 2)
    assert netgraft.truncate(model, at="pool")(x).shape == (2, 4, 1, 1)
    assert netgraft.attach(model, nn.Tanh())(x).shape == (2, 2)


def test_attach_twice_extends_the_same_stack():
    model = nn.Sequential(nn.Linear(3, 3))
    stacked = netgraft.attach(model, nn.ReLU())
    again = netgraft.attach(stacked, nn.Linear(3, 2))
    assert again is stacked and isinstance(again, Stacked) and len(again.top) == 2
    assert again(torch.randn(1, 3)).shape == (1, 2)


def test_bad_head_requests_are_clear_errors():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(SurgeryError, match="no Linear"):
        netgraft.replace_head(model, num_classes=2)
    with pytest.raises(SurgeryError, match="positive integer"):
        netgraft.replace_head(nn.Linear(2, 2), num_classes=0)
    with pytest.raises(SurgeryError, match="at least one module"):
        netgraft.attach(model)


def test_new_layers_follow_the_model_mode_and_a_stack_can_still_be_cut():
    torch.manual_seed(0)
    model = load_model("torchvision:resnet18").eval()
    netgraft.replace_head(model, num_classes=10, hidden=16, dropout=0.5)
    model = netgraft.attach(model, nn.Dropout(0.5), nn.Softmax(dim=1))
    x = _image()
    assert torch.equal(_run(model, x), _run(model, x))  # eval: no dropout noise
    prefix, suffix = netgraft.cut(model, at="base.layer3")
    assert torch.equal(_run(suffix, _run(prefix, x)), _run(model, x))


def test_squeezenet_convolutional_classifier_gets_a_working_ten_class_head(tmp_path, digits):
    torch.manual_seed(0)
    model = load_model("torchvision:squeezenet1_1")
    netgraft.replace_head(model, 10)
    assert model.classifier[1].out_channels == 10 and model.num_classes == 10
    netgraft.train_only(model, "classifier")
    x, y = digits
    x = x[:32].repeat(1, 3, 8, 8)
    y = y[:32]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    model.train()
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    netgraft.save(model, tmp_path / "sq")
    again = netgraft.load(tmp_path / "sq").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def _deit_distilled():
    return load_model("timm:deit_tiny_distilled_patch16_224", img_size=32)


@pytest.mark.slow
def test_deit_distilled_gets_two_new_heads_that_train_together(tmp_path, digits):
    torch.manual_seed(0)
    model = _deit_distilled()
    heads = [name for name, _ in netgraft.find_heads(model)]
    assert heads == ["head", "head_dist"] and netgraft.find_head(model)[0] == "head"
    netgraft.replace_head(model, 10)
    assert model.head.out_features == 10 and model.head_dist.out_features == 10
    x, y = digits
    x, y = x[:32].repeat(1, 3, 4, 4), y[:32]
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        average = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        assert torch.allclose(model(x), average)
    netgraft.train_only(model, heads)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: getattr(model, n).weight.detach().clone() for n in heads}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert all(not torch.equal(getattr(model, n).weight, w) for n, w in before.items())
    netgraft.save(model, tmp_path / "deit")
    again = netgraft.load(tmp_path / "deit").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_deit_distilled_hidden_head_is_built_for_both_heads():
    torch.manual_seed(0)
    model = _deit_distilled().eval()
    netgraft.replace_head(model, 4, hidden=16, dropout=0.1)
    for head in (model.head, model.head_dist):
        assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
        assert head[0].in_features == 192 and head[-1].out_features == 4
    assert _run(model, _image(32)).shape == (2, 4)


def test_hugging_face_deit_with_teacher_replaces_both_classifiers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DeiTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    model = transformers.DeiTForImageClassificationWithTeacher(config).eval()
    names = [name for name, _ in netgraft.find_heads(model)]
    assert names == ["cls_classifier", "distillation_classifier"]
    netgraft.replace_head(model, 3)
    assert model.config.num_labels == 3
    out = _run(model, _image(32))
    assert out.logits.shape == (2, 3)
    assert torch.allclose(out.logits, (out.cls_logits + out.distillation_logits) / 2)


def test_googlenet_auxiliary_classifiers_follow_the_new_head_in_training():
    torch.manual_seed(0)
    model = load_model("torchvision:googlenet", init_weights=False)
    netgraft.replace_head(model, 10)
    assert netgraft.find_head(model)[0] == "fc"
    model.train()
    logits, aux2, aux1 = model(_image(96))
    assert logits.shape == aux2.shape == aux1.shape == (2, 10)
    model.eval()
    assert _run(model, _image(96)).shape == (2, 10)


@pytest.mark.slow
def test_text_heads_pool_by_mask_mean_or_first_token(minilm_dir):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    batch = tokenizer(
        ["Four more years.", "We built it, and small businesses built this country."],
        padding="max_length",
        max_length=16,
        return_tensors="pt",
    )
    reference = netgraft.load_model(f"hf:{minilm_dir}").eval()
    with torch.no_grad():
        states = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (states * mask).sum(1) / mask.sum(1)  # how sentence-transformers pools

    model = netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification", num_labels=2)
    netgraft.replace_head(model, 3, pool="mean")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        pooled = model.bert(**batch).pooler_output
    assert torch.allclose(pooled, mean, atol=1e-5)
    assert torch.allclose(logits, model.classifier(mean), atol=1e-5)
    assert model.config.num_labels == 3

    base = netgraft.load_model(f"hf:{minilm_dir}")
    netgraft.replace_head(base, 4, pool="first")
    base.eval()
    with torch.no_grad():
        out = base(**batch).pooler_output
    assert out.shape == (2, 4)
    assert torch.allclose(out, base.pooler[1](states[:, 0]), atol=1e-5)

    with pytest.raises(SurgeryError, match="pool must be one of"):
        netgraft.replace_head(base, 2, pool="max")
    import torchvision

    plain = torchvision.models.resnet18()
    with pytest.raises(SurgeryError, match="no Hugging Face encoder with a pooler"):
        netgraft.replace_head(plain, 2, pool="mean")


@pytest.mark.slow
def test_text_pooling_replays_through_save_and_load(minilm_dir, tmp_path):
    model = netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification", num_labels=2)
    netgraft.replace_head(model, 3, pool="mean")
    ids = torch.randint(1000, 2000, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding must not count in the mean
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    netgraft.save(model, tmp_path / "m")
    again = netgraft.load(tmp_path / "m").eval()
    with torch.no_grad():
        got = again(input_ids=ids, attention_mask=mask).logits
    assert type(again.bert.pooler).__name__ == "MaskedMeanPool"
    assert torch.equal(got, expected)
