"""O6: masked language modelling (BERT, RoBERTa) with optional next-sentence pairs.

Each row of raw tokens becomes one example `[CLS] A [SEP] B [SEP]` (with NSP, as BERT's
create_pretraining_data.py) or `[CLS] text [SEP]` (without, RoBERTa's contiguous text), padded to
seq_len. Masks are drawn when the batch is made, so every epoch masks a sequence anew (RoBERTa's
dynamic masking): `mask_rate` of the maskable tokens (or whole words) are chosen, with probabilistic
rounding of the count as fairseq does; a chosen token becomes [MASK] (80%), a random non-special
token (10%) or stays (10%). Labels are the uncorrupted row; the loss mask is 1 exactly where chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lmforge.config import ModelConfig, ObjectiveConfig, check
from lmforge.objectives.base import OBJECTIVES, AttentionLayout, Batch, Example, ObjectiveContext, row_rng
from lmforge.objectives.packing import document_spans

# Text that ends a sentence when a token ends with it (after trailing spaces); a newline anywhere
# in a token ends one too (lines of code, list items, headings).
SENTENCE_ENDS = tuple(s.encode("utf-8") for s in (".", "!", "?", "。", "！", "？"))


@dataclass
class MLMConfig(ObjectiveConfig):
    families: ClassVar[tuple[str, ...]] = ("encoder",)

    name: str = "mlm"
    mask_rate: float = 0.15  # share of maskable tokens (or words) chosen as targets
    mask_token_prob: float = 0.8  # a chosen token becomes [MASK] ...
    random_token_prob: float = 0.1  # ... or a random non-special token; otherwise it stays as it is
    whole_word: bool = False  # choose words: all pieces of a word are targets together
    nsp: bool = True  # sentence pairs with next-sentence labels; False: one contiguous segment
    short_seq_prob: float = 0.1  # chance that a row's content length is drawn uniformly in [2, max]

    def validate(self, where: str) -> None:
        check(where, "mask_rate", 0.0 < self.mask_rate < 1.0, "must be in (0, 1)", self.mask_rate)
        check(where, "mask_token_prob", 0.0 <= self.mask_token_prob <= 1.0, "must be in [0, 1]",
              self.mask_token_prob)
        check(where, "random_token_prob", 0.0 <= self.random_token_prob <= 1.0 - self.mask_token_prob,
              f"must be in [0, 1 - mask_token_prob] (= {1.0 - self.mask_token_prob:g})", self.random_token_prob)
        check(where, "short_seq_prob", 0.0 <= self.short_seq_prob <= 1.0, "must be in [0, 1]", self.short_seq_prob)

    def check_model(self, model: ModelConfig, where: str) -> None:
        check(where, "nsp", not self.nsp or getattr(model, "nsp_head", False),
              "needs model.nsp_head=true (the next-sentence classifier); or set objective.nsp=false", self.nsp)


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level symbols -> the byte each stands for: printable bytes are their own
    character, every other byte is the code point 256 + its rank among the non-printable ones."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + rank): b for rank, b in enumerate(others)})
    return table


def token_bytes(strings: list[str], special: np.ndarray) -> list[np.ndarray]:
    """The bytes each token stands for (none for special tokens). A token outside the byte-level
    alphabet (a foreign vocabulary) is read as its UTF-8 text."""
    alphabet = byte_level_alphabet()
    out = []
    for i, s in enumerate(strings):
        if special[i]:
            data = b""
        elif all(c in alphabet for c in s):
            data = bytes(alphabet[c] for c in s)
        else:
            data = s.encode("utf-8")
        out.append(np.frombuffer(data, dtype=np.uint8))
    return out


def is_word_character(lead: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """True where a UTF-8 character starting with byte `lead` (followed by byte `nxt`) is a word by
    itself, as BERT treats Chinese: CJK ideographs U+3400-U+9FFF (with the few Yijing symbols at
    U+4DC0), U+F900-U+FAFF and U+20000-U+2FFFF, CJK punctuation U+3000-U+303F and full-width forms
    U+FF00-U+FFEF. The first two bytes of a character fix its block."""
    return (
        ((lead >= 0xE4) & (lead <= 0xE9))
        | ((lead == 0xE3) & ((nxt == 0x80) | (nxt >= 0x90)))
        | ((lead == 0xEF) & (((nxt >= 0xA4) & (nxt <= 0xAB)) | (nxt >= 0xBC)))
        | ((lead == 0xF0) & (nxt >= 0xA0) & (nxt <= 0xAF))
    )


class TokenFacts:
    """Per-id facts read once from the vocabulary: which ids are special, which end a sentence or a
    line, and each token's bytes (for word boundaries inside Chinese text)."""

    def __init__(self, strings: list[str], special: np.ndarray):
        self.special = special
        self.data = token_bytes(strings, special)
        self.lens = np.array([d.size for d in self.data], dtype=np.int64)
        raw = [d.tobytes() for d in self.data]
        self.ends_line = np.array([b"\n" in r for r in raw], dtype=bool)
        self.ends_sentence = self.ends_line | np.array(
            [r.rstrip(b" \t\r").endswith(SENTENCE_ENDS) for r in raw], dtype=bool
        )
        self.starts_space = np.array([r[:1].isspace() for r in raw], dtype=bool)

    def word_starts(self, row: np.ndarray) -> np.ndarray:
        """bool [T]: token t begins a word. A word begins after a special token or a token holding a
        newline, and at a token that starts a character and either starts with whitespace (BPE's
        'Ġ') or borders a Chinese character (each is a word of its own). A token that starts in
        the middle of a character continues that character's word."""
        lens = self.lens[row]
        data = np.concatenate([self.data[t] for t in row])
        prev_special = np.concatenate(([True], self.special[row[:-1]]))
        prev_line = np.concatenate(([False], self.ends_line[row[:-1]]))
        if data.size == 0:
            return prev_special
        first = np.minimum(np.cumsum(lens) - lens, data.size - 1)  # byte offset of each token
        last = np.maximum(first + lens - 1, 0)
        lead = (data & 0xC0) != 0x80  # the first byte of a character
        word_char = lead & is_word_character(data, np.append(data[1:], 0))
        # Each byte gets its character's flag; bytes before the first character start get False.
        byte_word_char = np.concatenate(([False], word_char[lead]))[np.cumsum(lead)]
        starts_char = lead[first] & (lens > 0)
        prev_ends_word_char = np.concatenate(([False], byte_word_char[last[:-1]] & (lens[:-1] > 0)))
        border = self.starts_space[row] | prev_line | byte_word_char[first] | prev_ends_word_char
        return prev_special | (starts_char & border)


@OBJECTIVES.register("mlm", config=MLMConfig)
class MaskedLM:
    short_rows = False

    def __init__(self, cfg: MLMConfig, ctx: ObjectiveContext):
        self.cfg = cfg
        self.seed = ctx.seed
        sp = ctx.special
        self.cls = sp.require("cls", "objective mlm")
        self.sep = sp.require("sep", "objective mlm")
        self.mask = sp.require("mask", "objective mlm")
        self.pad = sp.require("pad", "objective mlm")
        self.eos = sp.eos
        special = np.zeros(ctx.vocab_size, dtype=bool)
        special[[i for i in sp.ids() if i < ctx.vocab_size]] = True
        self.special = special
        self.normal_ids = np.flatnonzero(~special)  # what a random replacement may draw
        # Sentence ends and word boundaries come from token strings; plain MLM needs neither.
        self.facts = TokenFacts(ctx.token_strings(), special) if cfg.nsp or cfg.whole_word else None
        self.skipped = 0  # rows with no maskable token: all padding, no loss

    def window(self, seq_len: int) -> int:
        specials = 3 if self.cfg.nsp else 2  # [CLS] A [SEP] B [SEP] / [CLS] text [SEP]
        if seq_len <= specials:
            raise ValueError(f"objective mlm needs train.seq_len > {specials} (its special tokens), got {seq_len}")
        return seq_len

    def __call__(self, batch: Batch) -> Example:
        tokens = np.asarray(batch.tokens, dtype=np.int64)
        B, T = tokens.shape
        sentences = [self._sentences(tokens[i], batch.doc_ids[i]) for i in range(B)] if self.cfg.nsp else []
        inputs, labels = np.full((B, T), self.pad, dtype=np.int64), np.full((B, T), self.pad, dtype=np.int64)
        chosen, types = np.zeros((B, T), dtype=bool), np.zeros((B, T), dtype=np.int64)
        segments, nsp_labels = np.zeros((B, T), dtype=np.int64), np.zeros(B, dtype=np.int64)
        for i in range(B):
            rng = row_rng(self.seed, int(batch.sample_ids[i]))
            if self.cfg.nsp:
                a, b, nsp_labels[i] = self._pair(i, sentences, T, rng)
                parts = [[self.cls], a, [self.sep], b, [self.sep]]
                types[i, len(a) + 2 : len(a) + len(b) + 3] = 1
            else:
                parts = [[self.cls], tokens[i, : self._target_length(T - 2, rng)], [self.sep]]
            row = np.concatenate(parts).astype(np.int64)
            n = row.size
            labels[i, :n], segments[i, :n] = row, 1
            inputs[i], chosen[i] = self._corrupt(labels[i], rng)
        return Example(
            input_ids=torch.from_numpy(inputs),
            labels=torch.from_numpy(labels),
            loss_mask=torch.from_numpy(chosen.astype(np.float32)),
            layout=AttentionLayout(causal=False, segment_ids=torch.from_numpy(segments)),
            token_type_ids=torch.from_numpy(types),
            nsp_labels=torch.from_numpy(nsp_labels) if self.cfg.nsp else None,
            predict_positions=torch.from_numpy(chosen),
        )

    def _target_length(self, max_tokens: int, rng: np.random.Generator) -> int:
        """BERT's content length: the maximum, or with short_seq_prob uniform in [2, max], so the
        model also sees the short inputs it will meet when fine-tuned."""
        max_tokens = max(max_tokens, 0)
        if rng.random() < self.cfg.short_seq_prob and max_tokens > 2:
            return int(rng.integers(2, max_tokens + 1))
        return max_tokens

    def _sentences(self, tokens: np.ndarray, doc_ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(document id, tokens) of each sentence of a row, in order; the EOS separators between
        packed documents are dropped (BERT's documents have none)."""
        assert self.facts is not None
        out = []
        for start, stop in document_spans(doc_ids):
            doc = tokens[start:stop]
            doc = doc[doc != self.eos]
            cuts = np.flatnonzero(self.facts.ends_sentence[doc][:-1]) + 1
            out.extend((int(doc_ids[start]), s) for s in np.split(doc, cuts) if s.size)
        return out

    def _pair(
        self, i: int, sentences: list[list[tuple[int, np.ndarray]]], T: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Segments A and B of row i and the NSP label (0: B follows A, 1: B is random), as BERT's
        create_instances_from_document, on the longest document of the row."""
        max_tokens = max(T - 3, 0)
        target = self._target_length(max_tokens, rng)
        own = sentences[i]
        if not own:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
        sizes: dict[int, int] = {}
        for doc, s in own:
            sizes[doc] = sizes.get(doc, 0) + s.size
        doc = max(sizes, key=sizes.__getitem__)
        chunk, length = [], 0
        for d, s in own:
            if d == doc:
                chunk.append(s)
                length += s.size
                if length >= target:
                    break
        k = int(rng.integers(1, len(chunk))) if len(chunk) > 1 else 1
        a = np.concatenate(chunk[:k])
        b = None
        if rng.random() < 0.5 or len(chunk) == 1:
            b = self._random_b(i, sentences, doc, target - a.size, rng)
        label = int(b is not None)
        if b is None:
            b = np.concatenate(chunk[k:]) if len(chunk) > 1 else np.zeros(0, np.int64)
            if b.size == 0 and a.size > 1:
                # One sentence and nothing to draw a random B from: its two halves are a true pair.
                cut = int(rng.integers(1, a.size))
                a, b = a[:cut], a[cut:]
        a, b = truncate_pair(a, b, max_tokens, rng)
        return a, b, label

    @staticmethod
    def _random_b(
        i: int, sentences: list[list[tuple[int, np.ndarray]]], doc: int, target: int, rng: np.random.Generator
    ) -> np.ndarray | None:
        """A NotNext segment B: sentences of another document from a random sentence on, up to
        `target` tokens. BERT draws that document from the whole corpus; here it comes from another
        row of the same batch, which is a random sample of the corpus too, so no second read of the
        data is needed. The partner row and the start are drawn from row i's generator, so the pair
        depends on the batch's other rows (only the nsp=False examples are batch-independent).
        None when the partner row holds no other document."""
        if len(sentences) < 2:
            return None
        j = int(rng.integers(len(sentences) - 1))
        j += j >= i
        starts = [n for n, (d, _) in enumerate(sentences[j]) if d != doc]
        if not starts:
            return None
        first = starts[int(rng.integers(len(starts)))]
        picked, length = [], 0
        for d, s in sentences[j][first:]:
            if d != sentences[j][first][0]:
                break
            picked.append(s)
            length += s.size
            if length >= target:
                break
        return np.concatenate(picked)

    def _corrupt(self, row: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The masked inputs of one assembled row and the flags of the chosen positions."""
        positions = np.flatnonzero(~self.special[row])
        chosen = np.zeros(row.size, dtype=bool)
        if positions.size == 0:
            self.skipped += 1
            return row.copy(), chosen
        if self.cfg.whole_word:  # unit = word number of each maskable position
            assert self.facts is not None
            starts = self.facts.word_starts(row)[positions]
            starts[0] = True
            unit = np.cumsum(starts) - 1
        else:
            unit = np.arange(positions.size)
        n_units = int(unit[-1]) + 1
        # Probabilistic rounding (fairseq): the expected count is exactly mask_rate * n_units.
        count = int(self.cfg.mask_rate * n_units + rng.random())
        picked = rng.choice(n_units, size=count, replace=False)
        chosen[positions[np.isin(unit, picked)]] = True
        where = np.flatnonzero(chosen)
        u = rng.random(where.size)
        inputs = row.copy()
        inputs[where[u < self.cfg.mask_token_prob]] = self.mask
        random_at = where[(u >= self.cfg.mask_token_prob) & (u < self.cfg.mask_token_prob + self.cfg.random_token_prob)]
        inputs[random_at] = rng.choice(self.normal_ids, size=random_at.size)
        return inputs, chosen


def truncate_pair(
    a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's truncate_seq_pair: drop one token at a time from the longer segment (B on ties), from
    its front or back at random, until both fit in max_tokens."""
    while a.size + b.size > max_tokens:
        front = rng.random() < 0.5
        if a.size > b.size:
            a = a[1:] if front else a[:-1]
        else:
            b = b[1:] if front else b[:-1]
    return a, b
