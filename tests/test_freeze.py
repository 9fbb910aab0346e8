"""Frozen is frozen: parameters, BatchNorm statistics and modes, on real architectures."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import netgraft
from netgraft.freeze import norm_policy


def keras_tutorial_cnn() -> nn.Sequential:
    """The Keras-tutorial-style network: conv -> BN -> relu -> flatten -> dense 20 relu -> dense 10."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 20),
        nn.ReLU(),
        nn.Linear(20, 10),
    )


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)


def _minilm(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), local_files_only=True)


def _image_loss(model, x):
    return model(x).float().pow(2).mean()


def _text_loss(model, batch):
    return model(**batch).last_hidden_state.pow(2).mean()


def _cases(minilm_dir, digits):
    images, _ = digits
    g = torch.Generator().manual_seed(0)
    img64 = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(0, 30000, (2, 8), generator=g)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {
        "resnet18": (
            lambda: torchvision.models.resnet18(num_classes=10),
            img64,
            _image_loss,
            ":layer3",
        ),
        "mobilenet_v2": (
            lambda: torchvision.models.mobilenet_v2(num_classes=10),
            img64,
            _image_loss,
            "block::12",
        ),
        "timm_vit": (_timm_vit, torch.randn(2, 3, 32, 32, generator=g), _image_loss, ":50%"),
        "minilm": (
            lambda: _minilm(minilm_dir),
            text,
            _text_loss,
            ["embeddings", "encoder.layer.0"],
        ),
        "keras_cnn": (keras_tutorial_cnn, images[:16], _image_loss, ":-1"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["resnet18", "mobilenet_v2", "timm_vit", "minilm", "keras_cnn"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_frozen_parameters_and_statistics_are_bit_identical_after_ten_steps(
    case, opt, minilm_dir, digits
):
    build, batch, loss_fn, selector = _cases(minilm_dir, digits)[case]
    torch.manual_seed(0)
    model = build()
    model.train()
    frozen_layers = set(netgraft.select(model, selector))
    netgraft.freeze(model, selector)
    model.train()
    before = copy.deepcopy(model.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    if opt == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    # optimizers that are given *all* parameters must not move the frozen ones either
    all_params = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(10):
        optimizer.zero_grad()
        all_params.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
        all_params.step()
    after = model.state_dict()
    owner = {}
    for name, module in model.named_modules():
        for key in list(module._parameters) + list(module._buffers):
            owner[f"{name}.{key}" if name else key] = name
    frozen_keys = [k for k in before if owner.get(k) in frozen_layers]
    trainable_keys = [
        k
        for k, p in model.named_parameters()
        if p.requires_grad and owner.get(k) not in frozen_layers
    ]
    assert frozen_keys and trainable_keys
    for k in frozen_keys:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    changed = [k for k in trainable_keys if not torch.equal(before[k], after[k])]
    assert len(changed) >= 0.9 * len(trainable_keys), "trainable parameters did not move"


def test_frozen_batchnorm_stays_in_eval_mode_after_train_call():
    model = torchvision.models.resnet18()
    netgraft.freeze(model, "layer1")
    model.train()
    bns = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    frozen = [
        m
        for n, m in model.named_modules()
        if n.startswith("layer1.") and isinstance(m, nn.BatchNorm2d)
    ]
    assert frozen and all(not m.training for m in frozen)
    assert all(m.training for m in bns if m not in frozen)
    assert all(norm_policy(m) == "eval" for m in frozen)
    # deep copies keep the policy (training loops copy models for EMA, checkpoints)
    clone = copy.deepcopy(model).train()
    assert not clone.layer1[0].bn1.training


def test_frozen_batchnorm_keeps_running_stats_after_train_forward():
    model = torchvision.models.resnet18()
    netgraft.freeze(model, "layer1")
    model.train()
    stats = model.layer1[0].bn1.running_mean.clone()
    count = model.layer1[0].bn1.num_batches_tracked.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.layer1[0].bn1.running_mean, stats)
    assert torch.equal(model.layer1[0].bn1.num_batches_tracked, count)
    assert not torch.equal(model.layer2[0].bn1.num_batches_tracked, count)


def test_bn_train_policy_leaves_norm_layers_trainable_and_updating():
    model = keras_tutorial_cnn()
    netgraft.freeze(model, bn="train")
    bn = model[1]
    assert all(p.requires_grad for p in bn.parameters())
    assert not any(p.requires_grad for p in model[0].parameters())
    model.train()
    before = bn.running_mean.clone()
    model(torch.randn(4, 1, 8, 8))
    assert not torch.equal(bn.running_mean, before)


def test_bn_frozen_policy_uses_batch_statistics_but_never_updates_them():
    model = keras_tutorial_cnn()
    netgraft.freeze(model, "0:2", bn="frozen")
    bn = model[1]
    model.train()
    assert bn.training  # mode follows the model
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 1, 8, 8) * 3 + 2
    out_train = model[:2](x)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    model.eval()
    out_eval = model[:2](x)
    assert not torch.allclose(out_train, out_eval)  # batch statistics were used in training
    assert not bn.weight.requires_grad


def test_unfreeze_restores_training_and_follows_model_mode():
    model = torchvision.models.resnet18()
    netgraft.freeze(model)
    assert netgraft.trainable_report(model)["trainable"] == 0
    model.train()
    netgraft.unfreeze(model, "layer4")
    assert model.layer4[0].bn1.training and norm_policy(model.layer4[0].bn1) is None
    assert not model.layer3[0].bn1.training
    assert all(p.requires_grad for p in model.layer4.parameters())
    assert not any(p.requires_grad for p in model.layer3.parameters())


def test_train_only_freezes_everything_else():
    model = torchvision.models.mobilenet_v2(num_classes=5)
    netgraft.train_only(model, "classifier")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.1.weight", "classifier.1.bias"}
    table = netgraft.layers(model)
    assert {row.name for row in table if row.trainable is True and row.params} == {"classifier.1"}


def test_layer_table_reports_partial_trainability():
    model = keras_tutorial_cnn()
    model[4].bias.requires_grad_(False)
    row = next(r for r in netgraft.layers(model) if r.name == "4")
    assert row.trainable == "Partial"
    assert row.trainable_params == model[4].weight.numel()


def test_frozen_state_round_trips_to_a_fresh_model():
    model = torchvision.models.resnet18()
    netgraft.freeze(model, ":layer3")
    state = netgraft.frozen_state(model)
    fresh = netgraft.load_frozen_state(torchvision.models.resnet18(), state)
    assert [p.requires_grad for p in fresh.parameters()] == [
        p.requires_grad for p in model.parameters()
    ]
    fresh.train()
    assert not fresh.layer2[0].bn1.training and fresh.layer3[0].bn1.training


def test_bad_norm_policy_is_a_clear_error():
    with pytest.raises(netgraft.NetgraftError, match="bn must be one of"):
        netgraft.freeze(keras_tutorial_cnn(), bn="off")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["torchvision:vit_b_16", "timm:vit_tiny_patch16_224"])
def test_train_only_head_on_vision_transformers_freezes_the_root_tokens(source):
    from netgraft.zoo import load_model

    torch.manual_seed(0)
    model = load_model(source)
    head = "heads" if source.startswith("torchvision") else "head"
    netgraft.train_only(model, head)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(head + ".") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n in frozen for n in ("class_token", "cls_token"))
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=0.1
    )
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([1, 2])
    model.train()
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.slow
def test_frozen_modules_run_in_inference_and_unfreeze_releases_them(minilm_dir):
    from netgraft.freeze import held_in_inference as quiet_dropout

    model = netgraft.load_model(f"hf:{minilm_dir}", task="sequence-classification", num_labels=2)
    netgraft.train_only(model, "classifier")
    model.train()
    inner = model.bert.encoder.layer[3].attention.self.dropout
    assert quiet_dropout(inner) and not inner.training
    assert not quiet_dropout(model.dropout) and model.dropout.training  # next to the classifier
    ids = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():  # the frozen encoder computes a deterministic function in training
        a = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)
    netgraft.unfreeze(model, "bert.encoder.layer.3")
    assert not quiet_dropout(inner) and inner.training
    assert quiet_dropout(model.bert.encoder.layer[2].attention.self.dropout)
    assert model.bert.encoder.layer[3].attention.self.training  # its attention module too
    assert not model.bert.encoder.layer[2].attention.self.training


@pytest.mark.slow
def test_train_only_on_a_model_sharing_one_module_under_two_names(imagenet_batch):
    """timm's coat_mini registers its convolutional position encodings under two names
    (``serial_blocks1.0.cpe`` is ``cpe1``): the layer table, freeze and train_only see the
    module once, and after an optimizer step only the head moved."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("coat_mini", pretrained=False, num_classes=5)
    x, _ = imagenet_batch
    x, y = x[:4], torch.tensor([0, 1, 2, 3])
    netgraft.train_only(model, "head")
    table = netgraft.layers(model, x[:1])
    assert len(table.names) == len(set(table.names))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "head.weight",
        "head.bias",
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"head.weight", "head.bias"}
