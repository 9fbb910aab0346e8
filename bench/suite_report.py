"""The suite's summary from its run log: rows (task × budget × method, mean ± std, every
seed), average ranks, the leave-one-task-out choice of defaults, suggest against surgical,
a markdown table and a PNG. Bench code only."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from netgraft.atomic import atomic_write

# methods that are a fixed fine_tune setting, so could be the defaults
CHOOSABLE = (
    "defaults before (1e-4 x10)",
    "previous defaults (1e-3 x100 bn)",
    "fastai",
    "full one rate 3e-4",
    "gradual (1e-3 x10)",
    "new defaults (1e-3 x10)",
    "candidate 3e-4 x10",
)


DEFAULT = "search (new default)"  # fine_tune's default (FineTuneConfig(search=True))
# every method of suite_methods.METHODS, in its order (tables list them so)
ORDER = (
    "head only",
    *CHOOSABLE[:5],
    "new defaults (1e-3 x10)",
    "candidate 3e-4 x10",
    "search (new default)",
    "suggest",
    "surgical",
)


def order(present: set[str], listed: list[str] = ()) -> list[str]:
    """The methods in ``present`` in :data:`ORDER`, then any other (``listed`` first)."""
    known = [m for m in ORDER if m in present]
    return known + [m for m in [*listed, *sorted(present)] if m in present and m not in known]


def load_runs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, budget, method): accuracies over seeds, mean ± std, seconds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    seen = set()
    for r in runs:  # two runs of the suite side by side may both finish a run: keep the first
        if (key := (r["task"], r["budget"], r["seed"], r["method"])) not in seen:
            seen.add(key)
            groups[key[:2] + key[3:]].append(r)
    rows = []
    for (task, budget, method), rs in groups.items():
        accs = [r["acc"] for r in sorted(rs, key=lambda r: r["seed"])]
        rows.append({
            "task": task, "budget": budget, "method": method, "seeds": len(accs),
            "accs": accs, "acc_mean": round(statistics.fmean(accs), 4),
            "acc_std": round(statistics.pstdev(accs), 4),
            "seconds": round(statistics.fmean(r["seconds"] for r in rs), 1),
        })  # fmt: skip
    return rows


def _cells(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        cells[(r["task"], r["budget"])][r["method"]] = r["acc_mean"]
    return cells


def average_ranks(rows: list[dict], methods: list[str]) -> dict[str, float]:
    """Mean rank of each method (1 = best, ties share their mean rank) over the cells
    (task, budget) where every one of ``methods`` was measured."""
    ranks: dict[str, list[float]] = defaultdict(list)
    for scores in _cells(rows).values():
        if not all(m in scores for m in methods):
            continue
        ordered = sorted(methods, key=lambda m: -scores[m])
        for m in methods:
            better = sum(1 for o in ordered if scores[o] > scores[m])
            same = sum(1 for o in ordered if scores[o] == scores[m])
            ranks[m].append(better + (same + 1) / 2)
    return {m: round(statistics.fmean(v), 2) for m, v in ranks.items()}


def _regret(scores: dict[str, float], method: str) -> float:
    return max(scores.values()) - scores[method]


def _folds(cells: dict[tuple, dict[str, float]], methods: tuple[str, ...]) -> dict[str, Any]:
    """Per task left out: the method with the smallest mean regret over the other tasks'
    cells, that mean, and its regret on each of the left-out task's cells."""
    folds = {}
    for held in sorted({t for t, _ in cells}):
        others = [v for (t, _), v in cells.items() if t != held]
        if not others:
            continue
        mean = {m: statistics.fmean(_regret(v, m) for v in others) for m in methods}
        pick = min(mean, key=mean.get)
        held_cells = {b: round(_regret(v, pick), 4) for (t, b), v in cells.items() if t == held}
        folds[held] = {"picked": pick, "train_mean_regret": round(mean[pick], 4),
                       "held_out_regret": held_cells}  # fmt: skip
    return folds


def leave_one_task_out(rows: list[dict], choosable: tuple[str, ...] = CHOOSABLE) -> dict[str, Any]:
    """For each task: the setting (of ``choosable``, the fixed settings by default) with
    the smallest mean regret (best method's accuracy minus its own) over the other tasks'
    cells, and its regret on the held-out task's cells; every setting's mean and worst
    regret over all the cells where each of them ran."""
    cells = {k: v for k, v in _cells(rows).items() if all(m in v for m in choosable)}
    folds = _folds(cells, choosable)
    overall = {m: round(statistics.fmean(_regret(v, m) for v in cells.values()), 4)
               for m in choosable} if cells else {}  # fmt: skip
    worst = (
        {m: round(max(_regret(v, m) for v in cells.values()), 4) for m in choosable}
        if cells
        else {}
    )
    return {"folds": folds, "mean_regret_all_tasks": overall, "worst_regret_all_tasks": worst}


# the search and the fixed settings it chooses from (full one rate 3e-4 is its one-rate
# candidate; until 2026-12-07 it also tried the body at 3e-4 x10, never chosen, so dropped:
# ``candidate 3e-4 x10`` still runs as a fixed setting)
CORE = (
    "search (new default)",
    "head only",
    "new defaults (1e-3 x10)",
    "full one rate 3e-4",
)


def matched(runs: list[dict], methods: tuple[str, ...] = CORE) -> dict[str, Any]:
    """``methods`` compared on equal terms: per (task, budget), only the seeds where every
    one of them ran; each one's accuracy on every such seed, their mean, its regret (the
    best mean minus its own), average ranks, and leave-one-task-out over ``methods``."""
    by_key = {(r["task"], r["budget"], r["seed"], r["method"]): r["acc"] for r in runs}
    cells: dict[tuple, dict[str, float]] = {}
    per_seed: dict[str, dict[str, list[float]]] = {}
    for task, budget in sorted({(r["task"], r["budget"]) for r in runs}):
        seeds = sorted({s for (t, b, s, _) in by_key if (t, b) == (task, budget)})
        seeds = [s for s in seeds if all((task, budget, s, m) in by_key for m in methods)]
        if not seeds:
            continue
        accs = {m: [by_key[(task, budget, s, m)] for s in seeds] for m in methods}
        cells[(task, budget)] = {m: statistics.fmean(a) for m, a in accs.items()}
        per_seed[f"{task} {budget} seeds {seeds}"] = accs
    rows = [{"task": t, "budget": b, "method": m, "acc_mean": round(v, 4)}
            for (t, b), scores in cells.items() for m, v in scores.items()]  # fmt: skip
    folds = _folds(cells, methods)
    regret = {m: [round(_regret(v, m), 4) for v in cells.values()] for m in methods}
    return {
        "methods": list(methods),
        "per_seed": per_seed,
        "mean": {f"{t} {b}": {m: round(a, 4) for m, a in v.items()} for (t, b), v in cells.items()},
        "regret": regret,
        "mean_regret": {m: round(statistics.fmean(r), 4) for m, r in regret.items() if r},
        "worst_regret": {m: max(r) for m, r in regret.items() if r},
        "average_rank": average_ranks(rows, list(methods)),
        "leave_one_task_out": folds,
    }


def agreement(runs: list[dict]) -> list[dict[str, Any]]:
    """Per (task, budget, seed): the surgical study's best block, suggest's first block, and
    suggest's first among the surgical study's candidates."""
    by_key = {(r["task"], r["budget"], r["seed"], r["method"]): r for r in runs}
    out = []
    for (task, budget, seed, method), r in sorted(by_key.items()):
        other = by_key.get((task, budget, seed, "suggest"))
        if method != "surgical" or other is None:
            continue
        among = next(b for b in other["ranking"] if b in r["scores"])
        out.append({"task": task, "budget": budget, "seed": seed, "surgical": r["block"],
                    "suggest": other["block"], "suggest_among_candidates": among,
                    "agree": among == r["block"], "surgical_scores": r["scores"]})  # fmt: skip
    return out


def defaults_gap(runs: list[dict], default: str = DEFAULT) -> list[dict]:
    """Per (task, budget), on the seeds where the default ran: its mean accuracy, the best
    mean of the methods that ran on every one of those seeds, the gap, whether it is within
    2 points, and why not: what the default chose on each seed (its search's setting)."""
    by_key = {(r["task"], r["budget"], r["seed"], r["method"]): r for r in runs}
    out = []
    for task, budget in sorted({(r["task"], r["budget"]) for r in runs}):
        seeds = sorted(s for (t, b, s, m) in by_key if (t, b, m) == (task, budget, default))
        if not seeds:
            continue
        methods = {m for (t, b, _, m) in by_key if (t, b) == (task, budget)}
        means = {
            m: statistics.fmean(by_key[(task, budget, s, m)]["acc"] for s in seeds)
            for m in methods
            if all((task, budget, s, m) in by_key for s in seeds)
        }
        best = max(sorted(means), key=lambda m: (means[m], m == default))  # ties: the default
        gap = round(means[best] - means[default], 4)
        chose = [(by_key[(task, budget, s, default)].get("search") or {}).get("chosen", "-")
                 for s in seeds]  # fmt: skip
        out.append({"task": task, "budget": budget, "seeds": seeds,
                    "default": round(means[default], 4), "best": best,
                    "best_acc": round(means[best], 4), "gap": gap, "within_2_points": gap <= 0.02,
                    "default_chose": chose, "methods_compared": len(means)})  # fmt: skip
    return out


# the fixed method that runs each of the search's candidates alone (its final run is that
# setting on the whole draw: the same accuracy when both ran with this tree)
SEARCHED = {
    "head only": "head only",
    "body 0.001 x10": "new defaults (1e-3 x10)",
    "body 0.0003 x10": "candidate 3e-4 x10",  # a candidate until 2026-12-07
    "all 0.0006 x1 from the start, norms trained": "full one rate 3e-4",
}


def reproduced(runs: list[dict], default: str = DEFAULT) -> dict[str, Any]:
    """Every search run against the logged run of the fixed method it chose (same task,
    budget, seed): equal accuracies say both rows come from the same code; the ones that
    differ are listed."""
    by_key = {(r["task"], r["budget"], r["seed"], r["method"]): r["acc"] for r in runs}
    same, differ = 0, []
    for r in runs:
        fixed = SEARCHED.get((r.get("search") or {}).get("chosen", ""))
        if r["method"] != default or fixed is None:
            continue
        other = by_key.get((r["task"], r["budget"], r["seed"], fixed))
        if other is None:
            continue
        if other == r["acc"]:
            same += 1
        else:
            differ.append({"task": r["task"], "budget": r["budget"], "seed": r["seed"],
                           "chosen": fixed, "search": r["acc"], "fixed": other})  # fmt: skip
    return {"same": same, "differ": differ}


def timing(runs: list[dict], seeds: int = 3, workers: int = 2) -> dict[str, Any]:
    """Seconds the logged runs took, per method and in all (each run's own wall time; runs
    that shared the CPU with others took longer than alone), and the full suite projected:
    every (task, budget, method) that ran at the mean of its runs, ``seeds`` times over,
    shared by ``workers`` processes (one per core), per method and in all."""
    per: dict[str, float] = defaultdict(float)
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        per[r["method"]] += r["seconds"]
        cells[(r["task"], r["budget"], r["method"])].append(r["seconds"])
    projected: dict[str, float] = defaultdict(float)
    for (_, _, method), seconds in cells.items():
        projected[method] += statistics.fmean(seconds) * seeds / workers
    return {"per_method": {m: round(v) for m, v in per.items()},
            "total": round(sum(per.values())), "runs": len(runs),
            "projected_wall": {"seeds": seeds, "workers": workers,
                               "per_method": {m: round(v) for m, v in projected.items()},
                               "total": round(sum(projected.values()))}}  # fmt: skip


def plot(rows: list[dict], methods: list[str], ranks: dict[str, float], path: Path) -> None:
    """Heat map of mean accuracy (cells × methods) beside the average ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = sorted(_cells(rows).items())
    grid = np.array([[s.get(m, np.nan) for m in methods] for _, s in cells])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(16, 0.4 * len(cells) + 3),
                                 gridspec_kw={"width_ratios": [3, 1]})  # fmt: skip
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(cells)), [f"{t} {b}" for (t, b), _ in cells], fontsize=8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="test accuracy (mean over seeds)")
    ranked = sorted(ranks, key=ranks.get)
    bx.barh(ranked[::-1], [ranks[m] for m in ranked[::-1]])
    bx.set_xlabel("average rank (1 = best)")
    bx.tick_params(labelsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


def write(runs_path: Path, json_path: Path, png_path: Path, settings: dict[str, Any]) -> None:
    """Rebuild the summary JSON and PNG from every run logged so far."""
    runs = load_runs(runs_path)
    rows = summarise(runs)
    methods = order({r["method"] for r in rows}, settings["methods"])
    ranks = average_ranks(rows, methods)
    result = {
        "benchmark": "suite",
        "settings": {k: v for k, v in settings.items() if k != "methods"},
        "methods": methods,
        "rows": rows,
        "average_rank": ranks,
        "leave_one_task_out": leave_one_task_out(rows),
        "leave_one_task_out_with_search": leave_one_task_out(rows, (*CHOOSABLE, DEFAULT)),
        "matched_seeds": matched(runs),
        "suggest_vs_surgical": agreement(runs),
        "defaults_gap": defaults_gap(runs),
        "seconds": timing(runs),
        "search_reproduces_fixed_rows": reproduced(runs),
        "table": "\n".join(_docs_table(rows, methods)),
        "runs": runs,
    }
    text = json.dumps(result, indent=1, default=str)
    atomic_write(json_path, lambda p: p.write_text(text))
    if rows:
        plot(rows, methods, ranks, png_path)


def _short(method: str) -> str:
    return method.replace(" (new default)", "").replace("previous defaults", "previous")


def _docs_table(rows: list[dict], methods: list[str]) -> list[str]:
    """Task × method: mean accuracy (every seed in brackets), the best in bold; then each
    method's average rank, mean and worst regret over the rows where all of them ran."""
    out = ["| task | budget | " + " | ".join(_short(m) for m in methods) + " |",
           "|---" * (len(methods) + 2) + "|"]  # fmt: skip
    cells = _cells(rows)
    by = {(r["task"], r["budget"], r["method"]): r for r in rows}
    for (task, budget), scores in sorted(cells.items()):
        best = max(scores.values())
        parts = []
        for m in methods:
            r = by.get((task, budget, m))
            text = "–" if r is None else f"{r['acc_mean']:.3f} (" + ", ".join(
                f"{a:.2f}" for a in r["accs"]) + ")"  # fmt: skip
            parts.append(f"**{text}**" if r is not None and r["acc_mean"] == best else text)
        out.append(f"| {task} | {budget} | " + " | ".join(parts) + " |")
    full = {k: v for k, v in cells.items() if all(m in v for m in methods)}
    ranks = average_ranks([r for r in rows if (r["task"], r["budget"]) in full], methods)
    for name, value in (
        ("average rank", lambda m: f"{ranks[m]:.2f}"),
        ("mean regret", lambda m: f"{statistics.fmean(_regret(v, m) for v in full.values()):.3f}"),
        ("worst regret", lambda m: f"{max(_regret(v, m) for v in full.values()):.3f}"),
    ):
        if full:
            out.append(
                f"| {name} ({len(full)} rows) | | " + " | ".join(value(m) for m in methods) + " |"
            )
    return out


def _gap_table(runs: list[dict]) -> list[str]:
    out = ["| task | budget | seeds | default | best method (of those on the same seeds) | best "
           "| gap | within 2 points | the search chose (per seed) |", "|---" * 9 + "|"]  # fmt: skip
    for g in defaults_gap(runs):
        out.append(f"| {g['task']} | {g['budget']} | {', '.join(map(str, g['seeds']))} | "
                   f"{g['default']:.3f} | {_short(g['best'])} ({g['methods_compared']}) | "
                   f"{g['best_acc']:.3f} | {g['gap']:.3f} | {'yes' if g['within_2_points'] else 'no'} | "
                   f"{'; '.join(g['default_chose'])} |")  # fmt: skip
    return out


def _core_table(runs: list[dict]) -> list[str]:
    """:func:`matched` over :data:`CORE`: every seed, regrets, ranks, leave-one-task-out."""
    m = matched(runs)
    out = ["| task | budget | seeds | " + " | ".join(_short(x) for x in m["methods"]) + " |",
           "|---" * (len(m["methods"]) + 3) + "|"]  # fmt: skip
    for key, accs in m["per_seed"].items():
        task, budget, _, seeds = key.split(" ", 3)
        means = {x: statistics.fmean(v) for x, v in accs.items()}
        cells = [
            f"{means[x]:.3f} (" + ", ".join(f"{a:.2f}" for a in accs[x]) + ")" for x in m["methods"]
        ]
        cells = [
            f"**{c}**" if means[x] == max(means.values()) else c
            for x, c in zip(m["methods"], cells, strict=True)
        ]
        out.append(f"| {task} | {budget} | {seeds} | " + " | ".join(cells) + " |")
    for name, values in (("mean regret", m["mean_regret"]), ("worst regret", m["worst_regret"]),
                         ("average rank", m["average_rank"])):  # fmt: skip
        out.append(f"| {name} | | | " + " | ".join(f"{values[x]:.3f}" for x in m["methods"]) + " |")
    folds = m["leave_one_task_out"]
    out += ["", f"Leave-one-task-out over these {len(m['methods'])}: " + "; ".join(
        f"{t}: {_short(f['picked'])} ("
        + ", ".join(f"{b} {v:.3f}" for b, v in sorted(f["held_out_regret"].items())) + ")"
        for t, f in folds.items())]  # fmt: skip
    return out


def _loto_tables(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for title, choosable in (
        ("fixed settings", CHOOSABLE),
        ("fixed settings and the search", (*CHOOSABLE, DEFAULT)),
    ):
        loto = leave_one_task_out(rows, choosable)
        out += ["", f"Leave-one-task-out over the {title}:", "",
                "| task left out | picked on the others | its mean regret there | regret on the task left out |",
                "|---|---|---|---|"]  # fmt: skip
        for task, f in loto["folds"].items():
            held = ", ".join(f"{b} {v:.3f}" for b, v in sorted(f["held_out_regret"].items()))
            out.append(
                f"| {task} | {_short(f['picked'])} | {f['train_mean_regret']:.3f} | {held} |"
            )
    return out


def _agreement_table(runs: list[dict]) -> list[str]:
    agree = agreement(runs)
    out = ["| task | budget | seed | surgical | suggest (first among surgical's) | agree |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for a in agree:
        out.append(f"| {a['task']} | {a['budget']} | {a['seed']} | `{a['surgical']}` | "
                   f"`{a['suggest']}` (`{a['suggest_among_candidates']}`) | "
                   f"{'yes' if a['agree'] else 'no'} |")  # fmt: skip
    out.append(f"\nThey agree on {sum(a['agree'] for a in agree)} of {len(agree)}.")
    return out


def docs_parts(runs: list[dict]) -> dict[str, str]:
    """The suite's section of docs/benchmarks.md from the run log, by part: every method on
    every task, the default against the best, the search against its candidates, leave-one-
    task-out, suggest against surgical, the reproduction check and the time."""
    rows = summarise(runs)
    check = reproduced(runs)
    t = timing(runs)
    p = t["projected_wall"]
    parts = {
        "table": _docs_table(rows, order({r["method"] for r in rows})),
        "gap": _gap_table(runs),
        "core": _core_table(runs),
        "loto": _loto_tables(rows),
        "agreement": _agreement_table(runs),
        "check": [f"The search's final run against the logged run of the setting it chose: "
                  f"{check['same']} equal, {len(check['differ'])} differ {check['differ'] or ''}"],
        "time": [f"{t['runs']} runs, {t['total']} s in all; per method: "
                 + ", ".join(f"{_short(m)} {v} s" for m, v in t["per_method"].items()),
                 f"\nThe full suite projected ({p['seeds']} seeds, {p['workers']} processes on "
                 f"{p['workers']} cores, each cell at its logged mean): {p['total'] / 60:.0f} "
                 "minutes; per method: "
                 + ", ".join(f"{_short(m)} {v / 60:.0f}" for m, v in p["per_method"].items())],
    }  # fmt: skip
    return {k: "\n".join(v) for k, v in parts.items()}


if __name__ == "__main__":
    import sys

    log = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent / "results" / "suite-runs.jsonl"
    )
    for name, text in docs_parts(load_runs(log)).items():
        print(f"<!-- {name} -->\n{text}\n")
