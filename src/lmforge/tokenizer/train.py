"""Tokenizer training with HF `tokenizers`: byte-level BPE (default), Unigram or WordPiece; the saved
tokenizer.json loads in `transformers`.

Every kind is byte-level. A regex splits the text into pre-tokens, each pre-token's UTF-8 bytes
become 256 printable symbols (GPT-2's ByteLevel), and the model learns over those symbols with all
256 in its vocabulary: any string encodes without an unknown token and decodes back unchanged
(with normalizer=none). So every kind takes every option, and the same regex (`pretokenizer_pattern`)
reproduces the split outside HF (tiktoken). WordPiece marks continuations with WORDPIECE_PREFIX, a
symbol no byte maps to (BERT's "##" would be ambiguous with a literal "##"), and caps pre-tokens at
WORDPIECE_MAX_CHARS symbols so no word is too long to encode. The normalizer (nfc, nfkc) runs
before the split and is not part of the regex.

HF's Unigram trainer seeds its pieces from substrings repeated across *distinct* pre-tokens, not
weighted by how often each occurs, so a pre-token found inside no other one never becomes a piece:
unigram compresses less than bpe at the same size (about 3.1 against 3.6 bytes/token on the built-in
corpus at 4096), and with cjk=chars it would learn no ideograph, which TokenizerConfig refuses.

`tokenizer.from` (import_tokenizer) uses a given tokenizer.json instead of training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import xxhash
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmforge.config import TokenizerConfig
from lmforge.data.document import Document
from lmforge.io_utils import atomic_write_bytes, atomic_write_text
from lmforge.tokenizer.special_tokens import (
    SENTINEL_TOKENS,
    infer_special_tokens,
    load_special_tokens,
    reserved_tokens,
    save_special_tokens,
)

# The regex of ByteLevel(use_regex=True), i.e. GPT-2's; and cl100k's (GPT-4, Llama 3): case-insensitive
# contractions, a letter run may take one leading non-letter, digits in groups of at most 3.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# The same two with slots for the options: <L> letters, <N> digits, <D> a digit pre-token, <X> what the
# "other symbols" classes also exclude, <HAN> the one-ideograph alternative.
_TEMPLATES = {
    "gpt2": (r"""'s|'t|'re|'ve|'m|'ll|'d| ?<L>+<HAN>| ?<D>| ?[^\s\p{L}\p{N}<X>]+|\s+(?!\S)|\s+""", "<N>+"),
    "gpt4": (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}<X>]?<L>+<HAN>|<D>| ?[^\s\p{L}\p{N}<X>]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
        "<N>{1,3}",
    ),
}
WORDPIECE_PREFIX = "\uff03\uff03"  # "＃＃", fullwidth: outside the byte-level alphabet, so never text
WORDPIECE_MAX_CHARS = 100  # BERT's max_input_chars_per_word; longer pre-tokens are cut, not [UNK]


def pretokenizer_pattern(cfg: TokenizerConfig) -> str | None:
    """The one regex that splits text into pre-tokens for `cfg`'s options, or None for the default
    (gpt2, no options), which stays ByteLevel's built-in regex (= GPT2_PATTERN) so default tokenizers
    are unchanged. With cjk=chars every Han character (CJK ideograph) is a pre-token alone: the
    letter, digit and symbol classes exclude \\p{Han} and an alternative matches one."""
    if cfg.pre_tokenizer not in _TEMPLATES:
        raise ValueError(f"tokenizer.pre_tokenizer: {cfg.pre_tokenizer!r} is not one of {', '.join(_TEMPLATES)}")
    if cfg.cjk not in ("none", "chars"):
        raise ValueError(f"tokenizer.cjk: {cfg.cjk!r} is not one of 'none', 'chars'")
    if cfg.pre_tokenizer == "gpt2" and not cfg.split_digits and cfg.cjk == "none":
        return None
    template, digits = _TEMPLATES[cfg.pre_tokenizer]
    han = cfg.cjk == "chars"
    slots = {
        "<D>": "<N>" if cfg.split_digits else digits,
        "<L>": r"[^\P{L}\p{Han}]" if han else r"\p{L}",  # letters that are not Han
        "<N>": r"[^\P{N}\p{Han}]" if han else r"\p{N}",  # (Han numerals such as 〇 count as Han)
        "<X>": r"\p{Han}" if han else "",
        "<HAN>": r"|\p{Han}" if han else "",
    }
    for slot, value in slots.items():  # <D> first: its value holds <N>
        template = template.replace(slot, value)
    return template


def build_pre_tokenizer(cfg: TokenizerConfig) -> pre_tokenizers.PreTokenizer:
    """Regex split, then bytes to symbols (and, for WordPiece, the length cap)."""
    pattern = pretokenizer_pattern(cfg)
    if pattern is None:
        split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        steps: list[Any] = [split]
    else:
        # One Split + ByteLevel without its own regex: what tiktoken does with the same pattern.
        steps = [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    if cfg.kind == "wordpiece":
        # Byte symbols hold no newline, so "." is any symbol: runs longer than the cap become pieces.
        steps.append(pre_tokenizers.Split(Regex(f".{{1,{WORDPIECE_MAX_CHARS}}}"), behavior="isolated"))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _normalizer(name: str) -> normalizers.Normalizer | None:
    table = {"none": None, "nfc": normalizers.NFC(), "nfkc": normalizers.NFKC()}
    if name not in table:
        raise ValueError(f"tokenizer.normalizer: {name!r} is not one of {', '.join(table)}")
    return table[name]


def _model_trainer_decoder(cfg: TokenizerConfig, progress: bool) -> tuple[Any, Any, Any]:
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size - len(SENTINEL_TOKENS),  # the sentinels take the top ids
        show_progress=progress,
        # The fixed roles, then the language tags: appended, so every role keeps its id.
        special_tokens=list(reserved_tokens(cfg.language_tags)),
        # All 256 byte symbols, seen or not, so text unlike the training set still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    if cfg.kind == "bpe":
        trainer = trainers.BpeTrainer(min_frequency=cfg.min_frequency, **common)
        return models.BPE(), trainer, decoders.ByteLevel()
    if cfg.kind == "unigram":
        return models.Unigram(), trainers.UnigramTrainer(**common), decoders.ByteLevel()
    if cfg.kind == "wordpiece":
        trainer = trainers.WordPieceTrainer(
            min_frequency=cfg.min_frequency, continuing_subword_prefix=WORDPIECE_PREFIX, **common
        )
        # Continuation marks go first, per token; the prefix is never text, so nothing else is removed.
        decoder = decoders.Sequence([decoders.Replace(WORDPIECE_PREFIX, ""), decoders.ByteLevel()])
        return _wordpiece({}), trainer, decoder
    raise ValueError(f"tokenizer.kind: {cfg.kind!r} is not one of 'bpe', 'unigram', 'wordpiece'")


def _wordpiece(vocab: dict[str, int]) -> models.WordPiece:
    # "[UNK]" is never produced (every symbol and continuation is in the vocabulary, pre-tokens are
    # capped), so it is not a token; WordPiece just needs a name.
    return models.WordPiece(
        vocab, unk_token="[UNK]", continuing_subword_prefix=WORDPIECE_PREFIX,
        max_input_chars_per_word=WORDPIECE_MAX_CHARS,
    )


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_path: Path, progress: bool = True) -> Tokenizer:
    """Train on at most cfg.max_train_bytes of `texts`, save tokenizer.json atomically, return it."""
    model, trainer, decoder = _model_trainer_decoder(cfg, progress)
    tokenizer = Tokenizer(model)
    normalizer = _normalizer(cfg.normalizer)
    if normalizer is not None:  # none: every UTF-8 string maps to bytes and back unchanged
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = build_pre_tokenizer(cfg)
    tokenizer.decoder = decoder
    tokenizer.train_from_iterator(_take_bytes(texts, cfg.max_train_bytes), trainer=trainer)
    reserved = reserved_tokens(cfg.language_tags)
    if cfg.kind == "wordpiece":
        _complete_wordpiece(tokenizer, cfg.vocab_size - len(SENTINEL_TOKENS), frozenset(reserved))
    # T5 numbering: appended from <extra_id_99> down, so <extra_id_0> is the highest id.
    tokenizer.add_special_tokens(list(SENTINEL_TOKENS))
    special = infer_special_tokens(tokenizer, where=f"trained tokenizer {out_path}")
    for expected, token in enumerate(reserved):
        assert tokenizer.token_to_id(token) == expected, f"special token {token!r} moved"
    assert list(special.lang_tags) == sorted(cfg.language_tags), "a language tag was not reserved"
    atomic_write_text(Path(out_path), tokenizer.to_str(pretty=True))
    save_special_tokens(special, Path(out_path))
    return tokenizer


def _complete_wordpiece(tokenizer: Tokenizer, size: int, reserved: frozenset[str]) -> None:
    """Add the continuation form of every byte symbol the trainer did not learn (else a word with an
    unseen byte past its first symbol could not encode), dropping the newest learned tokens to keep
    `size`; ids stay dense, and roles and the alphabet keep theirs."""
    tokens = [t for t, _ in sorted(tokenizer.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])]
    present = set(tokens)
    continuations = (WORDPIECE_PREFIX + c for c in pre_tokenizers.ByteLevel.alphabet())
    missing = sorted(t for t in continuations if t not in present)
    drop = len(tokens) + len(missing) - size
    # The newest learned tokens are the rarest; single symbols and roles are never dropped
    # (TokenizerConfig's minimum vocab_size for wordpiece leaves room for all of them).
    for i in reversed(range(len(tokens))):
        if drop <= 0:
            break
        if tokens[i] not in reserved and len(tokens[i].removeprefix(WORDPIECE_PREFIX)) > 1:
            tokens[i], drop = "", drop - 1
    kept = [t for t in tokens if t] + missing
    tokenizer.model = _wordpiece({t: i for i, t in enumerate(kept)})


def spread_sample(docs: Iterable[Document], rate: float, seed: int) -> Iterator[str]:
    """Texts of a seeded, id-hashed `rate` share of `docs`: when the corpus is bigger than the
    training budget, the tokenizer sees every source and part of the corpus, not just its head."""
    if rate >= 1.0:
        yield from (d.text for d in docs)
        return
    threshold = int(rate * 2**64)
    for d in docs:
        if xxhash.xxh64_intdigest(d.id.encode("utf-8"), seed=seed) < threshold:
            yield d.text


def _take_bytes(texts: Iterable[str], budget: int) -> Iterator[str]:
    """Yield texts until `budget` UTF-8 bytes were yielded; the last one is cut to fit."""
    left = budget
    for text in texts:
        if left <= 0:
            return
        data = text.encode("utf-8")
        if len(data) > left:
            # errors="ignore" drops a character cut in half at the boundary.
            text = data[:left].decode("utf-8", errors="ignore")
        left -= len(data)
        yield text


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer.json; its roles come from `load_special_tokens(path, tokenizer)`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(str(path))


def tokenizer_hash(path: Path) -> str:
    """sha256 of the tokenizer file: token shards record it so a mismatched tokenizer is caught."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_tokenizer(source: str | Path, out_path: Path) -> Tokenizer:
    """`tokenizer.from`: copy a tokenizer.json (or the one in a transformers directory) to `out_path`
    and save its role map beside it: the source's own special_tokens.json when it has one (an
    lmforge export), else roles inferred from token strings; it must at least have an EOS."""
    source = Path(source)
    file = source / "tokenizer.json" if source.is_dir() else source
    if not file.is_file():
        raise FileNotFoundError(
            f"tokenizer.from: no tokenizer.json at {source} (give a file, or a directory saved by transformers)"
        )
    raw = file.read_bytes()
    data = json.loads(raw)
    if data.get("truncation") or data.get("padding"):
        # Documents are encoded whole: a saved truncation or padding setting would cut or pad them.
        data["truncation"] = data["padding"] = None
        raw = json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8")
    tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top + 1 != tokenizer.get_vocab_size():  # shards and embeddings are sized by the vocabulary size
        raise ValueError(f"tokenizer.from: {file} has ids up to {top} but {tokenizer.get_vocab_size()} tokens")
    special = load_special_tokens(file, tokenizer)
    atomic_write_bytes(Path(out_path), raw)  # byte for byte otherwise: the same file, the same hash
    save_special_tokens(special, Path(out_path))
    return tokenizer
