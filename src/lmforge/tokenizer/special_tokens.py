"""Special tokens by role: the role -> id map every stage reads instead of fixed ids.

lmforge's own tokenizers reserve every objective's tokens when they are trained (the ids below at
the bottom, 100 T5 sentinels at the top with `<extra_id_0>` the highest id), so switching
objective never needs a new tokenizer. Language tags (`<|lang:en|>`, one per code of
`tokenizer.language_tags`) follow the fixed bottom roles, so adding them moves no existing id.
A foreign vocabulary (an imported model's, Llama's EOS = 2) gets its roles and language tags
inferred from its token strings; an objective that needs a role the map lacks says
so by name. The map is saved as `special_tokens.json` beside `tokenizer.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

EOS = "<|endoftext|>"  # end of document; also the separator between packed documents
PAD = "<|pad|>"
BOS = "<|bos|>"
MASK = "<|mask|>"
CLS = "<|cls|>"
SEP = "<|sep|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
NLU = "[NLU]"  # UL2 mode tokens
NLG = "[NLG]"
S2S = "[S2S]"
N_SENTINELS = 100


def sentinel(i: int) -> str:
    """T5's name for the i-th sentinel; <extra_id_0> replaces the first noise span."""
    return f"<extra_id_{i}>"


# Bottom of lmforge's vocabularies; the order is the id: never reorder or insert, only append.
SPECIAL_TOKENS: tuple[str, ...] = (
    EOS, PAD, BOS, MASK, CLS, SEP, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, NLU, NLG, S2S,
)
# Added after training, in this order, so <extra_id_0> lands on the highest id as in T5.
SENTINEL_TOKENS: tuple[str, ...] = tuple(sentinel(i) for i in reversed(range(N_SENTINELS)))



def lang_tag(code: str) -> str:
    """lmforge's language-tag token for ISO-639-style `code`: `<|lang:en|>` (one spelling, used everywhere)."""
    return f"<|lang:{code}|>"


def reserved_tokens(language_tags: Sequence[str] = ()) -> tuple[str, ...]:
    """The bottom of a vocabulary lmforge trains, in id order: the fixed roles, then one tag per language
    code (after them, so tags never move a role's id)."""
    return SPECIAL_TOKENS + tuple(lang_tag(code) for code in language_tags)


# Ids in a tokenizer lmforge trained (tests and docs); code reads roles from a SpecialTokens map.
EOS_ID, PAD_ID, BOS_ID, MASK_ID, CLS_ID, SEP_ID = range(6)
FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID, FIM_PAD_ID = range(6, 10)
NLU_ID, NLG_ID, S2S_ID = range(10, 13)

# role -> token strings that play it, ours first, then common foreign spellings (BERT, T5, Llama,
# GPT-2, StarCoder), so an imported tokenizer's roles are found without configuration.
ROLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "eos": (EOS, "</s>", "<|end_of_text|>", "<eos>", "[SEP]"),
    "pad": (PAD, "<pad>", "[PAD]"),
    "bos": (BOS, "<s>", "<|begin_of_text|>", "<bos>", "[CLS]"),
    "mask": (MASK, "<mask>", "[MASK]"),
    "cls": (CLS, "[CLS]", "<s>"),
    "sep": (SEP, "[SEP]", "</s>"),
    "fim_prefix": (FIM_PREFIX, "<fim_prefix>", "<PRE>"),
    "fim_middle": (FIM_MIDDLE, "<fim_middle>", "<MID>"),
    "fim_suffix": (FIM_SUFFIX, "<fim_suffix>", "<SUF>"),
    "fim_pad": (FIM_PAD, "<fim_pad>"),
    "nlu": (NLU,),
    "nlg": (NLG,),
    "s2s": (S2S,),
}
SPECIAL_FILE = "special_tokens.json"

# Language tags are looked for among a tokenizer's added tokens only (in its learned vocabulary "en_US"
# or "__eq__" are just text), and a foreign spelling only as a *special* added token (how Whisper,
# mBART, NLLB and M2M100 declare theirs). Ours, `<|lang:xx|>`, wins over a foreign spelling of a code.
_OURS = re.compile(r"<\|lang:([a-z0-9_-]+)\|>")
_WHISPER = re.compile(r"<\|([a-z]{2,3})\|>")  # Whisper's <|en|>, <|haw|>
_M2M100 = re.compile(r"__([a-z]{2,3})__")  # fairseq / M2M100's __en__
_MBART_NLLB = re.compile(r"[a-z]{2}_[A-Z]{2}|[a-z]{3}_[A-Z][a-z]{3}")  # mBART's en_XX, NLLB's eng_Latn
# Special tokens spelled like a Whisper tag that are roles, not languages (ours are <|pad|>, <|bos|>, ...).
_NOT_LANGUAGES = frozenset({"pad", "bos", "eos", "eot", "eom", "sot", "cls", "sep", "unk", "fim", "pre", "mid", "suf",
                            "end", "sys", "img", "bot", "usr"})
_ROLE_STRINGS = frozenset(t for candidates in ROLE_CANDIDATES.values() for t in candidates)


def tag_language(token: str, special: bool) -> str | None:
    """The language code an added token tags, as the tokenizer spells it (en, en_XX, eng_Latn), or None.
    Conservative on purpose: a foreign spelling counts only for a special token, a role string is never
    a tag, and Whisper's bare <|xx|> not when xx is a role word (<|pad|>, <|eot|>)."""
    if m := _OURS.fullmatch(token):
        return m[1]
    if not special or token in _ROLE_STRINGS:
        return None
    if (m := _WHISPER.fullmatch(token)) and m[1] not in _NOT_LANGUAGES:
        return m[1]
    if m := _M2M100.fullmatch(token):
        return m[1]
    return token if _MBART_NLLB.fullmatch(token) else None


def infer_lang_tags(tokenizer: Tokenizer, role_ids: Collection[int] = ()) -> dict[str, int]:
    """code -> id of every language tag among `tokenizer`'s added tokens (not those playing a role);
    for a code spelled twice, ours first, then the lowest id."""
    found: list[tuple[bool, int, str]] = []
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        code = tag_language(added.content, added.special)
        if code is not None and token_id not in role_ids:
            found.append((_OURS.fullmatch(added.content) is None, token_id, code))
    tags: dict[str, int] = {}
    for _, token_id, code in sorted(found):
        tags.setdefault(code, token_id)
    return dict(sorted(tags.items()))


def language_lookup(lang_tags: dict[str, int]) -> dict[str, int]:
    """Document language (the langid filter's ISO 639-1 code) -> tag id: each tag's own code, and for a
    regional one (mBART's `en_XX`, a configured `pt-br`) also its base (`en`, `pt`) when no other tag
    claims it, so such tags serve langid's codes."""
    lookup = dict(lang_tags)
    bases: dict[str, list[int]] = {}
    for code, token_id in lang_tags.items():
        base = re.split(r"[-_]", code, maxsplit=1)[0]
        if base != code:
            bases.setdefault(base, []).append(token_id)
    for base, ids in bases.items():
        if len(ids) == 1:
            lookup.setdefault(base, ids[0])
    return lookup


class MissingRoleError(ValueError):
    """An objective, export or generation needs a special token the tokenizer does not have."""


@dataclass(frozen=True)
class SpecialTokens:
    """Role -> token id; None where the vocabulary has no such token. `sentinels[i]` is
    `<extra_id_i>`'s id."""

    eos: int
    pad: int | None = None
    bos: int | None = None
    mask: int | None = None
    cls: int | None = None
    sep: int | None = None
    fim_prefix: int | None = None
    fim_middle: int | None = None
    fim_suffix: int | None = None
    fim_pad: int | None = None
    nlu: int | None = None
    nlg: int | None = None
    s2s: int | None = None
    sentinels: tuple[int, ...] = field(default_factory=tuple)
    tokens: dict[str, str] = field(default_factory=dict)  # role -> token string, for exports
    lang_tags: dict[str, int] = field(default_factory=dict)  # language code -> its tag's id

    def lang_tag_id(self, code: str, needed_by: str) -> int:
        """The tag id for language `code` (see language_lookup); a clear error lists the tags there are."""
        lookup = language_lookup(self.lang_tags)
        if code not in lookup:
            have = ", ".join(sorted(self.lang_tags)) or "none (set tokenizer.language_tags and retrain the tokenizer)"
            raise MissingRoleError(f"{needed_by}: no language tag for {code!r}; this tokenizer's tags: {have}")
        return lookup[code]

    def require(self, role: str, needed_by: str) -> int:
        value = getattr(self, role)
        if value is None:
            raise MissingRoleError(
                f"{needed_by} needs a {role!r} special token, which this tokenizer does not have; "
                f"train one with lmforge (it reserves every role) or add it to the tokenizer"
            )
        return int(value)

    def require_sentinels(self, n: int, needed_by: str) -> tuple[int, ...]:
        if len(self.sentinels) < n:
            raise MissingRoleError(
                f"{needed_by} needs {n} sentinel tokens (<extra_id_0>..), this tokenizer has {len(self.sentinels)}"
            )
        return self.sentinels

    def ids(self) -> frozenset[int]:
        """Every special id: masking never chooses them and random replacements never draw them."""
        single = [getattr(self, f.name) for f in fields(self) if f.name not in ("sentinels", "tokens", "lang_tags")]
        return (frozenset(int(i) for i in single if i is not None) | frozenset(self.sentinels)
                | frozenset(self.lang_tags.values()))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["sentinels"] = list(self.sentinels)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "special_tokens.json") -> SpecialTokens:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown or "eos" not in data:
            raise ValueError(f"{where}: not a special-token map (unknown roles {sorted(unknown)}, or no 'eos')")
        data = dict(data)
        data["sentinels"] = tuple(int(i) for i in data.get("sentinels", ()))
        tags = data.get("lang_tags", {})  # absent in files written before language tags: none
        if not isinstance(tags, dict):
            raise ValueError(f"{where}: 'lang_tags' must map language codes to ids, got {tags!r}")
        data["lang_tags"] = {str(code): int(i) for code, i in tags.items()}
        return cls(**data)


def infer_special_tokens(tokenizer: Tokenizer, where: str = "tokenizer") -> SpecialTokens:
    """The role map of `tokenizer`, found by token strings; it must at least have an EOS."""
    roles: dict[str, Any] = {}
    tokens: dict[str, str] = {}
    for role, candidates in ROLE_CANDIDATES.items():
        for token in candidates:
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                roles[role], tokens[role] = token_id, token
                break
    if "eos" not in roles:
        raise MissingRoleError(f"{where}: no end-of-document token (tried {', '.join(ROLE_CANDIDATES['eos'])})")
    sentinels: list[int] = []
    while (token_id := tokenizer.token_to_id(sentinel(len(sentinels)))) is not None:
        sentinels.append(token_id)
    lang_tags = infer_lang_tags(tokenizer, set(roles.values()) | set(sentinels))
    return SpecialTokens(**roles, sentinels=tuple(sentinels), tokens=tokens, lang_tags=lang_tags)


def special_tokens_path(tokenizer_path: Path) -> Path:
    tokenizer_path = Path(tokenizer_path)
    folder = tokenizer_path if tokenizer_path.is_dir() else tokenizer_path.parent
    return folder / SPECIAL_FILE


def save_special_tokens(special: SpecialTokens, tokenizer_path: Path) -> Path:
    from lmforge.io_utils import atomic_write_json

    path = special_tokens_path(tokenizer_path)
    atomic_write_json(path, special.to_json())
    return path


def load_special_tokens(tokenizer_path: Path, tokenizer: Tokenizer | None = None) -> SpecialTokens:
    """The map saved beside `tokenizer_path`, or (for a tokenizer.json without one) inferred and
    checked against the tokenizer."""
    path = special_tokens_path(tokenizer_path)
    if path.is_file():
        special = SpecialTokens.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
        if tokenizer is not None:
            _check_map(special, tokenizer, path)
        return special
    if tokenizer is None:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return infer_special_tokens(tokenizer, str(tokenizer_path))


def _check_map(special: SpecialTokens, tokenizer: Tokenizer, path: Path) -> None:
    vocab = tokenizer.get_vocab_size()
    for role, token in special.tokens.items():
        if tokenizer.token_to_id(token) != getattr(special, role):
            got = tokenizer.token_to_id(token)
            raise ValueError(f"{path}: role {role!r} is {token!r} = {getattr(special, role)}; the tokenizer has {got}")
    for code, token_id in special.lang_tags.items():
        token = tokenizer.id_to_token(token_id)
        if token is None or tag_language(token, special=True) != code:
            raise ValueError(f"{path}: language tag {code!r} is id {token_id}; the tokenizer has {token!r} there")
    bad = [i for i in special.ids() if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{path}: special ids {sorted(bad)[:5]} outside the vocabulary of {vocab}")
