"""Labelled JSONL in, model rows out: reading and checking `{"text", "label"}` lines, label names,
a stratified held-out split, and each family's input framing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.errors import ConfigError
from lmforge.tokenizer.special_tokens import SpecialTokens

Label = str | int


class LabelledDataError(ConfigError):
    """A labelled file that cannot be fine-tuned on. A ConfigError, so the CLI reports it as a wrong
    input (exit 2) rather than a failed run; the message names the file and line."""


def read_labelled(path: Path, text_key: str = "text", label_key: str = "label") -> tuple[list[str], list[Label]]:
    """Texts and labels of a JSONL file, one object per line; blank lines are skipped."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: labelled JSONL file not found")
    texts: list[str] = []
    labels: list[Label] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                text, label = _parse_line(line, f"{path}:{n}", text_key, label_key)
                texts.append(text)
                labels.append(label)
    if not texts:
        raise LabelledDataError(f"{path}: no labelled lines")
    return texts, labels


def _parse_line(line: str, where: str, text_key: str, label_key: str) -> tuple[str, Label]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise LabelledDataError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise LabelledDataError(f"{where}: expected a JSON object with {text_key!r} and {label_key!r}")
    missing = [k for k in (text_key, label_key) if k not in row]
    if missing:
        raise LabelledDataError(f"{where}: missing {' and '.join(map(repr, missing))} (keys: {sorted(row)})")
    text, label = row[text_key], row[label_key]
    if not isinstance(text, str):
        raise LabelledDataError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
    # bool is an int to Python, but true/false next to 0/1 would be two names for one class.
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise LabelledDataError(f"{where}: {label_key!r} must be a string or an integer, got {label!r}")
    return text, label


def label_names(labels: list[Label], where: Path | str) -> list[Label]:
    """The distinct labels, sorted (integers before strings), so class indices do not depend on the
    order of the file."""
    names = sorted(set(labels), key=lambda x: (isinstance(x, str), x))
    if len(names) < 2:
        raise LabelledDataError(f"{where}: classification needs at least 2 distinct labels, found {names}")
    return names


def stratified_split(targets: list[int], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices: `holdout` of each class held out, at least one row of each
    class with two or more kept on either side, so no class is missing from training."""
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout: must be in (0, 1) (got {holdout})")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    train: list[int] = []
    held: list[int] = []
    for rows in by_class.values():
        rows = [rows[j] for j in rng.permutation(len(rows))]
        k = min(max(round(holdout * len(rows)), 1), len(rows) - 1)
        held += rows[:k]
        train += rows[k:]
    if not held:
        raise LabelledDataError("too few examples for a held-out split: every class has a single example")
    return sorted(train), sorted(held)


def frame_rows(tok: Tokenizer, texts: list[str], family: str, special: SpecialTokens, max_len: int) -> list[list[int]]:
    """Token ids as each family reads a whole text: an encoder's [CLS] text [SEP] (BERT's layout, the
    one its MLM pretraining used), a decoder's or encoder-decoder's text EOS (a decoder's last token
    then sees the whole text). Cut to `max_len`, keeping the special tokens."""
    # The tokenizer's own post-processor (an imported BERT's adds [CLS]/[SEP]) would double them.
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    if family == "encoder":
        cls = special.require("cls", "finetune on an encoder")
        tail = [special.sep] if special.sep is not None else []
        return [[cls, *row[: max_len - 1 - len(tail)], *tail] for row in ids]
    return [[*row[: max_len - 1], special.eos] for row in ids]


def pad_rows(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and the real-token mask [B, T]; real tokens come first in every row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        real[i, : len(row)] = True
    return ids, real
