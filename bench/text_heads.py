"""Benchmark: how a text encoder's classifier should pool its token states.

The pretrained all-MiniLM-L6-v2 (a BERT trained by sentence-transformers with mean pooling)
as a sequence classifier on real political-speech passages (2012 US conventions, democrat
vs republican, split by speech so no speech is on both sides): only the new classifier is
trained, from cached encoder features, with each pooling of ``replace_head(pool=...)``:

- ``mean``: the mean of the token states over the attention mask;
- ``first``: the first token's state ([CLS]);
- ``pooler``: the checkpoint's own pooler (first token, Linear, tanh).

Reports validation accuracy (mean ± std over seeds). Prints JSON; ``--quick`` uses fewer
passages and seeds. Run: ``python bench/text_heads.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import transformers

import netgraft
from netgraft.data import TokenizedTexts, load_political_passages, minilm_path

POOLS = ("mean", "first", "pooler")


def split(n_train: int, n_val: int, tokens: int) -> tuple[TokenizedTexts, TokenizedTexts]:
    """Passages of every other speech for training, the rest for validation, balanced."""
    p = load_political_passages()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    g = torch.Generator().manual_seed(0)
    train_side = p.documents % 2 == 0
    parts = []
    for side, n in ((train_side, n_train), (~train_side, n_val)):
        picked = []
        for label in (0, 1):
            idx = torch.nonzero(side & (p.labels == label)).flatten()
            picked.append(idx[torch.randperm(len(idx), generator=g)[: n // 2]])
        idx = torch.cat(picked)
        parts.append(TokenizedTexts([p.texts[i] for i in idx], p.labels[idx], tokenizer, tokens))
    return parts[0], parts[1]


def run(pool: str, seed: int, train, val, epochs: int, cache_dir: str) -> float:
    torch.manual_seed(seed)
    model = netgraft.load_model(f"hf:{minilm_path()}", task="sequence-classification", num_labels=2)
    netgraft.replace_head(model, 2, pool=pool)
    netgraft.train_only(model, "classifier")
    history = netgraft.fit(
        model,
        train,
        val,
        epochs=epochs,
        lr=3e-3,
        batch_size=32,
        seed=seed,
        run=netgraft.RunOptions(progress=False, cache="auto", cache_dir=cache_dir),
    )
    return history.rows[-1]["val_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    n_train, n_val, seeds = (128, 128, 2) if args.quick else (800, 400, 3)
    transformers.logging.set_verbosity_error()
    train, val = split(n_train, n_val, 64)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for pool in POOLS:
            accs = [run(pool, s, train, val, args.epochs, cache_dir) for s in range(seeds)]
            rows.append(
                {
                    "pool": pool,
                    "val_acc_mean": round(statistics.mean(accs), 4),
                    "val_acc_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                    "runs": [round(a, 4) for a in accs],
                }
            )
    report = {
        "bench": "text_heads",
        "task": "political passages (64 tokens), democrat vs republican, split by speech",
        "model": "all-MiniLM-L6-v2 as BertForSequenceClassification, classifier only",
        "settings": {
            "train": len(train),
            "val": len(val),
            "seeds": seeds,
            "epochs": args.epochs,
            "lr": 3e-3,
            "optimizer": "adamw",
            "batch_size": 32,
        },
        "results": rows,
        "best": max(rows, key=lambda r: r["val_acc_mean"])["pool"],
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
