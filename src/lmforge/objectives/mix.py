"""O7: several objectives in one run, each row drawn by weight.

A row's component comes from its own rng (stream 1, so the component's noise, from stream 0, is the
same as the component alone would give that sample). The loader delivers the longest component
window; each component reads the head of its rows up to its own window, and the components' Examples
are padded to common lengths and put back in row order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from lmforge.config import ObjectiveConfig, check
from lmforge.objectives.base import (
    OBJECTIVES,
    AttentionLayout,
    Batch,
    Example,
    ObjectiveContext,
    build_objective,
    row_rng,
)
from lmforge.objectives.span_corruption import seq_len_for


@dataclass
class MixComponent:
    weight: float
    objective: ObjectiveConfig


@dataclass
class MixConfig(ObjectiveConfig):
    """`components`: [{weight: 0.5, objective: {name: span_corruption, ...}}, ...]."""

    name: str = "mix"
    components: list[MixComponent] = field(default_factory=list)

    @property
    def families(self) -> tuple[str, ...]:  # type: ignore[override]
        """The model families every component can train."""
        if not self.components:
            return ()
        first, *rest = (c.objective.families for c in self.components)
        return tuple(f for f in first if all(f in other for other in rest))

    def validate(self, where: str) -> None:
        check(where, "components", len(self.components) > 0, "needs at least one component", self.components)
        for i, c in enumerate(self.components):
            check(where, f"components[{i}].weight", c.weight > 0, "must be > 0", c.weight)
            c.objective.validate(f"{where}.components[{i}].objective" if where else f"components[{i}].objective")
        trains = {c.objective.name: c.objective.families for c in self.components}
        check(where, "components", bool(self.families), "the components share no model family", trains)


@OBJECTIVES.register("mix", config=MixConfig)
class Mix:
    short_rows = False

    def __init__(self, cfg: MixConfig, ctx: ObjectiveContext):
        self.parts = [build_objective(c.objective, ctx) for c in cfg.components]
        weights = np.array([c.weight for c in cfg.components], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.seed = ctx.seed
        self.pad = ctx.special.require("pad", "mix")

    @property
    def skipped(self) -> int:
        return sum(getattr(p, "skipped", 0) for p in self.parts)

    def window(self, seq_len: int) -> int:
        return max(p.window(seq_len) for p in self.parts)

    def choose(self, sample_ids: np.ndarray) -> np.ndarray:
        """The component index of each row."""
        draws = np.array([row_rng(self.seed, int(s), stream=1).random() for s in sample_ids])
        return np.minimum(np.searchsorted(self.cumulative, draws, side="right"), len(self.parts) - 1)

    def __call__(self, batch: Batch) -> Example:
        seq_len = seq_len_for(self.window, batch.tokens.shape[1])
        picks = self.choose(batch.sample_ids)
        examples, rows = [], []
        for k, part in enumerate(self.parts):
            idx = np.flatnonzero(picks == k)
            if idx.size:
                width = part.window(seq_len)  # a component reads the head of the row
                rows_k = Batch(batch.tokens[idx, :width], batch.doc_ids[idx, :width], batch.sample_ids[idx])
                examples.append(part(rows_k))
                rows.append(idx)
        order = torch.from_numpy(np.argsort(np.concatenate(rows)))
        return select_rows(stack_examples(examples, self.pad), order)


# ---------------------------------------------------------------- collating Examples of different shapes

Default = Callable[[int, int], torch.Tensor]  # (rows, width) -> what a None field means


def _arange(rows: int, width: int) -> torch.Tensor:
    return torch.arange(width, dtype=torch.int64).expand(rows, width)


def _zeros(rows: int, width: int) -> torch.Tensor:
    return torch.zeros(rows, width, dtype=torch.int64)


def _ones(rows: int, width: int) -> torch.Tensor:
    return torch.ones(rows, width, dtype=torch.int64)


def _no_prefix(rows: int, width: int) -> torch.Tensor:
    return torch.zeros(rows, width, dtype=torch.bool)


def _pad_cat(
    values: list[Any], rows: list[int], widths: list[int], fill: Any, default: Default | None, marks_pad: bool = False
) -> torch.Tensor | None:
    """Concatenate [rows, width] tensors, each padded to the widest with `fill`; a None becomes
    default(rows, width). All None stays None, unless the field must mark padding (segment ids)
    and the widths differ."""
    if all(v is None for v in values) and not (marks_pad and len(set(widths)) > 1):
        return None
    if default is not None:
        values = [default(r, w) if v is None else v for v, r, w in zip(values, rows, widths, strict=True)]
    dtype, width = values[0].dtype, max(widths)
    out = torch.full((sum(rows), width), fill, dtype=dtype)
    start = 0
    for v in values:
        out[start : start + v.shape[0], : v.shape[1]] = v
        start += v.shape[0]
    return out


def _stack_layout(layouts: list[AttentionLayout], rows: list[int], widths: list[int]) -> AttentionLayout:
    return AttentionLayout(
        causal=layouts[0].causal,
        segment_ids=_pad_cat([lay.segment_ids for lay in layouts], rows, widths, 0, _ones, marks_pad=True),
        prefix=_pad_cat([lay.prefix for lay in layouts], rows, widths, False, _no_prefix),
    )


def stack_examples(examples: list[Example], pad_id: int) -> Example:
    """The rows of several Examples as one, padded to common lengths (pad id in token fields, 0 in
    segment ids, masks and positions), so padding is loss-free and attended by nothing."""
    if len(examples) == 1:
        return examples[0]
    first = examples[0]
    for e in examples[1:]:
        if (e.layout.causal, e.decoder_input_ids is None, e.nsp_labels is None) != (
            first.layout.causal, first.decoder_input_ids is None, first.nsp_labels is None
        ):
            raise ValueError("cannot stack examples of different kinds (causal/bidirectional, decoder, NSP)")
    rows = [e.input_ids.shape[0] for e in examples]
    enc = [e.input_ids.shape[1] for e in examples]
    lab = [e.labels.shape[1] for e in examples]

    def stack(name: str, widths: list[int], fill: Any, default: Default | None = None) -> Any:
        return _pad_cat([getattr(e, name) for e in examples], rows, widths, fill, default)

    out = Example(
        input_ids=stack("input_ids", enc, pad_id),
        labels=stack("labels", lab, pad_id),
        loss_mask=stack("loss_mask", lab, 0),
        layout=_stack_layout([e.layout for e in examples], rows, enc),
        position_ids=stack("position_ids", enc, 0, _arange),
        token_type_ids=stack("token_type_ids", enc, 0, _zeros),
        nsp_labels=None if first.nsp_labels is None else torch.cat([e.nsp_labels for e in examples]),
        predict_positions=None if first.predict_positions is None else stack("predict_positions", enc, False),
    )
    if first.decoder_input_ids is not None:
        dec = [e.decoder_input_ids.shape[1] for e in examples]
        out.decoder_input_ids = stack("decoder_input_ids", dec, pad_id)
        out.decoder_layout = _stack_layout([e.decoder_layout for e in examples], rows, dec)
        out.decoder_position_ids = stack("decoder_position_ids", dec, 0, _arange)
    return out


def select_rows(ex: Example, index: torch.Tensor) -> Example:
    """`ex` with its rows reordered (or selected) by `index`."""

    def take(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v[index]
        if isinstance(v, AttentionLayout):
            return replace(v, segment_ids=take(v.segment_ids), prefix=take(v.prefix))
        return v

    return replace(ex, **{f.name: take(getattr(ex, f.name)) for f in fields(ex)})
