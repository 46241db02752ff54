"""Vocabulary extension, as Chinese-LLaMA did: a tokenizer learns tokens of new text (a language or
domain it served badly) without losing the ids a trained model's embeddings are indexed by.

A tokenizer of the base's kind, with the base's normalizer and pre-tokenizer, is trained on the new
texts; its tokens that the base lacks are appended, up to `n_new`, in the order it learned them.
BPE appends each new token with its merge (at the lowest priority, after every base merge, so the
base's merges apply first), WordPiece appends the token (longest match then finds it). Every old
token keeps its id, roles and sentinels included; new ids come after the current highest id (so
after the T5 sentinels: `<extra_id_0>` is no longer the highest id, which nothing relies on, as
code reads sentinel ids from the role map). The role map is saved unchanged. Text that the new
merges touch encodes differently (that is the point: fewer tokens); text they do not touch, the same.
Grow the model with `lmforge.models.resize.resize_token_embeddings` to the new vocabulary size
(a run with `train.init_from` and `tokenizer.from` set to the extension does it itself).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, trainers

from lmforge.io_utils import atomic_write_text
from lmforge.tokenizer.report import measure
from lmforge.tokenizer.special_tokens import load_special_tokens, save_special_tokens
from lmforge.tokenizer.tiktoken_file import export_tiktoken


def extend_vocabulary(
    base_tokenizer_path: str | Path,
    texts: Iterable[str],
    n_new: int,
    out_path: str | Path,
    min_frequency: int = 2,
    train_vocab_size: int | None = None,
) -> dict[str, Any]:
    """Append up to `n_new` tokens learned on `texts` to the base tokenizer (a tokenizer.json or a
    directory holding one); write tokenizer.json and special_tokens.json to `out_path` (a directory,
    or a .json file path). `train_vocab_size` is the helper tokenizer's size (default: the base's
    plus n_new, enough to learn n_new tokens even where it relearns the base's). Returns what was
    added and bytes/token on `texts` before and after."""
    if n_new < 1:
        raise ValueError(f"extend_vocabulary: n_new must be >= 1 (got {n_new})")
    base_file = _tokenizer_file(Path(base_tokenizer_path))
    base = Tokenizer.from_file(str(base_file))
    special = load_special_tokens(base_file, base)
    texts = [t for t in texts if t]
    data = json.loads(base.to_str())
    helper = _train_helper(base, data["model"], texts, min_frequency, train_vocab_size or base.get_vocab_size() + n_new)
    old_vocab = base.get_vocab(with_added_tokens=True)
    _pin_added_tokens(data)
    added = _append(data["model"], json.loads(helper.to_str())["model"], old_vocab, n_new)
    extended = Tokenizer.from_str(json.dumps(data))
    _check_old_ids(old_vocab, extended)
    out_file = Path(out_path) if Path(out_path).suffix == ".json" else Path(out_path) / "tokenizer.json"
    atomic_write_text(out_file, extended.to_str(pretty=True))
    save_special_tokens(special, out_file)
    load_special_tokens(out_file, extended)  # the saved map still matches the tokenizer
    tiktoken_line = export_tiktoken(out_file)
    before = measure(base, (("new", t) for t in texts))["all"]
    after = measure(extended, (("new", t) for t in texts))["all"]
    return {
        "path": str(out_file),
        "added": len(added),
        "new_tokens": added,
        "vocab_size_before": base.get_vocab_size(),
        "vocab_size_after": extended.get_vocab_size(),
        "bytes_per_token_before": before["bytes_per_token"],
        "bytes_per_token_after": after["bytes_per_token"],
        "tiktoken": tiktoken_line,
    }


def _tokenizer_file(path: Path) -> Path:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"base tokenizer not found: {file}")
    return file


def _train_helper(
    base: Tokenizer, model: dict[str, Any], texts: list[str], min_frequency: int, vocab_size: int
) -> Tokenizer:
    """A tokenizer of the base's model type and options, normalizer and pre-tokenizer, trained on `texts`."""
    kind = model["type"]
    # The base's word-piece markers, where it has them (tokenizers rejects None for "none").
    affixes = {k: model[k] for k in ("continuing_subword_prefix", "end_of_word_suffix") if model.get(k)}
    options = dict(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False)
    if kind == "BPE":
        helper = Tokenizer(models.BPE(**affixes))
        trainer: Any = trainers.BpeTrainer(**options, **affixes)
    elif kind == "WordPiece":
        helper = Tokenizer(models.WordPiece(unk_token=model["unk_token"], **affixes))
        trainer = trainers.WordPieceTrainer(**options, **affixes)
    else:
        # A Unigram piece needs a score comparable with the base model's, which a model trained on
        # other text does not give.
        raise ValueError(f"extend_vocabulary: a {kind} tokenizer cannot be extended (BPE and WordPiece can)")
    if base.normalizer is not None:
        helper.normalizer = base.normalizer
    if base.pre_tokenizer is not None:
        helper.pre_tokenizer = base.pre_tokenizer
    helper.train_from_iterator(texts, trainer=trainer)
    return helper


def _pin_added_tokens(data: dict[str, Any]) -> None:
    """Put every added token (the sentinels) into the model's vocabulary at its id. tokenizers numbers
    added tokens the model lacks from the model's size up when it loads a tokenizer.json, so new model
    ids past the sentinels would push them. The model cannot produce them (BPE merges and WordPiece
    pre-tokens never spell `<extra_id_0>`), as with the roles the trainer already put there."""
    vocab = data["model"]["vocab"]
    for token in data["added_tokens"]:
        vocab.setdefault(token["content"], token["id"])


def _append(model: dict[str, Any], learned: dict[str, Any], old_vocab: dict[str, int], n_new: int) -> list[str]:
    """Append to `model` (the base's, as in tokenizer.json) up to `n_new` of the `learned` model's tokens
    that the base lacks, in the order it learned them; returns them."""
    next_id = max(old_vocab.values()) + 1
    known = set(old_vocab)
    added: list[str] = []

    def add(token: str) -> None:
        nonlocal next_id
        model["vocab"][token] = next_id
        known.add(token)
        added.append(token)
        next_id += 1

    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in learned.get("merges", [])]
    if model["type"] == "WordPiece":  # a vocabulary only: longest match finds whatever is added
        for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
            if len(added) < n_new and token not in known:
                add(token)
        return added
    # Symbols no merge makes that the base lacks (never, for byte-level BPE) first: merges need them.
    products = {_merged(a, b, model) for a, b in merges}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if len(added) < n_new and token not in known and token not in products:
            add(token)
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for a, b in merges:
        token = _merged(a, b, model)
        if len(added) >= n_new:
            break
        # A part the base cannot form (a learned token it lacks and we did not add) makes the merge dead.
        if token in known or a not in known or b not in known:
            continue
        add(token)
        model["merges"].append(f"{a} {b}" if string_merges else [a, b])
    return added


def _merged(a: str, b: str, model: dict[str, Any]) -> str:
    """The token a merge of `a` and `b` makes: a continuation's prefix is dropped (WordPiece, BPE with one)."""
    prefix = model.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def _check_old_ids(old_vocab: dict[str, int], extended: Tokenizer) -> None:
    moved = [t for t, i in old_vocab.items() if extended.token_to_id(t) != i]
    if moved:
        raise RuntimeError(f"extend_vocabulary: old tokens changed ids: {moved[:5]}")


def read_texts(paths: Iterable[str]) -> list[str]:
    """The texts of files, directories or globs, read as `data.inputs` are (text, jsonl, parquet,
    compressed or not)."""
    from lmforge.config import InputConfig
    from lmforge.data.inputs import iter_input
    from lmforge.data.ledger import Ledger

    ledger = Ledger()
    return [doc.text for path in paths for doc in iter_input(InputConfig(path=path), ledger)]
