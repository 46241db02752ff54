"""The objective seam: a batch of token windows in, an `Example` out.

An Example holds model inputs, labels, a loss mask and an attention layout given per token, so
prefix LM, FIM, span corruption, MLM and UL2 differ from next-token LM only in the objective, and
a model reads only the layout: it never knows which objective produced it. Objectives are built at
train time from their config and an `ObjectiveContext` (the tokenizer's special-token roles and
vocabulary), and draw their randomness from (seed, global sample id), never from the rank, so one
process and N processes corrupt the same sample identically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmforge.config import ObjectiveConfig
from lmforge.registry import Registry
from lmforge.tokenizer.special_tokens import SpecialTokens
from lmforge.tokens.loader import Batch

OBJECTIVES = Registry("objective", config_base=ObjectiveConfig)


def row_rng(seed: int, sample_id: int, stream: int = 0) -> np.random.Generator:
    """The generator of one row: a function of the sample alone, so resume, worker and rank counts
    do not change what noise a sample gets. `stream` separates independent uses (e.g. mix choice)."""
    return np.random.default_rng([seed, int(sample_id), stream])


@dataclass
class AttentionLayout:
    """Who may attend to whom, per token, for one stack's self-attention.

    - `causal`: False for encoders (every token sees its whole segment).
    - `segment_ids` [B, T] int: attention stays inside a segment (a packed document or example);
      0 marks padding, which nothing attends to. None: the row is one segment without padding.
    - `prefix` [B, T] bool: in a causal layout, tokens flagged True see each other both ways inside
      their segment (prefix LM, UL2's S-denoiser); later tokens still see them causally.

    Cross-attention from a decoder to an encoder is allowed where the two tokens' segment ids are
    equal and the encoder token is not padding.
    """

    causal: bool = True
    segment_ids: torch.Tensor | None = None
    prefix: torch.Tensor | None = None

    @property
    def is_plain_causal(self) -> bool:
        """True when SDPA's fused causal kernel computes exactly this layout (no mask tensor)."""
        return self.causal and self.segment_ids is None and self.prefix is None

    def to(self, device: torch.device | str) -> AttentionLayout:
        return replace(self, segment_ids=_move(self.segment_ids, device), prefix=_move(self.prefix, device))


def _move(t: Any, device: torch.device | str) -> Any:
    if isinstance(t, torch.Tensor):
        return t.to(device)
    if isinstance(t, AttentionLayout):
        return t.to(device)
    return t


@dataclass
class Example:
    """One batch as a model sees it. Fields a family does not use stay None.

    Decoder-only: input_ids, labels, loss_mask [B, T]; layout over input_ids.
    Encoder (BERT): labels at masked positions; token_type_ids; nsp_labels [B] (0 = B follows A).
    Encoder-decoder: input_ids/layout feed the encoder, decoder_input_ids/decoder_layout the decoder;
    labels and loss_mask are [B, T'] over the decoder. position_ids (any stack) restart at 0 per
    packed segment; None means 0..T-1.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    layout: AttentionLayout
    position_ids: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    decoder_input_ids: torch.Tensor | None = None
    decoder_layout: AttentionLayout | None = None
    decoder_position_ids: torch.Tensor | None = None
    nsp_labels: torch.Tensor | None = None
    # [B, T] bool: the only positions whose logits the loss needs (MLM's ~15%). A family that reads it
    # returns logits [N, V] for those N positions alone, skipping the vocabulary projection elsewhere.
    predict_positions: torch.Tensor | None = None
    source_ids: torch.Tensor | None = None  # [B] each row's source (the loader's), for loss per source

    TARGET_FIELDS = ("labels", "loss_mask", "nsp_labels", "source_ids")  # what the model does not read

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for the model: every set field but the targets. Callers never branch on
        the architecture; a family declares the keywords it reads."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in self.TARGET_FIELDS and getattr(self, f.name) is not None
        }

    def to(self, device: torch.device | str) -> Example:
        return replace(self, **{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    def target_counts(self) -> dict[str, float]:
        """Targets per loss term; the trainer sums them over a step's micro-batches and divides by
        the totals, so micro-batches with more targets weigh more (as one big batch would)."""
        counts = {"lm": float(self.loss_mask.sum())}
        if self.nsp_labels is not None:
            counts["nsp"] = float(self.nsp_labels.numel())
        return counts


def model_logits(output: Any) -> torch.Tensor:
    """The token logits of a model output: a tensor, or a dict with `logits` (and e.g. `nsp_logits`)."""
    return output["logits"] if isinstance(output, dict) else output


def scored(output: Any, ex: Example) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, loss_mask) aligned: [B, T, V] / [B, T], or [1, N, V] / [1, N] when the model
    computed logits only at `ex.predict_positions`."""
    logits = model_logits(output)
    if ex.predict_positions is not None and logits.dim() == 2:
        chosen = ex.predict_positions
        return logits[None], ex.labels[chosen][None], ex.loss_mask[chosen][None]
    return logits, ex.labels, ex.loss_mask


def token_losses(output: Any, ex: Example, nll: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Loss of each scored position (0 where loss_mask is 0), computed by `nll` (default `token_nll`;
    the trainer passes a compiled one under train.compile). Pass it to `loss_sums` and (detached)
    `row_losses`, so the vocabulary-wide log-softmax runs once per micro-batch."""
    return (nll or token_nll)(*scored(output, ex))


def loss_sums(output: Any, ex: Example, losses: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Summed losses (nats, fp32) per term; divide each by its total from `target_counts`.
    `losses`: this micro-batch's `token_losses`, if already computed."""
    sums = {"lm": (losses if losses is not None else token_losses(output, ex)).sum()}
    if ex.nsp_labels is not None:
        if not isinstance(output, dict) or "nsp_logits" not in output:
            raise ValueError("the example has NSP labels but the model has no NSP head (model.nsp_head)")
        sums["nsp"] = F.cross_entropy(output["nsp_logits"].float(), ex.nsp_labels, reduction="sum")
    return sums


def masked_nll(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed loss (nats, fp32) over positions where loss_mask is 1. Labels under a 0 mask may be
    any id (they are clamped into range, so -100 style fillers are harmless)."""
    return token_nll(logits, labels, loss_mask).sum()


def token_nll(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Loss of each target position (0 where loss_mask is 0), shaped like `labels`."""
    labels = labels.clamp(0, logits.shape[-1] - 1)
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return (losses * loss_mask.flatten().float()).view(labels.shape)


def row_losses(output: Any, ex: Example, losses: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed nats, target count) of each row [B], detached: the per-source breakdown of the
    token loss (from `losses`, this micro-batch's `token_losses`, when given). Sparse MLM logits are
    mapped back to their rows."""
    loss_mask = scored(output, ex)[2]
    with torch.no_grad():
        nll = (losses if losses is not None else token_losses(output, ex)).detach()
        if ex.predict_positions is not None and model_logits(output).dim() == 2:
            rows = ex.predict_positions.nonzero()[:, 0]
            B = ex.input_ids.shape[0]
            sums = torch.zeros(B, device=nll.device).index_add_(0, rows, nll[0])
            counts = torch.zeros(B, device=nll.device).index_add_(0, rows, loss_mask[0].float())
            return sums, counts
        return nll.sum(-1), loss_mask.float().sum(-1)


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective needs from the run, known only at train time."""

    special: SpecialTokens
    vocab_size: int
    seed: int = 0
    tokenizer: Tokenizer | None = None  # FIM re-encodes text; word starts come from token strings

    def token_strings(self) -> list[str]:
        """Token string of every id (byte-level BPE marks a leading space with 'Ġ')."""
        if self.tokenizer is None:
            raise ValueError("this objective needs the tokenizer in its ObjectiveContext")
        vocab = self.tokenizer.get_vocab()
        out = [""] * self.vocab_size
        for token, i in vocab.items():
            if i < self.vocab_size:
                out[i] = token
        return out


class Objective(Protocol):
    short_rows: bool  # True if a row shorter than window(seq_len) is fine (evaluation's last window)

    def window(self, seq_len: int) -> int:
        """Raw tokens per row the loader must deliver for model inputs of length seq_len."""
        ...

    def __call__(self, batch: Batch) -> Example:
        """An Example for the rows of `batch`; rows too short for the objective are left as loss-free
        padding and counted in `skipped`."""
        ...


ObjectiveFactory = Callable[[Any, ObjectiveContext], Objective]


def build_objective(cfg: ObjectiveConfig, ctx: ObjectiveContext) -> Objective:
    """The objective `cfg` names, built with the run's tokenizer roles and vocabulary."""
    return OBJECTIVES.get(cfg.name, "objective.name")(cfg, ctx)
