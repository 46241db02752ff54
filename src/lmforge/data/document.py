"""The one record type of the data stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass
class Document:
    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property  # every step's ledger entry asks; encoding once per text is enough
    def n_bytes(self) -> int:
        text = self.text
        return len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii is O(1) on a str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "source": self.source, "meta": self.meta}
