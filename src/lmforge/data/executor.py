"""Where the data stage's shard tasks run: this process, a pool of local processes, or Ray.

Every executor runs the same task function on the same arguments; a task writes its own files and
a completion marker, so the executor only decides where and how many at once. Results come back in
task order whatever order tasks finish in.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm import tqdm

from lmforge.errors import ConfigError


def resolve_workers(workers: int) -> int:
    """0 means every core this process may use."""
    if workers < 0:
        raise ConfigError(f"data.workers: must be >= 0 (0: all cores), got {workers}")
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_tasks(fn: Callable[..., Any], args: Sequence[tuple], workers: int, executor: str = "local",
              desc: str = "", progress: bool = True) -> list[Any]:
    """fn(*a) for each a in args, on `workers` processes (1: inline) or on Ray; results in order."""
    if executor == "ray":
        return _run_ray(fn, args, desc, progress)
    if executor != "local":
        raise ConfigError(f"data.executor: expected local or ray, got {executor!r}")
    bar = tqdm(total=len(args), desc=desc, unit="task", disable=not progress or len(args) < 2)
    if workers <= 1 or len(args) <= 1:
        results = []
        for a in args:
            results.append(fn(*a))
            bar.update()
        bar.close()
        return results
    # spawn, not fork: a forked child inherits the parent's threads' locks (tqdm's monitor, BLAS).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=ctx) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        results = [f.result() for f in futures]
    bar.close()
    return results


def _run_ray(fn: Callable[..., Any], args: Sequence[tuple], desc: str, progress: bool) -> list[Any]:
    try:
        import ray
    except ImportError as e:
        raise ConfigError("data.executor: ray needs the ray package: pip install 'lmforge[ray]'") from e
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)  # a cluster via RAY_ADDRESS, else local
    remote = ray.remote(fn)
    refs = [remote.remote(*a) for a in args]
    bar = tqdm(total=len(refs), desc=desc, unit="task", disable=not progress)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        bar.update(len(done))
    bar.close()
    return ray.get(refs)
