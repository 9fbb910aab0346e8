"""Benchmark: training from cached frozen features against recomputing them every epoch.

For resnet18 and mobilenet_v2 at 64×64 and 224×224, and for the pretrained MiniLM sentence
encoder (a Hugging Face BERT, cut by substitution) as a sequence classifier on real
political-speech passages of 64 tokens, with only the head trainable and with the last
block and head trainable, it runs ``netgraft.fit`` for E epochs without the
cache and with it, and reports for E = 1, 5, 10:

- the wall time of each (time until epoch E ends; the cached one includes finding the cut
  and building the cache),
- B, the frozen forward over the data (the cache build), and H, one training epoch on
  cached features,
- the ideal speedup E·(B+H)/(B+E·H) and measured/ideal.

It also times one training step with a frozen prefix against full fine-tuning (frozen layers
must cost no backward pass) and a forward pass alone. Prints JSON; ``--quick`` uses fewer
images. The data are real digits (scikit-learn) resized to RGB; weights are untrained
(timing does not depend on them). Run: ``python bench/cache.py [--quick] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

import netgraft
from netgraft.data import TokenizedTexts, load_digits, load_political_passages, minilm_path

LAST_BLOCK = {"resnet18": "layer4", "mobilenet_v2": "features.18", "minilm": "bert.encoder.layer.5"}
HEAD = {"resnet18": "fc", "mobilenet_v2": "classifier", "minilm": "classifier"}
TEXT_TOKENS = 64


class _Clock:
    """A fit callback recording the wall time at which each epoch ends."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_epoch_end(self, state) -> None:
        self.ends.append(time.perf_counter())


class _PlanCatcher(logging.Handler):
    """Keeps the CachePlan that netgraft.cache logs, for its build time and cut point."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.plan = None

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "cache_plan"):
            self.plan = record.cache_plan


def images(n: int, size: int) -> TensorDataset:
    x, y = load_digits()
    reps = -(-n // len(x))
    x, y = x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n]
    x = nn.functional.interpolate(x, size=size, mode="bilinear").repeat(1, 3, 1, 1)
    return TensorDataset((x - 0.5) / 0.25, y)


def passages(n: int) -> TokenizedTexts:
    import transformers

    p = load_political_passages()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    return TokenizedTexts(p.texts[:n], p.labels[:n], tokenizer, max_length=TEXT_TOKENS)


def model_for(arch: str, trainable: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "minilm":
        model = netgraft.load_model(
            f"hf:{minilm_path()}", task="sequence-classification", num_labels=2
        )
    else:
        model = getattr(torchvision.models, arch)(num_classes=10)
    keep = [HEAD[arch]] if trainable == "head" else [LAST_BLOCK[arch], HEAD[arch]]
    return netgraft.train_only(model, keep)


def run_fit(arch: str, trainable: str, data: TensorDataset, epochs: int, cache: bool, batch: int):
    model = model_for(arch, trainable)
    clock, catcher = _Clock(), _PlanCatcher()
    logger = logging.getLogger("netgraft.cache")
    logger.addHandler(catcher)
    logger.setLevel(logging.DEBUG)
    try:
        start = time.perf_counter()
        history = netgraft.fit(
            model,
            data,
            epochs=epochs,
            lr=1e-3,
            seed=0,
            batch_size=batch,
            run=netgraft.RunOptions(cache=cache, progress=False),
            callbacks=[clock],
        )
    finally:
        logger.removeHandler(catcher)
    walls = [end - start for end in clock.ends]
    return walls, [row["time"] for row in history], catcher.plan


def epochs_table(arch, trainable, data, epochs_list, batch) -> dict:
    top = max(epochs_list)
    plain_walls, plain_epochs, _ = run_fit(arch, trainable, data, top, False, batch)
    cached_walls, cached_epochs, plan = run_fit(arch, trainable, data, top, True, batch)
    if plan is None:
        raise SystemExit(f"{arch} {trainable}: fit did not use the cache")
    b = plan.train.build_seconds
    # the first cached epoch also pays one-off DataLoader start-up; the steady epochs are H
    h = sorted(cached_epochs)[len(cached_epochs) // 2]
    rows = {}
    for e in epochs_list:
        measured = plain_walls[e - 1] / cached_walls[e - 1]
        ideal = e * (b + h) / (b + e * h)
        rows[str(e)] = {
            "uncached_s": round(plain_walls[e - 1], 3),
            "cached_s": round(cached_walls[e - 1], 3),
            "speedup": round(measured, 3),
            "ideal": round(ideal, 3),
            "measured_over_ideal": round(measured / ideal, 3),
        }
    overhead = cached_walls[0] - b - cached_epochs[0]
    return {
        "model": arch,
        "size": TEXT_TOKENS if arch == "minilm" else data.tensors[0].shape[-1],
        "examples": len(data),
        "trainable": trainable,
        "cut_point": plan.cut_point,
        "feature_shape": plan.train.feature_shape,
        "B_s": round(b, 3),
        "H_s": round(h, 4),
        "uncached_epoch_s": round(sorted(plain_epochs)[len(plain_epochs) // 2], 3),
        "cache_setup_overhead_s": round(overhead, 3),
        "epochs": rows,
    }


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def step_times(arch: str, size: int, batch: int, repeats: int) -> dict:
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def stepper(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return step

    frozen = model_for(arch, "head")
    full = netgraft.unfreeze(model_for(arch, "head"))

    def forward():
        with torch.no_grad():
            frozen(x)

    fwd = _time(forward, repeats)
    frozen_step = _time(stepper(frozen), repeats)
    full_step = _time(stepper(full), repeats)
    return {
        "model": arch,
        "size": size,
        "batch": batch,
        "forward_ms": round(fwd * 1e3, 1),
        "frozen_prefix_step_ms": round(frozen_step * 1e3, 1),
        "full_finetune_step_ms": round(full_step * 1e3, 1),
        "frozen_step_over_forward": round(frozen_step / fwd, 3),
        "full_over_frozen_step": round(full_step / frozen_step, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--trainable", default="head,last_block", help="head and/or last_block")
    parser.add_argument("--no-steps", action="store_true", help="skip the step-time comparison")
    parser.add_argument("--text", default="minilm", help="text models ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_at = {64: 128, 224: 32} if args.quick else {64: 512, 224: 128}
    epochs_list = [1, 5, 10]
    started = time.perf_counter()
    load_before = os.getloadavg()
    results, steps = [], []
    for arch in filter(None, args.models.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            data = images(n_at.get(size, 256), size)
            for trainable in args.trainable.split(","):
                results.append(epochs_table(arch, trainable, data, epochs_list, args.batch))
            if not args.no_steps:
                steps.append(step_times(arch, size, 16, 3))
    for arch in filter(None, args.text.split(",")):
        data = passages(64 if args.quick else 256)
        for trainable in args.trainable.split(","):
            results.append(epochs_table(arch, trainable, data, epochs_list, args.batch))
    head10 = [r["epochs"]["10"]["measured_over_ideal"] for r in results if r["trainable"] == "head"]
    report = {
        "bench": "cache",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": {
            "quick": args.quick,
            "examples": n_at,
            "batch": args.batch,
            "trainable": args.trainable,
        },
        "results": results,
        "step_time": steps,
        "floor": {
            "rule": "E=10, head only: measured speedup >= 0.8 x ideal",
            "min_measured_over_ideal": min(head10) if head10 else None,
            "pass": bool(head10) and min(head10) >= 0.8,
        },
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
