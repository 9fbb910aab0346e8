"""Benchmark: time and peak memory of netgraft.transfer on a ResNet-50-size state dict.

Two cases: ``by_names`` (a checkpoint saved under DataParallel names into the same
architecture: exact names after stripping ``module.``) and ``by_structure`` (every module
renamed, so all ~160 layers are paired by the Needleman-Wunsch alignment). Peak memory is
the Python-side peak of one more run (tracemalloc: the planner's tables and the report; the
copies go into the destination's existing tensors) and the process' peak RSS. Prints one JSON object. Run: ``.venv/bin/python bench/transfer.py``.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
import tracemalloc

import torch
import torchvision

import netgraft


def _measure(src, dst, repeats: int) -> dict:
    times = []
    for _ in range(repeats):  # timed without tracemalloc, which slows Python code down
        start = time.perf_counter()
        report = netgraft.transfer(src, dst)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    netgraft.transfer(src, dst)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "seconds_median": round(statistics.median(times), 4),
        "seconds_min": round(min(times), 4),
        "python_peak_mib": round(peak / 2**20, 2),
        "copied": report.counts["copied"],
        "loaded_fraction": report.loaded_fraction,
        "how": sorted({r.how for r in report.records.values()}),
    }


def main(repeats: int = 5) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    source = torchvision.models.resnet50()
    state = source.state_dict()
    params = sum(p.numel() for p in source.parameters())
    dst = torchvision.models.resnet50()

    by_names = {f"module.{k}": v for k, v in state.items()}
    # rename every module so only the structure can pair layers
    renamed = {}
    for i, (owner, _) in enumerate(dict.fromkeys(k.rpartition(".")[0] for k in state).items()):
        for k, v in state.items():
            if k.rpartition(".")[0] == owner:
                renamed[f"node{i:04d}.{k.rpartition('.')[2]}"] = v

    result = {
        "benchmark": "transfer resnet50 state dict",
        "tensors": len(state),
        "parameters": params,
        "layers": len({k.rpartition(".")[0] for k in state}),
        "repeats": repeats,
        "torch_threads": 1,
        "by_names": _measure(by_names, dst, repeats),
        "by_structure": _measure(renamed, dst, repeats),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
