"""One task of one round of the data stage: the unit a worker process (or Ray) runs.

A round reads each task's documents (round 0: the input file; later: what the previous round kept),
applies the decision of the barrier step before it (duplicate ids, then each `data.dedup` step), runs
the per-document filters (round 1), and then either maps the next barrier step over the survivors
and writes them for the next round, or (last round) splits them into train/val shards. Everything a
task writes goes to its own directory, renamed into place when complete: that directory existing is
the completion marker, so a killed run redoes only unfinished tasks and writes the same bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
import zstandard

from lmforge.config import DataConfig
from lmforge.data.builtin import iter_builtin_corpus
from lmforge.data.dedup import DEDUP, DedupStep, doc_key
from lmforge.data.doc_shards import ShardWriter
from lmforge.data.document import Document
from lmforge.data.files import input_files, input_root
from lmforge.data.filters import FilterStep, build_filter
from lmforge.data.inputs import READ_STEP, ReadDoc, count_read, read_file
from lmforge.data.ledger import Ledger
from lmforge.errors import ConfigError
from lmforge.io_utils import atomic_path

DOCS = "docs.jsonl.zst"


@dataclass(frozen=True)
class Task:
    index: int
    input_index: int | None  # None: the built-in corpus
    paths: tuple[str, ...]  # the input's files this task reads, in order (none for the built-in corpus)


def plan_tasks(cfg: DataConfig) -> list[Task]:
    """Tasks in recipe then file order: consecutive files of one input grouped until a task holds
    `data.task_bytes` (so the plan, and the output, depend on the files only, never on the workers);
    the built-in corpus is one task."""
    if not cfg.inputs:
        return [Task(0, None, ())]
    tasks: list[Task] = []
    for i, spec in enumerate(cfg.inputs):
        try:
            files = input_files(spec)
        except FileNotFoundError as e:
            raise ConfigError(f"data.inputs[{i}].path: {e}") from e
        tasks += [Task(len(tasks) + k, i, group) for k, group in enumerate(_group(files, cfg.task_bytes))]
    return tasks


def _group(files: list[Path], task_bytes: int) -> list[tuple[str, ...]]:
    groups: list[tuple[str, ...]] = []
    group: list[str] = []
    size = 0
    for path in files:
        group.append(str(path))
        size += path.stat().st_size
        if size >= task_bytes:
            groups.append(tuple(group))
            group, size = [], 0
    return groups + [tuple(group)] if group else groups


def build_filters(cfg: DataConfig) -> list[FilterStep]:
    return [build_filter(spec, i) for i, spec in enumerate(cfg.filters)]


def build_dedup(cfg: DataConfig) -> list[DedupStep]:
    """`data.dedup` entries: a bare name (`minhash`) or a mapping (`{name: minhash, bands: 9}`)."""
    steps = []
    for i, entry in enumerate(cfg.dedup):
        options = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = options.pop("name", None)
        where = f"data.dedup[{i}]"
        if not isinstance(name, str):
            raise ConfigError(f"{where}: expected a step name or {{name: ..., <options>}}, got {entry!r}")
        try:
            steps.append(DEDUP.build(name, where=where, name_key=f"{where}.name", **options))
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # a step's own option check
            raise ConfigError(f"{where}: {e}") from e
    return steps


def barriers(cfg: DataConfig) -> list[DedupStep]:
    """The cross-document steps, each ending a round."""
    return build_dedup(cfg)


def _entry_name(entry: Any) -> str:
    """A step's registered name, which is also its FilterStep / DedupStep name."""
    return entry if isinstance(entry, str) else str(entry["name"])


def step_names(cfg: DataConfig) -> list[str]:
    """Every ledger step in order; repeated names get "#2", "#3" so rows stay distinct."""
    # Read from the (already validated) recipe entries, not by building the steps: a classifier
    # filter loads its model when built, and this runs for every task of every round.
    names = [READ_STEP, *map(_entry_name, cfg.filters), *(f"{_entry_name(e)}_dedup" for e in cfg.dedup)]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def round_dir(work: Path, round_index: int, task: int) -> Path:
    return work / f"round-{round_index}" / f"task-{task:06d}"


def shard_prefix(task: int) -> str:
    return f"{task:06d}-"


def run_round_task(cfg: DataConfig, work: Path, task: Task, round_index: int, split_seed: int) -> dict[str, Any]:
    """Run task `task` of round `round_index` unless its directory is already complete."""
    out = round_dir(work, round_index, task.index)
    if out.is_dir():
        return json.loads((out / "result.json").read_text(encoding="utf-8"))
    steps = barriers(cfg)
    names = step_names(cfg)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        with Ledger(tmp / "removed.jsonl", steps=names) as ledger:
            docs = _round_input(cfg, work, task, round_index, steps, names, ledger)
            if round_index < len(steps):
                result = _map_next(steps[round_index], docs, tmp)
            else:
                result = _split(cfg, docs, tmp, split_seed, task.index)
        (tmp / "ledger.json").write_text(json.dumps(ledger.to_json()["counts"]), encoding="utf-8")
        (tmp / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return result


def _round_input(cfg: DataConfig, work: Path, task: Task, round_index: int, steps: list[DedupStep],
                 names: list[str], ledger: Ledger) -> Iterator[tuple[int, Document, dict]]:
    """(key, document, origin) of what enters the round's map or split: round 0 reads and filters,
    later rounds apply the previous round's dedup decisions."""
    if round_index == 0:
        filters = build_filters(cfg)
        for f, name in zip(filters, names[1:], strict=False):
            f.name = name
        for key, doc, origin in _read(cfg, task, ledger):
            ledger.origin = origin
            kept = _filter(filters, doc, ledger)
            if kept is not None:
                yield key, kept, origin
        return
    step = steps[round_index - 1]
    decisions = step.load(work / f"reduce-{round_index - 1}", task.index)
    name = names[1 + len(cfg.filters) + round_index - 1]  # read, the filters, then one per dedup step
    for key, doc, origin in _read_docs(round_dir(work, round_index - 1, task.index) / DOCS):
        ledger.origin = origin
        ledger.count_in(name, doc.source, doc.n_bytes)
        kept, reason, detail = step.apply(decisions, key, doc)
        if kept is None:
            ledger.record_removed(doc, name, reason, detail)
            continue
        ledger.count_kept(name, kept.source, kept.n_bytes)
        yield key, kept, origin


def _filter(filters: list[FilterStep], doc: Document, ledger: Ledger) -> Document | None:
    """`doc` through each filter in turn (cheap rules first: the recipe's order is the cascade)."""
    for step in filters:
        ledger.count_in(step.name, doc.source, doc.n_bytes)
        out = next(iter(step([doc], ledger)), None)
        if out is None:
            return None
        ledger.count_kept(step.name, out.source, out.n_bytes)
        doc = out
    return doc


def _read(cfg: DataConfig, task: Task, ledger: Ledger) -> Iterator[tuple[int, Document, dict]]:
    if task.input_index is None:
        reads: Iterator[ReadDoc] = (ReadDoc(d, None, None) for d in iter_builtin_corpus(cfg.builtin))
    else:
        spec = cfg.inputs[task.input_index]
        root = input_root(spec)
        reads = (r for path in task.paths for r in read_file(spec, Path(path), root, ledger, cfg.max_doc_bytes))
    seen: dict[int, int] = {}  # id digest -> line of its first record, for this file only
    file = None
    for i, read in enumerate(reads):
        origin = {} if read.file is None else {"file": str(read.file), "line": read.line}
        ledger.origin = origin
        if read.file != file:
            seen, file = {}, read.file
        digest = xxhash.xxh3_64_intdigest(read.doc.id.encode("utf-8"))
        if digest in seen:
            # A repeated id inside one file is a repeated record. Ids may repeat across files and
            # inputs (per-dataset ids 0, 1, 2, ... are normal): those documents are all kept.
            ledger.count_in(READ_STEP, read.doc.source, read.doc.n_bytes)
            ledger.record_removed(read.doc, READ_STEP, "duplicate_id", {"first_line": seen[digest]})
            continue
        seen[digest] = read.line if read.line is not None else i
        yield doc_key(task.index, i), count_read(ledger, read.doc), origin


def _map_next(step: DedupStep, docs: Iterator[tuple[int, Document, dict]], out: Path) -> dict[str, Any]:
    """Write the survivors for the next round while the next barrier step maps over them."""
    (out / "map").mkdir()
    counts = {"docs": 0}
    with open(out / DOCS, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as sink:

        def written() -> Iterator[tuple[int, Document]]:
            for key, doc, origin in docs:
                record = {"key": key, "doc": doc.to_json(), "origin": origin}
                sink.write((json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
                counts["docs"] += 1
                yield key, doc

        step.map(written(), out / "map")
    return counts


def _read_docs(path: Path) -> Iterator[tuple[int, Document, dict]]:
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as raw:
        for line in io.TextIOWrapper(raw, encoding="utf-8"):
            rec = json.loads(line)
            d = rec["doc"]
            yield rec["key"], Document(d["id"], d["text"], d["source"], d.get("meta", {})), rec["origin"]


def split_key(doc_id: str, seed: int) -> float:
    """Uniform in [0, 1); a document goes to val when below val_fraction. Depends only on the id and
    `data.split_seed`, so membership is stable across reruns, filter changes, worker counts and
    training seeds."""
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8"), seed=seed) / 2**64


def _split(cfg: DataConfig, docs: Iterator[tuple[int, Document, dict]], out: Path, seed: int,
           task: int) -> dict[str, Any]:
    """Train/val shards of one task, the counts per source, and the document of each split nearest
    the other (lowest train key, highest val key): the stage moves one if a split ends up empty."""
    per_source: dict[str, dict[str, int]] = {}
    edge: dict[str, list[Any] | None] = {"train": None, "val": None}
    prefix = shard_prefix(task)
    with (ShardWriter(out / "train", cfg.docs_per_shard, prefix=prefix) as tw,
          ShardWriter(out / "val", cfg.docs_per_shard, prefix=prefix) as vw):
        writers = {"train": tw, "val": vw}
        for _, doc, _ in docs:
            k = split_key(doc.id, seed)
            split = "val" if k < cfg.val_fraction else "train"
            writers[split].write(doc)
            row = per_source.setdefault(doc.source, {"train_docs": 0, "val_docs": 0})
            row[f"{split}_docs"] += 1
            held = edge[split]
            if held is None or (k < held[0] if split == "train" else k > held[0]):
                edge[split] = [k, doc.id, task]
    return {"per_source": per_source, "edge": edge}
