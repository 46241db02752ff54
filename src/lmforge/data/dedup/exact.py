"""Exact-document dedup: documents whose whitespace-normalised text hashes equal are duplicates.

Split the way the cross-shard stage will be: `text_digest` is the map (per document, stateless) and
`ExactDedup` the reduce (first occurrence in stream order wins). In one stream the reduce runs
online, holding one 16-byte digest and the kept id per distinct document.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import xxhash

from lmforge.data.document import Document
from lmforge.data.ledger import Ledger


def text_digest(text: str) -> bytes:
    """xxh3-128 of the text with whitespace runs collapsed and ends stripped (16 bytes)."""
    return xxhash.xxh3_128_digest(" ".join(text.split()).encode("utf-8"))


class ExactDedup:
    name = "exact_dedup"

    def __call__(self, docs: Iterable[Document], ledger: Ledger) -> Iterator[Document]:
        kept_by_digest: dict[bytes, str] = {}
        for doc in docs:
            digest = text_digest(doc.text)
            kept_id = kept_by_digest.get(digest)
            if kept_id is None:
                kept_by_digest[digest] = doc.id
                yield doc
            else:
                detail = {"kept_id": kept_id, "hash": digest.hex()}
                ledger.record_removed(doc, self.name, "duplicate", detail)
