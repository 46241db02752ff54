"""Stage 1 driver: inputs -> filters -> dedup steps -> train/val shards + ledger.

The stage runs in rounds over tasks (an input's files grouped up to `data.task_bytes`, `rounds.py`):
round 0 reads; each cross-document step (duplicate ids, then each `data.dedup` entry) is a map over every task, one
reduce, and an apply at the start of the next round; the last round splits into train/val. Tasks
run on `data.workers` processes or Ray and write their own files with completion markers in a work
directory beside the output, so a killed stage resumes with the unfinished tasks and gives the same
bytes. The pipeline, not the steps, counts what enters and leaves each step; a step that loses a
document without telling the ledger fails `Ledger.check()`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from lmforge.config import DataConfig
from lmforge.data.dedup import DedupAlarm, DedupStep
from lmforge.data.doc_shards import SHARD_GLOB, ShardWriter, read_documents
from lmforge.data.document import Document
from lmforge.data.executor import resolve_workers, run_tasks
from lmforge.data.ledger import Ledger
from lmforge.data.report import write_report
from lmforge.data.rounds import (
    barriers,
    build_filters,
    plan_tasks,
    round_dir,
    run_round_task,
    shard_prefix,
    step_names,
)
from lmforge.io_utils import atomic_path, atomic_write_json, atomic_write_text


class DataStageError(RuntimeError):
    """The data stage cannot produce usable output (e.g. too few documents survive to split)."""


class Step(Protocol):
    """Takes documents, yields the kept ones, and reports each removal to the ledger."""

    name: str

    def __call__(self, docs: Iterable[Document], ledger: Ledger) -> Iterator[Document]: ...


def run_step(step: Step, docs: Iterable[Document], ledger: Ledger) -> Iterator[Document]:
    """`step` over `docs`, counting each document in and each one out under the step's name."""

    def counted_in() -> Iterator[Document]:
        for doc in docs:
            ledger.count_in(step.name, doc.source, doc.n_bytes)
            yield doc

    for doc in step(counted_in(), ledger):
        ledger.count_kept(step.name, doc.source, doc.n_bytes)
        yield doc



def run_data_stage(cfg: DataConfig, out_dir: Path, seed: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run stage 1 into `out_dir`: train/ and val/ shards, removed.jsonl and ledger.json.

    `out_dir` is replaced as a whole, and only when everything succeeded (a dedup alarm or an error
    leaves the previous outputs untouched). Work in progress lives in `.<out_dir>.work` beside it,
    keyed by the data config: a rerun of the same config resumes; another config starts afresh.
    `seed` is unused: the split uses `data.split_seed`, so changing the training seed keeps the data.
    """
    del seed
    out_dir = Path(out_dir)
    build_filters(cfg)  # a bad recipe fails here, before anything runs
    steps = barriers(cfg)
    tasks = plan_tasks(cfg)  # and so does a missing input
    work = _work_dir(cfg, out_dir)
    workers = _workers(cfg, tasks)
    summaries: dict[str, Any] = {}
    for r in range(len(steps) + 1):
        args = [(cfg, work, t, r, cfg.split_seed) for t in tasks]
        results = run_tasks(run_round_task, args, workers, cfg.executor, f"data round {r}", progress)
        if r < len(steps):
            summaries[steps[r].name] = _reduce(steps[r], work, r, len(tasks))
        if r > 0:
            _check_share(cfg, work, r, tasks, step_names(cfg)[len(cfg.filters) + r])
    ledger, ledger_json, split = _assemble(cfg, work, tasks, len(steps), results, summaries, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    totals = ledger.totals()
    table = ledger.summary_table() + f"\nsplit (data.split_seed {cfg.split_seed}): {split['train']} train, " \
                                     f"{split['val']} val"
    return {
        "docs_in": totals["docs_in"], "docs_kept": totals["docs_kept"], "docs_removed": totals["docs_removed"],
        "train_docs": split["train"], "val_docs": split["val"], "bytes_kept": totals["bytes_kept"],
        "per_source": ledger_json["per_source"], "ledger": ledger_json, "table": table,
    }


# Below this much input, starting worker processes (each imports lmforge: seconds) costs more than it saves.
AUTO_PARALLEL_BYTES = 32 << 20


def _workers(cfg: DataConfig, tasks: list) -> int:
    """data.workers, or for 0 (auto) every core once the input is large enough to pay for them. The
    output is the same bytes whatever the count."""
    if cfg.workers:
        return resolve_workers(cfg.workers)
    size = sum(Path(path).stat().st_size for t in tasks for path in t.paths)
    return resolve_workers(0) if size >= AUTO_PARALLEL_BYTES else 1


def _work_dir(cfg: DataConfig, out_dir: Path) -> Path:
    """The resumable work directory; wiped when it belongs to another data config."""
    work = out_dir.parent / f".{out_dir.name}.work"
    fingerprint = json.dumps(asdict(cfg), sort_keys=True, default=str)
    marker = work / "config.json"
    if work.exists() and (not marker.exists() or marker.read_text(encoding="utf-8") != fingerprint):
        shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        atomic_write_text(marker, fingerprint)
    return work


def _check_share(cfg: DataConfig, work: Path, r: int, tasks: list, step: str) -> None:
    """`data.max_dedup_share`: the dedup step applied in round `r` may not remove more than that share
    of any source (of 100 documents or more); raised before anything is written to the output."""
    if not cfg.max_dedup_share:
        return
    totals: dict[str, list[int]] = {}
    for t in tasks:
        counts = json.loads((round_dir(work, r, t.index) / "ledger.json").read_text(encoding="utf-8"))
        for source, c in counts.get(step, {}).items():
            row = totals.setdefault(source, [0, 0])
            row[0] += c["docs_in"]
            row[1] += c["docs_removed"]
    for source, (n, removed) in sorted(totals.items()):
        if n >= 100 and removed / n > cfg.max_dedup_share:
            raise DedupAlarm(f"{step} would remove {removed} of {n} documents ({removed / n:.1%}) of source "
                             f"{source!r}, over data.max_dedup_share={cfg.max_dedup_share}; nothing was written",
                             {"step": step, "source": source, "docs": n, "removed": removed})


def _reduce(step: DedupStep, work: Path, r: int, n_tasks: int) -> dict[str, Any]:
    out = work / f"reduce-{r}"
    if out.is_dir():
        return json.loads((out / "summary.json").read_text(encoding="utf-8"))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        summary = step.reduce([round_dir(work, r, t) / "map" for t in range(n_tasks)], tmp)
        (tmp / "summary.json").write_text(json.dumps(summary, default=str), encoding="utf-8")
    return summary


def _assemble(cfg: DataConfig, work: Path, tasks: list, last: int, results: list[dict[str, Any]],
              summaries: dict[str, Any], out_dir: Path) -> tuple[Ledger, dict[str, Any], dict[str, int]]:
    """Every task's shards, removals and counts into `out_dir`, swapped in whole at the end."""
    names = step_names(cfg)
    ledger = Ledger(steps=names)
    per_source: dict[str, dict[str, int]] = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        with open(tmp / "removed.jsonl", "wb") as removed:
            for r in range(last + 1):
                for t in tasks:
                    part = round_dir(work, r, t.index)
                    ledger.add_counts(json.loads((part / "ledger.json").read_text(encoding="utf-8")))
                    with open(part / "removed.jsonl", "rb") as f:
                        shutil.copyfileobj(f, removed)
        for t, result in zip(tasks, results, strict=True):
            for split in ("train", "val"):
                _link_shards(round_dir(work, last, t.index) / split, tmp / split)
            for source, row in result["per_source"].items():
                acc = per_source.setdefault(source, {"train_docs": 0, "val_docs": 0})
                for k, v in row.items():
                    acc[k] += v
        ledger.check()
        split = _balance(cfg, tmp, results, per_source)
        ledger_json = ledger.to_json()
        for source, row in ledger_json["per_source"].items():
            row.update(per_source.get(source, {"train_docs": 0, "val_docs": 0}))
        ledger_json["split"] = {"seed": cfg.split_seed, "val_fraction": cfg.val_fraction, **split}
        ledger_json["dedup"] = summaries
        atomic_write_json(tmp / "ledger.json", ledger_json)
        write_report(tmp, ledger_json)
    return ledger, ledger_json, split


def _link_shards(src: Path, dst: Path) -> None:
    """Hard links (the work directory goes away after); names carry the task, so they sort in corpus order."""
    dst.mkdir(exist_ok=True)
    for shard in sorted(src.glob(SHARD_GLOB)):
        target = dst / shard.name
        try:
            os.link(shard, target)
        except OSError:  # another filesystem, or no hard links: copy
            shutil.copyfile(shard, target)


def _balance(cfg: DataConfig, out: Path, results: list[dict[str, Any]],
             per_source: dict[str, dict[str, int]]) -> dict[str, int]:
    """Split counts, after moving one document if a split is empty: training needs both. The moved
    one is the empty split's nearest neighbour (lowest train key or highest val key), corpus-wide."""
    counts = {s: sum(row[f"{s}_docs"] for row in per_source.values()) for s in ("train", "val")}
    if counts["train"] + counts["val"] == 0:
        raise DataStageError("no documents survived the data stage; loosen data.filters or add inputs")
    if counts["train"] + counts["val"] == 1:
        raise DataStageError("only one document survived the data stage; a train/val split needs at least two: "
                             "loosen data.filters or add inputs")
    empty = next((s for s in ("train", "val") if counts[s] == 0), None)
    if empty is None:
        return counts
    full = "val" if empty == "train" else "train"
    edges = [r["edge"][full] for r in results if r["edge"][full] is not None]
    _, doc_id, task = (min if full == "train" else max)(edges)
    moved = _move_document(out / full, out / empty, doc_id, task, cfg.docs_per_shard)
    per_source[moved.source][f"{full}_docs"] -= 1
    per_source[moved.source][f"{empty}_docs"] += 1
    return {full: counts[full] - 1, empty: 1}


def _move_document(src: Path, dst: Path, doc_id: str, task: int, docs_per_shard: int) -> Document:
    """Rewrite task `task`'s shards in `src` without document `doc_id`, which goes to `dst`."""
    moved = None
    prefix = shard_prefix(task)
    paths = sorted(src.glob(f"shard-{prefix}*.jsonl.zst"))
    docs = [d for p in paths for d in read_documents(p)]
    for path in paths:
        path.unlink()
    with ShardWriter(src, docs_per_shard, prefix=prefix) as w:
        for doc in docs:
            if doc.id == doc_id and moved is None:
                moved = doc
            else:
                w.write(doc)
    assert moved is not None, doc_id
    with ShardWriter(dst, docs_per_shard, prefix=prefix) as w:
        w.write(moved)
    return moved
