"""T5: length-bucketed dynamic batches for padded examples (`tokens.length_buckets: true`).

Encoder and encoder-decoder objectives that do not fill their rows (BERT's short sequences and
sentence pairs, a short last piece) pad them. Within one optimizer step the trainer hands all its
micro-batches here: rows are sorted by their real length, regrouped into micro-batches of at most
the original micro-batch's token budget (more rows when they are short), and each group is cut to
its longest row, so padding columns are never computed. A step's gradient is a sum over its rows
divided by its target count, so regrouping rows inside a step leaves it unchanged (up to float
summation order); a trimmed column is padding in every row of its group, so no real token's
output changes either.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch

from lmforge.objectives.base import AttentionLayout, Example

_ENCODER = ("input_ids", "position_ids", "token_type_ids", "predict_positions")
_DECODER = ("decoder_input_ids", "decoder_position_ids")


def _lengths(layout: AttentionLayout | None, rows: int, width: int) -> torch.Tensor:
    """Real length of each row: one past its last non-padding position (segment 0 is padding)."""
    if layout is None or layout.segment_ids is None:
        return torch.full((rows,), width, dtype=torch.long)
    real = layout.segment_ids != 0
    positions = torch.arange(1, width + 1).expand_as(real)
    return (positions * real).amax(dim=1)


def _merge(examples: list[Example]) -> Example | None:
    """All rows in one Example, or None when the micro-batches differ in shape or fields."""
    first = examples[0]
    out: dict[str, Any] = {}
    for f in fields(first):
        values = [getattr(ex, f.name) for ex in examples]
        if all(v is None for v in values):
            out[f.name] = None
        elif isinstance(values[0], AttentionLayout):
            out[f.name] = AttentionLayout(
                values[0].causal,
                *(None if getattr(values[0], k) is None else torch.cat([getattr(v, k) for v in values])
                  for k in ("segment_ids", "prefix")),
            )
        elif any(v is None for v in values) or len({tuple(v.shape[1:]) for v in values}) > 1:
            return None
        else:
            out[f.name] = torch.cat(values)
    return Example(**out)


def _take(ex: Example, rows: torch.Tensor, enc: int, dec: int) -> Example:
    """Rows `rows` of `ex`, encoder-side columns cut to `enc` and decoder-side ones to `dec`."""
    decoder_targets = ex.decoder_input_ids is not None  # labels follow the decoder in encoder-decoders

    def cut(name: str, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, AttentionLayout):
            width = dec if name == "decoder_layout" else enc
            return AttentionLayout(value.causal, *(None if t is None else t[rows, :width]
                                                   for t in (value.segment_ids, value.prefix)))
        if value.dim() == 1:
            return value[rows]
        on_decoder = name in _DECODER or (name in ("labels", "loss_mask") and decoder_targets)
        return value[rows, : dec if on_decoder else enc]

    return replace(ex, **{f.name: cut(f.name, getattr(ex, f.name)) for f in fields(ex)})


def bucket_by_length(examples: list[Example]) -> list[Example]:
    """The step's rows regrouped by length (see the module docstring); unchanged when there is
    nothing to trim or the micro-batches cannot be merged."""
    merged = _merge(examples) if len(examples) > 0 else None
    if merged is None:
        return examples
    rows, width = merged.input_ids.shape
    enc = _lengths(merged.layout, rows, width)
    dec = (_lengths(merged.decoder_layout, rows, merged.decoder_input_ids.shape[1])
           if merged.decoder_input_ids is not None else torch.zeros(rows, dtype=torch.long))
    budget = examples[0].input_ids.numel() + (
        examples[0].decoder_input_ids.numel() if examples[0].decoder_input_ids is not None else 0)
    order = sorted(range(rows), key=lambda r: (int(enc[r]), int(dec[r]), r))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = (0, 0)  # of the group being filled; rows come shortest first
    for r in order:
        wider = (max(longest[0], int(enc[r])), max(longest[1], int(dec[r])))
        if current and (len(current) + 1) * sum(wider) > budget:
            groups.append(current)
            current, wider = [], (int(enc[r]), int(dec[r]))
        current.append(r)
        longest = wider
    groups.append(current)
    out = []
    for g in groups:
        idx = torch.tensor(g)
        out.append(_take(merged, idx, max(1, int(enc[idx].max())), int(dec[idx].max()) if len(dec) else 0))
    return out
