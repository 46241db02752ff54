"""Special tokens with fixed ids at the start of every vocabulary.

All objectives' tokens are reserved at training time, so switching objective (FIM, MLM, UL2, ...)
never needs a new tokenizer, and the ids are the same for every vocabulary size.
"""

from __future__ import annotations

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

# The order is the id: never reorder or insert in the middle, only append.
SPECIAL_TOKENS: tuple[str, ...] = (
    EOS,
    PAD,
    BOS,
    MASK,
    CLS,
    SEP,
    FIM_PREFIX,
    FIM_MIDDLE,
    FIM_SUFFIX,
    FIM_PAD,
    NLU,
    NLG,
    S2S,
)

EOS_ID, PAD_ID, BOS_ID, MASK_ID, CLS_ID, SEP_ID = range(6)
FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID, FIM_PAD_ID = range(6, 10)
NLU_ID, NLG_ID, S2S_ID = range(10, 13)


def check_special_tokens(tokenizer: Tokenizer, where: str = "tokenizer") -> None:
    """Raise if `tokenizer` does not give every special token its fixed id (e.g. a foreign vocabulary)."""
    for expected, token in enumerate(SPECIAL_TOKENS):
        got = tokenizer.token_to_id(token)
        if got != expected:
            raise ValueError(f"{where}: special token {token!r} has id {got}, expected {expected}")
