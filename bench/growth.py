"""Benchmark: does growing a small GPT-2 into a large one during training save compute?

A byte-level GPT-2 is trained on real English text that ships with Python
(:func:`netgraft.data.load_english_text`, the pydoc topics; the last 10 % held out for
validation) in three ways, for each seed:

- **scratch**: the large model (``n_embd`` 64, 4 blocks, 4 heads, MLP 256) trained from its
  config for ``steps`` optimizer steps;
- **grown**: the small model (``n_embd`` 32, 2 blocks, 2 heads, MLP 128) trained for
  ``grow_at`` of those steps, then grown inside the same ``netgraft.fit`` run by two
  :class:`netgraft.Grow` callbacks, ``widen_transformer`` (hidden ×2, heads ×2, MLP ×2,
  ``noise`` 0.1 to break the copies' symmetry) then ``expand_blocks`` (a copy after every
  block), into exactly the large architecture, and trained on until it has spent the
  scratch run's total compute;
- **gstack**: the same, except that depth comes from ``stack_blocks`` (G_stack, Du et al.
  2024: the whole stack of 2 blocks repeated, not function-preserving; its loss jump on the
  probe batch is reported) instead of ``expand_blocks``'s zeroed copies.

Both use AdamW (lr 3e-3, cosine schedule over the run's own steps), batch 32 × 32 tokens,
no dropout, and see the same data stream. Compute is counted in FLOPs, not seconds:
training costs ``6·N + 6·n_layer·T·d`` FLOPs per token (Kaplan et al.'s forward
``2·N + 2·n_layer·T·d``, times three for the backward), ``N`` the matmul parameters
(every weight except the position table; the tied token table counts once, as the output
head), ``T`` the context, ``d`` the width; validation passes are not counted. The report
gives, per seed and as median, min–max spread, mean ± std over the seeds: every run's final
validation loss, and the compute each grown run needed to first reach the scratch run's
final validation loss (linear interpolation between evaluations; ``null`` when it never
did), as a fraction of the scratch run's compute. Nothing was tuned toward a result: the sizes, rates, growth point and
noise were fixed before the first run. Numbers are measured on a shared CPU, one thread per
run; wall times are noisy (``cpu_s`` is each run's own CPU time), FLOPs are not.

Published savings, for comparison (other scales, other data): bert2BERT ~45 % of BERT-base
pre-training compute, LiGO ~45 % of FLOPs, staged training up to 22 %, LEMON 33–57 %.

Run: ``python bench/growth.py [--quick] [--workers 2] [--out bench/results/growth.json]``;
also writes a PNG of validation loss against training FLOPs next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

import netgraft
from netgraft.data import load_english_text

SEQ = 32
BATCH = 32
LR = 3e-3
SMALL = {"n_embd": 32, "n_layer": 2, "n_head": 2}
LARGE = {"n_embd": 64, "n_layer": 4, "n_head": 4}
PUBLISHED = {
    "bert2BERT": "about 45% of BERT-base pre-training compute saved",
    "LiGO": "about 45% of FLOPs saved",
    "staged training": "up to 22% of compute saved",
    "LEMON": "33-57% of compute saved",
    "G_stack": "7B model: scratch's loss at 300B tokens reached with 194B (54.6% speedup)",
}
GROWN = ("grown", "gstack")


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def windows(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``SEQ`` byte tokens and their next-byte targets."""
    n = len(data) // (SEQ + 1)
    t = torch.tensor(list(data[: n * (SEQ + 1)])).reshape(n, SEQ + 1)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class Stream(Sampler[int]):
    """Each iteration (one fit epoch) yields the next ``chunk`` indices of an endless stream
    of seeded permutations, so short epochs walk through the whole training text."""

    def __init__(self, n: int, chunk: int, seed: int):
        self.n, self.chunk, self.seed, self.pos = n, chunk, seed, 0

    def __iter__(self):
        perm_cache: dict[int, torch.Tensor] = {}
        out = []
        for i in range(self.pos, self.pos + self.chunk):
            k = i // self.n
            if k not in perm_cache:
                g = torch.Generator().manual_seed(self.seed * 7919 + k)
                perm_cache[k] = torch.randperm(self.n, generator=g)
            out.append(int(perm_cache[k][i % self.n]))
        self.pos += self.chunk
        return iter(out)

    def __len__(self) -> int:
        return self.chunk


def gpt2(sizes: dict[str, int], seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **sizes,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token: 6·N + 6·n_layer·T·d (see the module docstring)."""
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    return 6.0 * n + 6.0 * c.n_layer * SEQ * c.n_embd


class Track(netgraft.train.callbacks.Callback):
    """Cumulative training FLOPs and validation loss at the end of every epoch."""

    def __init__(self, steps_per_epoch: int):
        self.steps = steps_per_epoch
        self.flops = 0.0
        self.curve: list[tuple[float, float]] = []

    def on_epoch_end(self, state: Any) -> None:
        self.flops += self.steps * BATCH * SEQ * flops_per_token(state.model)
        self.curve.append((self.flops, float(state.logs["val_loss"])))


def run(kind: str, seed: int, plan: dict[str, Any]) -> dict[str, Any]:
    """One training run (``scratch`` or ``grown``); its curve, final loss and wall time."""
    torch.set_num_threads(1)
    text = load_english_text().encode()
    cut = int(len(text) * 0.9)
    x, y = windows(text[:cut])
    val = windows(text[cut:])
    val = (val[0][: plan["val"]], val[1][: plan["val"]])
    spe = plan["steps_per_epoch"]
    loader = DataLoader(
        TensorDataset(x, y), batch_size=BATCH, sampler=Stream(len(x), spe * BATCH, seed)
    )
    track = Track(spe)
    callbacks: list[Any] = [track]
    if kind in GROWN:
        model = gpt2(SMALL, seed)
        at, epochs = plan["grow_epoch"], plan["grown_epochs"]
        probe = (val[0][:16], val[1][:16])
        deeper = (
            netgraft.Grow(at_epoch=at, op="expand_blocks", every=1, probe=probe, loss=lm_loss)
            if kind == "grown"
            else netgraft.Grow(at_epoch=at, op="stack_blocks", factor=2, probe=probe, loss=lm_loss)
        )
        callbacks = [
            netgraft.Grow(at_epoch=at, op="widen_transformer", hidden_size=64,
                          intermediate_size=256, noise=0.1, seed=seed, probe=probe,
                          loss=lm_loss),
            deeper,
            track,
        ]  # fmt: skip
    else:
        model = gpt2(LARGE, seed)
        epochs = plan["epochs"]
    started, cpu = time.perf_counter(), time.process_time()
    netgraft.fit(model, loader, val, epochs=epochs, lr=LR, loss=lm_loss, metrics=(),
                 batch_size=BATCH, seed=seed, optimizer=netgraft.Optimization(scheduler="cosine"),
                 run=netgraft.RunOptions(device="cpu", progress=False),
                 callbacks=callbacks)  # fmt: skip
    out = {
        "kind": kind,
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        "curve": track.curve,
        "final_val_loss": track.curve[-1][1],
        "flops": track.flops,
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    if kind in GROWN:
        events = [e for cb in callbacks[:2] for e in cb.events]
        out["growth"] = [
            {"op": e.op, "params": [e.params_before, e.params_after],
             "probe_loss": [e.loss_before, e.loss_after]}
            for e in events
        ]  # fmt: skip
    return out


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first compute at which the curve reaches ``target`` (linear interpolation)."""
    prev = (0.0, math.inf)
    for flops, loss in curve:
        if loss <= target:
            if not math.isfinite(prev[1]):
                return flops
            frac = (prev[1] - target) / (prev[1] - loss)
            return prev[0] + frac * (flops - prev[0])
        prev = (flops, loss)
    return None


def make_plan(quick: bool) -> dict[str, Any]:
    """Epoch counts so the grown run spends at most the scratch run's compute."""
    spe = 25
    epochs = 8 if quick else 24
    grow_epoch = epochs // 3
    small, large = gpt2(SMALL, 0), gpt2(LARGE, 0)
    small_cost, large_cost = flops_per_token(small), flops_per_token(large)
    left = epochs * large_cost - grow_epoch * small_cost
    grown_epochs = grow_epoch + int(left // large_cost)
    return {
        "steps_per_epoch": spe,
        "epochs": epochs,
        "grow_epoch": grow_epoch,
        "grown_epochs": grown_epochs,
        "val": 256,
        "flops_per_token": {"small": small_cost, "large": large_cost},
    }


def _stat(values: list[float]) -> dict[str, Any]:
    """Median, spread (min, max) and mean ± std of the values that exist."""
    if not values:
        return {"median": None, "min": None, "max": None, "mean": None, "std": None, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _row(runs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """One seed: every run's final loss, each grown run's compute to reach scratch's."""
    by_kind = {r["kind"]: r for r in runs if r["seed"] == seed}
    scratch = by_kind["scratch"]
    row: dict[str, Any] = {"seed": seed, "scratch_flops": scratch["flops"]}
    for kind, r in by_kind.items():
        row[f"{kind}_final_val_loss"] = r["final_val_loss"]
        if kind in GROWN:
            reach = flops_to_reach(r["curve"], scratch["final_val_loss"])
            row[f"{kind}_flops"] = r["flops"]
            row[f"{kind}_flops_to_reach_scratch_final"] = reach
            row[f"{kind}_fraction_of_scratch_compute"] = (
                None if reach is None else reach / scratch["flops"]
            )
            row[f"{kind}_loss_jump_at_depth_growth"] = r["growth"][-1]["probe_loss"]
    return row


def summarize(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    rows = [_row(runs, seed) for seed in seeds]
    kinds = ["scratch", *GROWN]

    def stat(key: str) -> dict[str, Any]:
        return _stat([r[key] for r in rows if r.get(key) is not None])

    summary: dict[str, Any] = {"per_seed": rows}
    for kind in kinds:
        summary[f"{kind}_final_val_loss"] = stat(f"{kind}_final_val_loss")
    for kind in GROWN:
        summary[f"{kind}_fraction_of_scratch_compute_to_reach_its_final_loss"] = stat(
            f"{kind}_fraction_of_scratch_compute"
        )
        summary[f"{kind}_seeds_reaching_scratch_final_loss"] = sum(
            r[f"{kind}_flops_to_reach_scratch_final"] is not None for r in rows
        )
    return summary


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {"scratch": "tab:blue", "grown": "tab:orange", "gstack": "tab:green"}
    for r in runs:
        xs = [f / 1e12 for f, _ in r["curve"]]
        ys = [v for _, v in r["curve"]]
        label = r["kind"] if r["seed"] == runs[0]["seed"] else None
        ax.plot(xs, ys, color=colors[r["kind"]], alpha=0.6, marker=".", label=label)
    ax.set_xlabel("training compute (TFLOPs, 6·N·tokens + attention)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(
        "GPT-2 on pydoc text: grown 32→64 wide, 2→4 blocks (copies or G_stack) vs scratch",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, a third of the steps")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the full run")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--out", default=None, help="JSON path (PNG written beside it)")
    args = parser.parse_args()
    seeds = [0] if args.quick else list(range(args.seeds))
    plan = make_plan(args.quick)
    jobs = [(kind, seed, plan) for seed in seeds for kind in ("scratch", *GROWN)]
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        runs = pool.starmap(run, jobs)
    result = {
        "benchmark": "growth",
        "quick": args.quick,
        "machine": {
            "cpus": multiprocessing.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "workers": args.workers,
        },  # fmt: skip
        "plan": plan,
        "summary": summarize(runs, seeds),
        "published": PUBLISHED,
        "runs": runs,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out or f"bench/results/growth{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(runs, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("plan", "summary", "wall_s")}, indent=1))


if __name__ == "__main__":
    main()
