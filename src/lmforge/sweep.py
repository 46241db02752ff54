"""Launch many small runs that share one tokenized corpus, and collect their results.

The one sweep runner of lmforge (the mixture search uses it; a scaling-law fit will too). A sweep is
a base config plus runs, each a name and a dict of dotted overrides applied on top of the base:

    base out_dir/                     data/, tokenizer/, tokens/ built once by `prepare_shared`
      sweep/shared.json               what the shared stages were built from (reused while it matches)
      sweep/<name>/                   one run: recipe.yaml, run.json, checkpoints/, metrics.jsonl, eval.json
      sweep/<name>/data -> ../../data     (also tokenizer/, tokens/): relative symlinks to the base's

Why symlinks rather than a config pointer: every stage finds its inputs through `RunPaths(out_dir)`,
so links make each run directory an ordinary run (`lmforge eval out_dir=.../sweep/<name>` works on
it) with no new config key and no change to any stage; token sets are memory-mapped through the link,
never copied; and relative links survive moving the whole out_dir. Nothing in train or eval writes
under data/, tokenizer/ or tokens/.

A run whose run.json says it finished with the same resolved config over the same token sets is read
back, not re-run; one that was interrupted resumes from its checkpoint; one whose config changed is
cleared and started again. A run that raises is reported with its error and the sweep goes on.
Runs go one after another, or in `workers` spawned processes (torch threads split between them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from lmforge import stages
from lmforge.config import ConfigError, RunConfig, to_dict
from lmforge.io_utils import atomic_write_json, atomic_write_text
from lmforge.recipe import load_config, set_dotted

SHARED = ("data", "tokenizer", "tokens")  # the RunPaths entries a run reads from the base
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")

Runner = Callable[[RunConfig, bool], dict[str, Any]]


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: `overrides` maps dotted keys to values (`{"train.max_steps": 60}`)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    name: str
    overrides: dict[str, Any]
    run_dir: str
    status: str  # "done" (ran now), "cached" (had finished before: read back) or "failed"
    eval: dict[str, Any] = field(default_factory=dict)  # the run's eval.json
    train: dict[str, Any] = field(default_factory=dict)  # stage_train's summary: params, steps, tokens_seen, ...
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sweep_root(base: RunConfig) -> Path:
    return base.out / "sweep"


# ---------------------------------------------------------------------------- shared stages


def prepare_shared(base: RunConfig, progress: bool = True) -> dict[str, Any]:
    """data -> tokenizer -> tokenize once in the base out_dir; skipped while the sections they read
    are unchanged and both token splits are complete (a real corpus takes hours to rebuild)."""
    marker = sweep_root(base) / "shared.json"
    key = {"seed": base.seed, "data": to_dict(base.data), "tokenizer": to_dict(base.tokenizer),
           "tokens.dtype": base.tokens.dtype}
    key = json.loads(json.dumps(key, default=str))
    if _shared_complete(base.out) and marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == key:
        return {"reused": True, "fingerprint": shared_fingerprint(base.out)}
    for name, fn in (("data", stages.stage_data), ("tokenizer", stages.stage_tokenizer),
                     ("tokenize", stages.stage_tokenize)):
        _log(f"== sweep: shared stage {name} in {base.out}")
        fn(base, progress=progress)
    atomic_write_json(marker, key)
    return {"reused": False, "fingerprint": shared_fingerprint(base.out)}


def _shared_complete(root: Path) -> bool:
    paths = stages.RunPaths(root)
    return paths.tokenizer.is_file() and all((paths.tokens / f"{s}.json").is_file() for s in ("train", "val"))


def shared_fingerprint(root: Path) -> str:
    """Identifies the token sets: the split manifests hold the tokenizer hash and each set's checksum."""
    digest = hashlib.sha256()
    for split in ("train", "val"):
        manifest = stages.RunPaths(root).tokens / f"{split}.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: the sweep's shared stages did not run (prepare_shared)")
        digest.update(manifest.read_bytes())
    return digest.hexdigest()[:16]


def link_shared(base_root: Path, run_dir: Path) -> None:
    """Point run_dir's data/, tokenizer/ and tokens/ at the base's with relative symlinks."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link, target = run_dir / name, Path(os.path.relpath(base_root / name, run_dir))
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                continue
            link.unlink()
        elif link.exists():
            raise FileExistsError(f"{link} is a real {name}/, not a link to the base run's: remove it")
        link.symlink_to(target, target_is_directory=True)


# ---------------------------------------------------------------------------- one run


def run_config(base: RunConfig, run: SweepRun) -> dict[str, Any]:
    """The run's full config as plain data: the base's resolved config, then its overrides."""
    raw = json.loads(json.dumps(to_dict(base), default=str))
    for key, value in run.overrides.items():
        set_dotted(raw, key, value)
    raw["out_dir"] = str(sweep_root(base) / run.name)
    return raw


def train_and_eval(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """The default runner: train (resuming a checkpoint of the same run), then evaluate."""
    return {"train": stages.stage_train(cfg, progress=progress), "eval": stages.stage_eval(cfg, progress=progress)}


@dataclass(frozen=True)
class _Job:
    """Everything a (possibly spawned) process needs to do one run; plain, picklable data."""

    name: str
    overrides: dict[str, Any]
    run_dir: Path
    key: str  # hash of the resolved config and the shared token sets
    runner: Runner
    progress: bool


def _execute(job: _Job) -> RunResult:
    """Run one job: read it back when it finished before, else run it; never raises for the run's own errors."""
    state_path = job.run_dir / "run.json"
    state = _read_json(state_path)
    if state.get("key") == job.key and state.get("status") == "done" and (job.run_dir / "eval.json").is_file():
        return RunResult(job.name, job.overrides, str(job.run_dir), "cached", _read_json(job.run_dir / "eval.json"),
                         state.get("train", {}), seconds=state.get("seconds", 0.0))
    if state.get("key") != job.key:  # another config (or no record): its checkpoints must not be resumed
        _clear_outputs(job.run_dir)
    record = {"name": job.name, "overrides": job.overrides, "key": job.key, "status": "running"}
    atomic_write_json(state_path, record)
    t0 = time.perf_counter()
    try:
        out = job.runner(load_config(job.run_dir / "recipe.yaml"), job.progress)
    except Exception as e:  # reported in the results; the sweep goes on with the next run
        error = f"{type(e).__name__}: {e}"
        atomic_write_json(state_path, {**record, "status": "failed", "error": error,
                                       "traceback": traceback.format_exc()})
        return RunResult(job.name, job.overrides, str(job.run_dir), "failed", error=error,
                         seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    train = json.loads(json.dumps(out.get("train", {}), default=str))
    atomic_write_json(state_path, {**record, "status": "done", "train": train, "seconds": seconds})
    return RunResult(job.name, job.overrides, str(job.run_dir), "done", _read_json(job.run_dir / "eval.json"),
                     train, seconds=seconds)


def _clear_outputs(run_dir: Path) -> None:
    """Remove what an earlier run left in its own directory; the shared links stay."""
    for entry in run_dir.iterdir():
        if entry.name in ("recipe.yaml", *SHARED):  # the shared entries are links (link_shared checked)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------------- the sweep


def run_sweep(
    base: RunConfig,
    runs: Sequence[SweepRun],
    workers: int = 1,
    progress: bool = True,
    runner: Runner = train_and_eval,
) -> list[RunResult]:
    """Run (or read back) every run of the sweep; results in the order of `runs`. The shared stages
    must be done (`prepare_shared`). Every run's config is built and checked before any trains, so a
    typo in an override fails the sweep at once; a run that fails while running is only reported."""
    if workers < 1:
        raise ConfigError(f"workers: must be >= 1 (got {workers})")
    jobs = _plan(base, runs, runner, progress and workers == 1)
    if workers == 1:
        return [_report(i, len(jobs), _execute(job)) for i, job in enumerate(jobs)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [(job, pool.submit(_execute, job)) for job in jobs]
        return [_report(i, len(jobs), _collect(job, fut)) for i, (job, fut) in enumerate(futures)]


def _plan(base: RunConfig, runs: Sequence[SweepRun], runner: Runner, progress: bool) -> list[_Job]:
    names = [r.name for r in runs]
    for name in names:
        if not _NAME.match(name) or names.count(name) > 1:
            raise ConfigError(f"sweep run name {name!r}: must be unique and a plain file name ({_NAME.pattern})")
    fingerprint = shared_fingerprint(base.out)
    jobs = []
    for run in runs:
        raw = run_config(base, run)
        run_dir = Path(raw["out_dir"])
        link_shared(base.out, run_dir)
        atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        try:
            load_config(run_dir / "recipe.yaml")
        except ConfigError as e:
            raise ConfigError(f"sweep run {run.name!r}: {e}") from e
        key = hashlib.sha256(json.dumps([raw, fingerprint], sort_keys=True).encode()).hexdigest()[:16]
        jobs.append(_Job(run.name, dict(run.overrides), run_dir, key, runner, progress))
    return jobs


def _collect(job: _Job, future: Any) -> RunResult:
    """A worker process that died (killed, out of memory) is a failed run like any other."""
    try:
        return future.result()
    except Exception as e:
        return RunResult(job.name, job.overrides, str(job.run_dir), "failed", error=f"{type(e).__name__}: {e}")


def _init_worker(threads: int) -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:  # the user's own setting wins
        torch.set_num_threads(threads)


def _report(i: int, n: int, r: RunResult) -> RunResult:
    what = r.error if not r.ok else f"val loss {r.eval.get('loss', float('nan')):.4f}"
    took = f"ran {r.seconds:.0f}s earlier" if r.status == "cached" else f"{r.seconds:.0f}s"
    _log(f"== sweep [{i + 1}/{n}] {r.name}: {r.status} ({took}), {what}")
    return r


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
