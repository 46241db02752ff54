"""Metrics: one JSONL line per record, so plots and reports can be rebuilt after the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.io_utils import atomic_write_text


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the curve has no replayed duplicates."""
        if self.path.exists():
            kept = [r for r in self.read() if r.get("step", 0) <= step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All complete records; a line torn by a crash mid-append is skipped, not fatal."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records
