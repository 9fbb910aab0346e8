"""Growing a model during fit: probe loss unchanged, optimizer moments carried exactly,
resume after growth, refusals before anything changes. A small GPT-2 from its config on
real English text (byte tokens of Python's own help topics)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netgraft
from netgraft.data import load_digits, load_english_text
from netgraft.train import grow_with_optimizer

transformers = pytest.importorskip("transformers")

SEQ = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.fixture(scope="module")
def text() -> tuple[torch.Tensor, torch.Tensor]:
    """64 sequences of byte tokens and their next-byte targets."""
    data = torch.tensor(list(load_english_text().encode()[: 64 * (SEQ + 1)]))
    chunks = data.reshape(64, SEQ + 1)
    return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()


def gpt2(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=256,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(dtype)


class StopAfter(netgraft.train.callbacks.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, state) -> None:
        if state.epoch == self.epoch:
            state.stop_training = True


@pytest.mark.parametrize(
    ("op", "kwargs", "grown"),
    [
        ("widen_transformer", {"hidden_size": 64, "intermediate_size": 160}, ("n_embd", 64)),
        ("expand_blocks", {"every": 1}, ("n_layer", 4)),
    ],
)
def test_grow_in_fit_keeps_the_probe_loss_and_trains_every_grown_parameter(
    text, caplog, op, kwargs, grown
):
    x, y = text
    model = gpt2()
    grow = netgraft.Grow(at_epoch=1, op=op, probe=(x[:8], y[:8]), loss=lm_loss, **kwargs)
    seen = {}

    class Look(netgraft.train.callbacks.Callback):
        def on_epoch_end(self, state) -> None:
            seen["optimized"] = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
            seen["state"] = set(map(id, state.optimizer.state))

    with caplog.at_level(logging.INFO, logger="netgraft.train"):
        history = netgraft.fit(
            model, (x, y), epochs=3, lr=1e-3, loss=lm_loss, metrics=(), batch_size=16,
            callbacks=[grow, Look()], seed=0, scheduler="cosine", quiet=True, device="cpu",
        )  # fmt: skip
    event = grow.events[0]
    assert event.loss_before == pytest.approx(event.loss_after, abs=1e-6)
    assert abs(event.loss_after - event.loss_before) < 1e-9  # float64
    assert event.params_after > event.params_before
    assert getattr(model.config, grown[0]) == grown[1]
    assert len(history) == 3 and history.rows[-1]["loss"] < history.rows[0]["loss"]
    params = {id(p) for p in model.parameters()}
    assert seen["optimized"] == params == seen["state"]  # every grown parameter trained
    assert any(f"Grow: {op} before epoch 2" in r.getMessage() for r in caplog.records)


def _adam_steps(model: nn.Module, opt: torch.optim.Optimizer, batches, loss) -> None:
    for inputs, targets in batches:
        opt.zero_grad()
        out = model(inputs)
        loss(getattr(out, "logits", out), targets).backward()
        opt.step()


def _assert_moments_match_the_grown_gradients(model, op, kwargs, batches, loss) -> None:
    """With lr=0 the weights stay where they are, so the moments after two steps are sums
    of gradients at one point; the carried moments must equal those of an optimizer that
    took the same steps on the grown model."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    _adam_steps(model, opt, batches, loss)
    old_ids = {id(p) for p in model.parameters()}
    event = grow_with_optimizer(model, opt, op, **kwargs)
    carried = {name: opt.state.get(p, {}) for name, p in model.named_parameters()}
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.0, weight_decay=0.0)
    _adam_steps(reference, ref_opt, batches, loss)
    checked = 0
    for (name, p), ref_p in zip(model.named_parameters(), reference.parameters(), strict=True):
        if not carried[name]:
            assert id(p) not in old_ids  # only new parameters start without state
            continue
        want = ref_opt.state[ref_p]
        assert int(carried[name]["step"]) == 2
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(carried[name][key], want[key], rtol=1e-9, atol=1e-18)
        checked += 1
    assert checked == event.mapped + event.kept > 0


def test_adam_moments_of_a_widened_gpt2_are_those_of_its_gradients(text):
    x, y = text
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16])]
    kwargs = {"hidden_size": 64, "num_heads": 4, "intermediate_size": 200}
    _assert_moments_match_the_grown_gradients(gpt2(), "widen_transformer", kwargs, batches, lm_loss)


def test_adam_moments_of_old_blocks_are_kept_and_new_blocks_start_fresh(text):
    x, y = text
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16])]
    model = gpt2()
    _assert_moments_match_the_grown_gradients(
        model, "expand_blocks", {"after": 0}, batches, lm_loss
    )


def test_a_growth_function_composing_operations_carries_moments_through_both(text):
    x, y = text
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16])]

    def wider_and_deeper(model: nn.Module) -> nn.Module:
        netgraft.widen_transformer(model, hidden_size=64)
        return netgraft.expand_blocks(model, every=2)

    model = gpt2()
    _assert_moments_match_the_grown_gradients(model, wider_and_deeper, {}, batches, lm_loss)
    ops = [op["op"] for op in netgraft.get_recipe(model).operations]
    assert ops == ["widen_transformer", "expand_blocks"]  # what a resume replays


def test_adam_moments_of_a_net2wider_mlp_with_noise_are_those_of_its_gradients():
    x, y = load_digits()
    x = torch.as_tensor(x, dtype=torch.float64).reshape(len(x), -1)[:128]
    y = torch.as_tensor(y)[:128]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)).double()
    batches = [(x[:64], y[:64]), (x[64:], y[64:])]
    kwargs = {"layer": "0", "width": 40, "noise": 0.5}
    _assert_moments_match_the_grown_gradients(model, "widen", kwargs, batches, F.cross_entropy)


def test_a_run_stopped_after_growth_resumes_like_an_uninterrupted_run(text, tmp_path):
    x, y = text
    args = dict(epochs=4, lr=1e-3, loss=lm_loss, metrics=(), batch_size=16, seed=0,
                scheduler="cosine", quiet=True, device="cpu")  # fmt: skip

    def grow() -> netgraft.Grow:
        return netgraft.Grow(at_epoch=2, op="widen_transformer", hidden_size=64, noise=0.1)

    whole = gpt2(torch.float32)
    full = netgraft.fit(whole, (x, y), callbacks=[grow()], **args)

    stopped = gpt2(torch.float32)
    ckpt = netgraft.Checkpoint(tmp_path / "run", monitor="loss", mode="min")
    netgraft.fit(stopped, (x, y), callbacks=[grow(), StopAfter(2), ckpt], **args)
    assert stopped.config.n_embd == 64

    fresh = gpt2(torch.float32)
    again = netgraft.fit(
        fresh, (x, y), callbacks=[grow(), netgraft.Checkpoint(tmp_path / "run", monitor="loss",
        mode="min")], resume=tmp_path / "run", **args
    )  # fmt: skip
    assert fresh.config.n_embd == 64
    assert netgraft.get_recipe(fresh).operations[-1]["op"] == "widen_transformer"
    assert [r["loss"] for r in again.rows] == [r["loss"] for r in full.rows]
    for (name, a), b in zip(whole.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_growth_that_cannot_be_exact_is_refused_before_the_model_changes(text):
    x, y = text
    model = gpt2()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    grow = netgraft.Grow(at_epoch=1, op="widen_transformer", hidden_size=48)
    with pytest.raises(netgraft.SurgeryError, match="multiple of 32"):
        netgraft.fit(model, (x, y), epochs=2, lr=1e-3, loss=lm_loss, metrics=(), batch_size=16,
                     callbacks=[grow], seed=0, quiet=True, device="cpu")  # fmt: skip
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert model.config.n_embd == 32 and not grow.done


def test_grow_refuses_unknown_operations_arguments_and_optimizer_state(text):
    with pytest.raises(netgraft.SurgeryError, match="growth operations"):
        netgraft.Grow(at_epoch=1, op="grow_wider")
    with pytest.raises(netgraft.SurgeryError, match="evry"):
        netgraft.Grow(at_epoch=1, op="expand_blocks", evry=1)
    x, y = text
    model = gpt2()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    _adam_steps(model, opt, [(x[:4], y[:4])], lm_loss)
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(netgraft.SurgeryError, match="sum"):
        grow_with_optimizer(model, opt, "expand_blocks", every=1)
    assert dict(model.named_parameters()) == before and model.config.n_layer == 2


def test_widen_and_deepen_during_fit_put_new_parameters_in_their_blocks_groups():
    x, y = load_digits()
    x = torch.as_tensor(x, dtype=torch.float32).reshape(len(x), -1)[:256]
    y = torch.as_tensor(y)[:256]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    probe = (x[:32], y[:32])
    grows = [
        netgraft.Grow(at_epoch=1, op="widen", layer="0", width=40, noise=0.2, probe=probe),
        netgraft.Grow(at_epoch=1, op="deepen", after="1", mode="residual", probe=probe),
    ]
    seen = {}

    class Look(netgraft.train.callbacks.Callback):
        def on_epoch_end(self, state) -> None:
            seen["groups"] = {
                id(p): g["name"] for g in state.optimizer.param_groups for p in g["params"]
            }

    netgraft.fit(model, (x, y), epochs=2, lr=1e-2, lr_mult=10, weight_decay=0.01,
                 batch_size=64, callbacks=[*grows, Look()], seed=0, quiet=True,
                 device="cpu")  # fmt: skip
    for grow in grows:
        event = grow.events[0]
        assert abs(event.loss_after - event.loss_before) < 1e-5  # float32
    assert grows[1].events[0].new == 4  # the residual branch: two Linear layers
    expected = netgraft.param_groups(model, 1.0, lr_mult=10, weight_decay=0.01)
    want = {id(p): g["name"] for g in expected for p in g["params"]}
    assert set(seen["groups"]) == set(want)
    # the new block '1' has no group of its own (a ReLU had no parameters): its parameters
    # join their neighbour's group of the same decay kind, so the scheduler keeps its groups
    for pid, name in want.items():
        got = seen["groups"][pid]
        assert got == name if not name.startswith("1") else got == "0" + name[1:]


def test_resume_after_a_growth_with_a_new_block_continues_its_optimizer_groups(tmp_path):
    x, y = load_digits()
    x = torch.as_tensor(x, dtype=torch.float32).reshape(len(x), -1)[:256]
    y = torch.as_tensor(y)[:256]
    args = dict(epochs=3, lr=1e-2, lr_mult=10, weight_decay=0.01, batch_size=64, seed=0,
                scheduler="onecycle", quiet=True, device="cpu")  # fmt: skip

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))

    def grow() -> netgraft.Grow:
        return netgraft.Grow(at_epoch=1, op="deepen", after="1", mode="residual")

    def ckpt() -> netgraft.Checkpoint:
        return netgraft.Checkpoint(tmp_path / "run", monitor="loss", mode="min")

    whole = mlp()
    full = netgraft.fit(whole, (x, y), callbacks=[grow()], **args)
    netgraft.fit(mlp(), (x, y), callbacks=[grow(), StopAfter(1), ckpt()], **args)
    fresh = mlp()
    again = netgraft.fit(fresh, (x, y), callbacks=[grow(), ckpt()], resume=tmp_path / "run", **args)
    assert [r["loss"] for r in again.rows] == [r["loss"] for r in full.rows]
    for (name, a), b in zip(whole.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_stacking_in_fit_reports_its_loss_jump_and_trains_the_copies_from_fresh_state(text):
    x, y = text
    model = gpt2()
    probe = (x[:8], y[:8])
    grow = netgraft.Grow(at_epoch=1, op="stack_blocks", factor=2, probe=probe, loss=lm_loss)
    netgraft.fit(
        model, (x, y), epochs=2, lr=1e-3, loss=lm_loss, metrics=(), batch_size=16,
        callbacks=[grow], seed=0, quiet=True, device="cpu",
    )  # fmt: skip
    event = grow.events[0]
    assert model.config.n_layer == 4
    assert event.loss_after != pytest.approx(event.loss_before, abs=1e-6)  # not preserving
    assert (event.kept, event.new) == (len(list(gpt2().parameters())), 2 * 12)
    assert netgraft.get_recipe(model).operations[-1] == {
        "op": "stack_blocks",
        "args": {"factor": 2},
    }
