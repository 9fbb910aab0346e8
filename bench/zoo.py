"""Benchmark: netgraft's head surgery, freezing and cutting on every torchvision classifier
and a deterministic sample of timm architectures.

For each architecture (random weights, ``pretrained=False``: nothing is downloaded), at its
own input size (timm ``pretrained_cfg["input_size"]``, torchvision the crop size of its
default weights), with a batch of 2:

1. ``replace_head``: ``netgraft.replace_head(model, 10)``; the model then outputs 10 logits.
2. ``train_only``: ``netgraft.train_only(model, heads)`` (every head :func:`netgraft.find_heads`
   names: DeiT distilled has two), then one SGD step (momentum 0.9, weight decay 1e-2) with
   the model in train mode: every frozen parameter, and every buffer of a module whose
   parameters are all frozen, is bit-identical afterwards; the head's weights moved.
3. ``cut``: at the latest module before the first trainable layer that gives a frozen prefix
   (what the feature cache does), ``netgraft.cut(model, after=name, example_input=x)``
   (torch.fx, or substitution where fx cannot trace); ``suffix(prefix(x))`` is allclose to
   ``model(x)``.
4. ``cache``: what a user does next: one epoch of ``netgraft.fit`` with
   ``run=RunOptions(cache=True)`` against the same epoch with ``cache=False`` (same seed,
   same starting weights, 4 examples in batches of 2, validated on the same 4): the
   training and validation losses agree within 1e-5 relative. A refusal (``CacheError``)
   fails the step as ``refused``; a difference is ``trains differently with the cache``
   (counted apart in the summary: must be zero).

Architectures over about 300M parameters (310M) are skipped with the reason recorded (timm
counted on the meta device, torchvision from its weights' metadata; never built). Results go to ``bench/results/zoo.json`` (written after every model,
so a long run can be watched): per model pass/fail, the failing step with its exception,
the cut point and the seconds each step took. Times are noisy on a shared CPU; they say
where the time goes, not how fast netgraft is.

torchvision models take the crop size of their default weights when at most 299, else 224,
and are built as their ImageNet weights build them (:data:`PRETRAINED_FORM`: GoogLeNet
without its auxiliary heads; Inception v3 keeps its own, as its weights do).

Run: ``python bench/zoo.py [--quick] [--only NAME ...] [--threads 2]``. ``--quick`` runs a
dozen architectures (both libraries, the two-head and untraceable cases).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import timm
import torch
import torch.utils._pytree as pytree
import torchvision
from torch import nn
from torch.nn import functional as F

import netgraft
from netgraft.layers import trace_order

MAX_PARAMS = 310_000_000  # about 300M: ViT-L/16 and ViT-L/32 run, ViT-H/14 does not
MAX_TORCHVISION_SIDE = 299
NUM_CLASSES = 10
BATCH = 2
MAX_CUT_TRIES = 12
MODEL_TIMEOUT_S = 900
RESULTS = Path(__file__).parent / "results" / "zoo.json"

# timm families the sweep must cover, each with the variant to run (besides one per module)
REQUIRED_TIMM = [
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit_tiny_patch16_224",
    "cait_xxs24_224",
    "crossvit_tiny_240",
    "coat_lite_tiny",
    "flexivit_small",
    "hiera_tiny_224",
    "pit_ti_224",
    "pit_ti_distilled_224",
    "mvitv2_tiny",
    "efficientvim_m1",
    "tf_efficientnet_b0",
    "tf_mobilenetv3_small_100",
    "mobilevitv2_050",
    "efficientvit_b0",
    "efficientvit_m0",
    "levit_128s",
    "cpubone_nano",
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "convnext_atto",
    "swin_tiny_patch4_window7_224",
    # more variants of the families above, and a few popular ones
    "tf_efficientnet_lite0",
    "tf_efficientnetv2_b0",
    "tf_mobilenetv3_large_minimal_100",
    "mobilevitv2_075",
    "efficientvit_b1",
    "crossvit_9_dagger_240",
    "levit_conv_128s",
    "mvitv2_small_cls",
    "hiera_small_abswin_256",
    "deit3_small_patch16_224",
    "vit_small_patch16_224",
    "eva02_tiny_patch14_224",
    "efficientformerv2_s1",
    "coatnet_nano_rw_224",
    "mobilenetv4_conv_small",
    "ghostnetv2_100",
    "efficientnet_lite0",
    "mixnet_s",
    "semnasnet_075",
    "lcnet_050",
    "regnety_002",
    "resnet50d",
    "poolformer_s12",
    "convnextv2_atto",
    "fastvit_sa12",
    # families whose every architecture takes 299 (above the sample's side limit of 288)
    "inception_v3",
    "inception_v4",
    "inception_resnet_v2",
    "legacy_xception",
    "xception41",
    "naflexvit_base_patch16_gap",
]

QUICK = [
    "torchvision:resnet18",
    "torchvision:squeezenet1_1",
    "torchvision:vit_b_32",
    "torchvision:googlenet",
    "timm:vit_tiny_patch16_224",
    "timm:deit_tiny_distilled_patch16_224",
    "timm:tf_mobilenetv3_small_100",
    "timm:mobilevitv2_050",
    "timm:efficientvit_b0",
    "timm:levit_128s",
    "timm:hiera_tiny_224",
    "timm:pit_ti_distilled_224",
]

_SIZE_WORDS = [
    "atto", "femto", "pico", "nano", "xxxs", "xxs", "xs", "tiny", "ti", "mini", "small",
    "s", "t", "b0", "m0", "m1", "050", "075", "100", "s0", "t0", "lite0", "b1", "128s",
]  # fmt: skip


class _Timeout(Exception):
    pass


def _size_rank(name: str) -> tuple[int, int, str]:
    tokens = re.split(r"[_.]", name)
    ranks = [_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS]
    return (min(ranks) if ranks else len(_SIZE_WORDS), len(name), name)


def _meta_params(name: str) -> int | None:
    """Parameter count of a timm architecture built on the meta device (no memory, no
    initialisation cost); None when it cannot be built there."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def _input_size(name: str) -> tuple[int, ...]:
    cfg = timm.models.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return tuple(size) if size else (3, 224, 224)


def timm_sample(per_module: int = 1, candidates: int = 6) -> list[str]:
    """A deterministic sample: per timm module (family file), the ``per_module`` smallest of
    its ``candidates`` smallest-sounding architectures (input side at most 288), plus
    :data:`REQUIRED_TIMM`."""
    chosen: list[str] = []
    for module in timm.list_modules():
        names = sorted(timm.list_models(module=module), key=_size_rank)
        names = [n for n in names if max(_input_size(n)[1:]) <= 288][:candidates]
        sized = [(p, n) for n in names if (p := _meta_params(n)) is not None]
        chosen += [n for _, n in sorted(sized)[:per_module]]
    for name in REQUIRED_TIMM:
        if name not in chosen:
            chosen.append(name)
    return chosen


def torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_input(name: str) -> tuple[int, ...]:
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        crop = weights.transforms().crop_size
        side = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    except Exception:
        side = 224
    if name.startswith("vit_") or side > MAX_TORCHVISION_SIDE:
        # built without weights, a torchvision ViT takes its default image_size; every
        # torchvision classifier takes 224, and the larger crops (EfficientNet-B7's 600) only
        # cost time on a shared CPU
        side = 224
    return (3, side, side)


# torchvision builds these with their ImageNet weights this way: GoogLeNet's auxiliary heads
# (dropout inside, run only in training) are dropped unless asked for
PRETRAINED_FORM = {"googlenet": {"aux_logits": False, "init_weights": True}}


def _build(spec: str) -> tuple[nn.Module, tuple[int, ...]]:
    library, name = spec.split(":", 1)
    if library == "torchvision":
        kwargs = PRETRAINED_FORM.get(name, {})
        return torchvision.models.get_model(name, weights=None, **kwargs), _torchvision_input(name)
    return timm.create_model(name, pretrained=False), _input_size(name)


def _count(spec: str) -> int | None:
    library, name = spec.split(":", 1)
    if library == "timm":
        return _meta_params(name)
    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:
        return None


def _logits(out: Any) -> torch.Tensor:
    """The logits of an output: torchvision Inception/GoogLeNet return (logits, aux) in
    training mode."""
    if isinstance(out, torch.Tensor):
        return out
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return leaves[0]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen parameter, and every buffer of a module whose parameters are all frozen."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for mname, module in model.named_modules():
        if all(not p.requires_grad for p in module.parameters()):
            for bname, buf in module.named_buffers(recurse=False):
                saved[f"{mname}.{bname}" if mname else bname] = buf.detach().clone()
    return saved


def _changed(model: nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    now = dict(model.named_parameters())
    now.update(dict(model.named_buffers()))
    return [n for n, t in saved.items() if not torch.equal(now[n].detach(), t)]


def _step_replace(model: nn.Module, x: torch.Tensor) -> None:
    netgraft.replace_head(model, NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        shape = tuple(_logits(model(x)).shape)
    if shape != (BATCH, NUM_CLASSES):
        raise AssertionError(f"after replace_head the output is {shape}, not (2, 10)")


def _step_train(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    heads = [name for name, _ in netgraft.find_heads(model)]
    netgraft.train_only(model, heads)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    saved = _snapshot(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    y = torch.arange(BATCH) % NUM_CLASSES
    loss = F.cross_entropy(_logits(model(x)), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    changed = _changed(model, saved)
    if changed:
        raise AssertionError(f"frozen tensors changed: {changed[:5]} ({len(changed)} in all)")
    params = dict(model.named_parameters())
    moved = [n for n, t in trainable.items() if not torch.equal(params[n].detach(), t)]
    if not moved:
        raise AssertionError(f"no trainable parameter moved (heads {heads})")
    return {
        "heads": heads,
        "trainable": sum(t.numel() for t in trainable.values()),
        "frozen_checked": len(saved),
    }


def _cut_candidates(model: nn.Module, x: torch.Tensor) -> tuple[list[str], str]:
    order, _ = trace_order(model, x)
    trainable = {
        n.rsplit(".", 1)[0] if "." in n else ""
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    first = next(n for n in order if n in trainable)
    before = order[: order.index(first)]
    return [n for n in reversed(before) if n and not first.startswith(n + ".")], first


def _step_cut(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    model.eval()
    candidates, first = _cut_candidates(model, x)
    with torch.no_grad():
        expected = _logits(model(x))
    errors = []
    for at in candidates[:MAX_CUT_TRIES]:
        try:
            prefix, suffix = netgraft.cut(model, after=at, example_input=x)
        except netgraft.SurgeryError as exc:
            errors.append(f"{at}: {exc}"[:300])
            continue
        if any(p.requires_grad for p in prefix.parameters()):
            errors.append(f"{at}: trainable parameters in the prefix")
            continue
        with torch.no_grad():
            got = _logits(suffix(prefix(x)))
        delta = (got - expected).abs().max().item()
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"cut at {at!r}: suffix(prefix(x)) differs, max |Δ| = {delta:.3g}")
        return {
            "cut_at": at,
            "cut_by": type(suffix).__name__,
            "cut_max_delta": delta,
            "cut_tries": len(errors) + 1,
        }
    raise AssertionError(
        f"no cut before the first trainable layer {first!r} in {len(candidates[:MAX_CUT_TRIES])} "
        f"tries; latest: {errors[0] if errors else 'no candidate'}"
    )


def _epoch_losses(model: nn.Module, data: Any, cache: bool) -> tuple[float, float]:
    history = netgraft.fit(
        model, data, epochs=1, lr=0.01, batch_size=BATCH, seed=0, val=data,
        run=netgraft.RunOptions(cache=cache, progress=False),
    )
    row = history.rows[0]
    return float(row["loss"]), float(row["val_loss"])


def _step_cache(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    inputs = torch.cat([x, torch.randn(x.shape, generator=g)])
    data = torch.utils.data.TensorDataset(inputs, torch.arange(len(inputs)) % NUM_CLASSES)
    start = copy.deepcopy(model.state_dict())
    uncached = _epoch_losses(model, data, cache=False)
    model.load_state_dict(start)
    try:
        cached = _epoch_losses(model, data, cache=True)
    except netgraft.CacheError as exc:
        raise _Refused(str(exc)) from None
    finally:
        model.load_state_dict(start)
    for what, a, b in zip(("loss", "val_loss"), uncached, cached, strict=True):
        if not abs(a - b) <= 1e-5 * max(1.0, abs(a)):
            raise _TrainsDifferently(f"{what}: cached {b:.6g} vs uncached {a:.6g}")
    return {"cache_losses": list(cached)}


class _Refused(Exception):
    """fit with RunOptions(cache=True) refused to cache (a CacheError)."""


class _TrainsDifferently(Exception):
    """The cached epoch's losses differ from the uncached one's."""


def _on_alarm(_signum, _frame):
    raise _Timeout(f"over {MODEL_TIMEOUT_S}s")


def run_one(spec: str) -> dict[str, Any]:
    """Build one architecture and run the four steps; a dict with pass/fail and timings."""
    row: dict[str, Any] = {"model": spec, "library": spec.split(":")[0]}
    params = _count(spec)
    row["params"] = params
    if params is not None and params > MAX_PARAMS:
        return {**row, "status": "skipped", "reason": f"{params / 1e6:.0f}M parameters > 310M"}
    torch.manual_seed(0)
    step = "build"
    timings: dict[str, float] = {}
    signal.alarm(MODEL_TIMEOUT_S)
    try:
        start = time.perf_counter()
        model, size = _build(spec)
        row["input_size"] = list(size)
        if row["params"] is None:  # not buildable on the meta device (RegNetY-128GF)
            row["params"] = sum(p.numel() for p in model.parameters())
        x = torch.randn(BATCH, *size, generator=torch.Generator().manual_seed(0))
        timings[step] = time.perf_counter() - start
        for step, fn in (
            ("replace_head", _step_replace),
            ("train_only", _step_train),
            ("cut", _step_cut),
            ("cache", _step_cache),
        ):
            start = time.perf_counter()
            out = fn(model, x)
            timings[step] = round(time.perf_counter() - start, 3)
            if out:
                row.update(out)
        row["status"] = "pass"
    except BaseException as exc:  # noqa: BLE001 - every failure is a result row
        if isinstance(exc, KeyboardInterrupt):
            raise
        row.update(
            status="fail",
            step=step,
            error=f"{type(exc).__name__}: {str(exc)[:600]}",
            where=traceback.format_exc(limit=-3)[-1200:],
        )
    finally:
        signal.alarm(0)
    row["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    return row


def _specs(args: argparse.Namespace) -> list[str]:
    if args.only:
        return [s if ":" in s else f"timm:{s}" for s in args.only]
    if args.quick:
        return list(QUICK)
    if args.library == "timm":
        return [f"timm:{n}" for n in _cached_sample()]
    if args.library == "torchvision":
        return [f"torchvision:{n}" for n in torchvision_names()]
    return [f"timm:{n}" for n in _cached_sample()] + [
        f"torchvision:{n}" for n in torchvision_names()
    ]


def _cached_sample() -> list[str]:
    """:func:`timm_sample`, remembered next to the results for this timm version (choosing
    builds a few hundred architectures on the meta device)."""
    path = RESULTS.parent / f"zoo-timm-sample-{timm.__version__}.json"
    if path.exists():
        return json.loads(path.read_text())
    names = timm_sample()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(names, indent=1))
    return names


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [r for r in rows if r["status"] != "skipped"]
    passed = [r for r in ran if r["status"] == "pass"]
    return {
        "ran": len(ran),
        "passed": len(passed),
        "failed": len(ran) - len(passed),
        "skipped": len(rows) - len(ran),
        "pass_rate": round(len(passed) / len(ran), 4) if ran else None,
        "by_library": {
            lib: f"{sum(r['status'] == 'pass' for r in ran if r['library'] == lib)}/"
            f"{sum(r['library'] == lib for r in ran)}"
            for lib in ("torchvision", "timm")
        },
        "trains_differently": [
            r["model"] for r in ran if r.get("error", "").startswith("_TrainsDifferently")
        ],
        "cache_refused": [r["model"] for r in ran if r.get("error", "").startswith("_Refused")],
        "failures": {
            r["model"]: f"{r['step']}: {r['error'][:200]}" for r in ran if r["status"] == "fail"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a dozen architectures")
    parser.add_argument("--only", nargs="*", help="specs to run (timm: prefix optional)")
    parser.add_argument("--library", choices=("timm", "torchvision"), help="only this one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--resume", action="store_true", help="keep rows already in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGALRM, _on_alarm)
    out = Path(args.out)
    specs = _specs(args)
    done: dict[str, dict[str, Any]] = {}
    if args.resume and out.exists():
        done = {r["model"]: r for r in json.loads(out.read_text())["models"]}
    rows = []
    meta = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "note": os.environ.get("ZOO_NOTE", "shared CPU: timings are noisy"),
    }
    for spec in specs:
        row = done.get(spec) or run_one(spec)
        rows.append(row)
        print(
            json.dumps({k: row.get(k) for k in ("model", "status", "step", "error", "seconds")}),
            flush=True,
        )
        gc.collect()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"meta": meta, "summary": _summary(rows), "models": rows}, indent=1)
        )
        os.replace(tmp, out)
    print(json.dumps(_summary(rows), indent=1))


if __name__ == "__main__":
    main()
