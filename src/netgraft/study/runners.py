"""Where a study's trials run: one after another in the study's process, in local worker
processes, or as Ray tasks.

Every runner calls :func:`netgraft.study.trials.run_trial` with the same context and hands
each result to ``on_done`` as it finishes (in the study's process, which records it), so the
numbers are the same whichever runner is used: a trial is seeded by its own seed and runs
with the same number of torch threads. Local workers are a ``loky`` process pool that
receives the context once, serialised with ``cloudpickle``: models, datasets and losses
defined in ``__main__`` (a script read from standard input, ``python -c``, a notebook) are
sent by value, so workers never re-import the user's script; Ray tasks read it from Ray's
object store, on the cluster :func:`connect_ray` joins (``address=``, ``RAY_ADDRESS``, or a
local Ray started for the study). On Ray the shared frozen pass's features travel through
the object store too, written once per node into a node-local folder, so no shared
filesystem is needed; a trial lost with its worker or node is run again on another (Ray's
task retries), and its result is counted once. Ray is imported only here, only when asked
for. This module never decides which trials to run.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cloudpickle
import torch
from loky import ProcessPoolExecutor

from ..atomic import atomic_folder
from ..errors import NetgraftError
from .trials import Trial, TrialContext, TrialResult, run_trial, set_threads

__all__ = ["connect_ray", "run_trials"]

OnDone = Callable[[Trial, TrialResult], None]
_RAY_EXTRA = "pip install 'netgraft[ray]'"
_CONNECT_TIMEOUT_S = 5.0
_RAY_RETRIES = 3  # runs of a trial lost with its worker or node, beyond the first

_worker_context: TrialContext | None = None


def _init_worker(ctx: TrialContext, threads: int) -> None:
    global _worker_context
    _worker_context = ctx
    torch.set_num_threads(threads)


def _run_in_worker(trial: Trial) -> TrialResult:
    assert _worker_context is not None, "the worker was not initialised"
    return run_trial(_worker_context, trial)


def _run_remote(ctx: TrialContext, features: Any, trial: Trial, threads: int) -> TrialResult:
    torch.set_num_threads(threads)
    if features is not None:  # this node's copy of the shared pass, from the object store
        ctx = replace(ctx, features_dir=str(_unpack_features(features)))
    return run_trial(ctx, trial)


def _pack_features(ctx: TrialContext) -> dict[str, Any] | None:
    """The shared frozen pass's stores as ``{"name": ..., "files": {path: bytes}}``, for Ray's
    object store: a trial on another node reads them there, not from this machine's disk."""
    if not ctx.features_dir or not ctx.stores:
        return None
    root = Path(ctx.features_dir)
    files = {
        str(path.relative_to(root)): path.read_bytes()
        for store in ctx.stores
        for path in sorted((root / store).rglob("*"))
        if path.is_file()
    }
    # store names are content keys (weights, data, cut point): equal names, equal features
    name = hashlib.sha256("\n".join(ctx.stores).encode()).hexdigest()[:24]
    return {"name": name, "files": files}


def _unpack_features(features: dict[str, Any]) -> Path:
    """The node-local folder holding ``features`` (written once per node, atomically, by the
    first trial that needs it)."""
    folder = Path(tempfile.gettempdir()) / "netgraft-ray-features" / features["name"]
    if folder.is_dir():
        return folder
    try:
        with atomic_folder(folder, replace=False) as tmp:
            for rel, data in features["files"].items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
    except FileExistsError:
        pass  # another trial on this node wrote the same features first
    return folder


def _serial(ctx: TrialContext, trials: Sequence[Trial], threads: int | None, on_done: OnDone):
    before = set_threads(threads)
    try:
        for trial in trials:
            on_done(trial, run_trial(ctx, trial))
    finally:
        torch.set_num_threads(before)


def _check_sendable(ctx: TrialContext, workers: int) -> None:
    """Serialise ``ctx`` as the pool will (cloudpickle), so a context that cannot reach
    another process fails here, before any trial."""
    try:
        cloudpickle.dumps(ctx)
    except Exception as exc:  # cloudpickle raises PicklingError, TypeError, ...
        raise NetgraftError(
            f"workers={workers} sends the models, data and budget to other processes, and "
            f"they cannot be serialised ({type(exc).__name__}: {exc}); run without workers, "
            "or keep open files, locks and generators out of the models, data and budget"
        ) from None


def _processes(
    ctx: TrialContext, trials: Sequence[Trial], workers: int, threads: int, on_done: OnDone
) -> None:
    _check_sendable(ctx, workers)
    # loky spawns fresh interpreters (fork would copy torch's thread pools) and sends the
    # context with cloudpickle, so nothing depends on re-importing the user's __main__
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(ctx, threads))
    pending = {pool.submit(_run_in_worker, t): t for t in trials}
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(pending.pop(future), future.result())
    except BaseException:
        pool.shutdown(wait=False, kill_workers=True)  # a failed or interrupted study stops
        raise
    pool.shutdown(wait=True)


def _ray_tasks(
    ray: Any,
    ctx: TrialContext,
    trials: Sequence[Trial],
    in_flight: int | None,
    threads: int,
    on_done: OnDone,
) -> None:
    shared, features = ray.put(ctx), ray.put(_pack_features(ctx))
    # a trial whose worker or node dies is run again elsewhere (Ray's task retries); one
    # that raises is not. Each trial has one task and its result is taken once: a retried
    # trial is never counted twice, and with its own seed it gives the same numbers
    task = ray.remote(num_cpus=threads, max_retries=_RAY_RETRIES, retry_exceptions=False)(
        _run_remote
    )
    queue = list(trials)
    pending: dict[Any, Trial] = {}
    try:
        while queue or pending:
            while queue and (in_flight is None or len(pending) < in_flight):
                trial = queue.pop(0)
                pending[task.remote(shared, features, trial, threads)] = trial
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                on_done(pending.pop(ref), ray.get(ref))
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise


def run_trials(
    ctx: TrialContext,
    trials: Sequence[Trial],
    on_done: OnDone,
    *,
    workers: int | None = None,
    ray: Any = None,
    threads: int | None = None,
) -> None:
    """Run ``trials`` and call ``on_done(trial, result)`` as each finishes: in this process
    (``workers`` None), in a pool of ``workers`` local processes (loky), or as tasks on the Ray module
    ``ray`` (at most ``workers`` at once when given). ``threads`` is torch's CPU threads per
    trial (default: this process's setting when serial, the CPUs shared out among local
    workers, one per Ray task)."""
    if ray is not None:
        _ray_tasks(ray, ctx, trials, workers, threads or 1, on_done)
    elif workers is None:
        _serial(ctx, trials, threads, on_done)
    else:
        share = threads or max(1, (os.cpu_count() or 1) // workers)
        _processes(ctx, trials, workers, share, on_done)


def _check_reachable(address: str) -> None:
    """Fail fast on a ``host:port`` (or ``ray://host:port``) nothing listens on: Ray itself
    would retry for a long while before saying so."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise NetgraftError(
            f"cannot reach the Ray cluster at {address!r} ({exc}); start one with "
            "`ray start --head`, or give no address to run on a local Ray"
        ) from None


def connect_ray(address: str | None) -> tuple[Any, bool]:
    """The ``ray`` module, connected to the cluster at ``address`` (or ``RAY_ADDRESS``; a
    local Ray when neither is set), and whether this call started the connection (the
    caller then shuts it down). A missing Ray or an unreachable cluster is a
    :class:`NetgraftError`."""
    try:
        import ray
    except ImportError:
        raise NetgraftError(
            f"backend='ray' needs Ray, which is not installed here: {_RAY_EXTRA}"
        ) from None
    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise NetgraftError(f"cannot start or join {where}: {type(exc).__name__}: {exc}") from None
    return ray, True
