"""Two-stage pipeline parallelism for the decoder (`train.parallel.mode: pp`), on
`torch.distributed.pipelining` with the GPipe schedule.

Each rank keeps its half of the blocks of the full model it built (the others become Identity, so
parameter names stay those of the full model and checkpoints merge across layouts); stage 0 also
keeps the embedding, stage 1 the final norm and the head. A step's rows are split into
`microbatches`; the loss of each is its summed token cross-entropy divided by the step's target
count, so the accumulated gradients equal one process's mean loss exactly (GPipe's own 1/n scaling
is off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.layers import vocab_logits
from lmforge.models.masks import AttnMask
from lmforge.models.positions import default_positions
from lmforge.train.parallel import Dist

IGNORE = -100


class DecoderStage(nn.Module):
    """Stage `index` of 2 of a decoder: embedding + first half, or second half + norm + head."""

    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        cfg = model.cfg
        self.cfg, self.first, self.last = cfg, index == 0, index == 1
        half = cfg.n_layers // 2
        self.keep = range(0, half) if self.first else range(half, cfg.n_layers)
        if self.first:
            self.embed_tokens = model.embed_tokens
            if cfg.position == "learned":
                self.embed_positions = model.embed_positions
        self.layers = nn.ModuleList(layer if i in self.keep else nn.Identity() for i, layer in enumerate(model.layers))
        if self.last:
            self.norm, self.lm_head = model.norm, model.lm_head
        self.rope = model.rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        positions = default_positions(T, x.device)
        if self.first:
            x = self.embed_tokens(x)
            if self.cfg.position == "learned":
                x = x + self.embed_positions(positions)
        rope = self.rope(positions) if self.cfg.position == "rope" else None
        mask = AttnMask(is_causal=True)
        for i in self.keep:
            x = self.layers[i](x, mask, rope)
        return vocab_logits(self.norm(x), self.lm_head.weight) if self.last else x


def check_pipelinable(model: nn.Module) -> None:
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "family", "") != "decoder":
        raise ConfigError("train.parallel.mode: pp is implemented for the decoder family")
    problems = []
    if cfg.tie_embeddings:
        problems.append("model.tie_embeddings=true (the embedding and the head live on different stages)")
    if cfg.position == "alibi" or cfg.sliding_window:
        problems.append("ALiBi or a sliding window (stages run the plain causal kernel)")
    if cfg.n_layers < 2:
        problems.append(f"model.n_layers={cfg.n_layers} (each stage needs a block)")
    if problems:
        raise ConfigError("train.parallel.mode: pp cannot run " + "; ".join(problems))


class PipelineRunner:
    """Runs one micro-batch group through both stages and backward; the last stage has the loss."""

    def __init__(self, model: nn.Module, d: Dist, microbatches: int):
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        check_pipelinable(model)
        self.d, self.microbatches = d, microbatches
        self.module = DecoderStage(model, d.rank).to(d.device)
        stage = PipelineStage(self.module, d.rank, 2, d.device)
        self.schedule = ScheduleGPipe(stage, microbatches, loss_fn=self._loss, scale_grads=False)
        self.count = 1.0

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE,
                               reduction="sum") / self.count

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, count: float) -> float:
        """Forward and backward of one batch (rows divisible by `microbatches`); returns the summed
        loss contribution (loss x count) on the last stage, 0 elsewhere."""
        if input_ids.shape[0] % self.microbatches:
            raise ConfigError(f"train.parallel.microbatches: {self.microbatches} must divide the micro-batch of "
                              f"{input_ids.shape[0]} rows (train.batch_size)")
        self.count = count
        if self.module.first:
            self.schedule.step(input_ids.to(self.d.device))
            return 0.0
        target = labels.masked_fill(loss_mask == 0, IGNORE).to(self.d.device)
        losses: list[torch.Tensor] = []
        self.schedule.step(target=target, losses=losses)
        return float(sum(loss.detach() for loss in losses)) * count
