"""The training loop: micro-batches -> objective -> loss -> clipped optimizer step -> checkpoints.

Everything that decides the next step (weights, optimizer moments, loader position, RNG, step)
is in the checkpoint, and per-step randomness is derived from (seed, step), so a resumed run
continues the same loss curve as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import RunConfig, to_dict
from lmforge.objectives.base import Example, Objective, loss_sums
from lmforge.tokens.loader import Batch
from lmforge.train.checkpoint import find_latest, load_checkpoint, save_checkpoint
from lmforge.train.metrics import MetricsLog
from lmforge.train.optim import build_optimizer
from lmforge.train.schedules import build_schedule


class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    final_step: int
    tokens_seen: int
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> mean loss, this process only
    resumed_from: int = 0


class NonFiniteLoss(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        loader: BatchSource,
        objective: Objective,
        ckpt_dir: Path,
        metrics_path: Path,
        progress: bool = True,
    ):
        self.cfg, self.tc = cfg, cfg.train
        self.device = resolve_device(self.tc.device)
        if getattr(cfg.model, "attention", "sdpa") == "flex" and self.device.type != "cuda":
            # torch's FlexAttention has no CPU backward; the dense path computes the same attention.
            raise RuntimeError("model.attention=flex trains on CUDA only (torch has no FlexAttention "
                               "backward on CPU); use model.attention=sdpa here")
        self.model = model.to(self.device)
        self.loader = loader
        self.objective = objective
        self.ckpt_dir = Path(ckpt_dir)
        self.metrics = MetricsLog(metrics_path)
        self.progress = progress
        self.optimizer = build_optimizer(self.model, self.tc.optimizer)
        self.schedule = build_schedule(self.tc.schedule, self.tc.max_steps)
        self.step = 0
        self.tokens_seen = 0
        # Rows trained on, the schedule's clock: rows / (batch_size x grad_accum) full steps, so a step
        # of a batch ramp (fewer rows) advances the schedule by its share of tokens, not by one step.
        self.rows_seen = 0
        self.pad_tokens = 0  # input positions that are padding (segment 0): 1 - pad/seen is the utilisation

    # ------------------------------------------------------------------ state

    def maybe_resume(self) -> int:
        latest = find_latest(self.ckpt_dir) if self.tc.resume else None
        if latest is None:
            return 0
        state = load_checkpoint(latest, self.model, self.optimizer)
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen, self.rows_seen = state["step"], state["tokens_seen"], state["rows_seen"]
        self.pad_tokens = state.get("pad_tokens", 0)
        self.metrics.truncate_after(self.step)
        return self.step

    def save(self) -> Path:
        state = {
            "tokens_seen": self.tokens_seen,
            "rows_seen": self.rows_seen,
            "pad_tokens": self.pad_tokens,
            "loader": self.loader.state_dict(),
            "config": to_dict(self.cfg),
        }
        return save_checkpoint(
            self.ckpt_dir, self.step, self.model, self.optimizer, state, keep=self.tc.keep_checkpoints
        )

    # ------------------------------------------------------------------ loop

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to train.max_steps (or stop after `stop_after` steps, to simulate an interruption)."""
        resumed = self.maybe_resume()
        result = TrainResult(self.step, self.tokens_seen, resumed_from=resumed)
        if self.step == 0:
            self.metrics.truncate_after(0)
        bar = tqdm(
            total=self.tc.max_steps, initial=self.step, desc="train", unit="step",
            disable=not self.progress, dynamic_ncols=True,
        )
        t_last, tokens_last = time.perf_counter(), self.tokens_seen
        self.model.train()
        while self.step < self.tc.max_steps:
            record = self.train_step()
            result.losses[self.step] = record["loss"]
            if self.step % self.tc.log_every == 0 or self.step == self.tc.max_steps:
                now = time.perf_counter()
                record["tokens_per_s"] = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, self.tokens_seen
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            self.metrics.write(record)
            bar.update(1)
            if self.step % self.tc.checkpoint_every == 0 or self.step == self.tc.max_steps:
                self.save()
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        result.final_step, result.tokens_seen = self.step, self.tokens_seen
        return result

    def train_step(self) -> dict[str, Any]:
        factor = self.schedule(self.rows_seen / (self.tc.batch_size * self.tc.grad_accum))
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        lr = self.tc.optimizer.lr * factor
        examples = [self._example() for _ in range(self.micro_batches())]
        # Normalise each loss term by the step's total target count, not per micro-batch: objectives
        # with variable loss masks (prefix LM, MLM, span corruption) would otherwise weigh tokens
        # unequally. Terms (MLM and NSP) are added after each is averaged, as BERT does.
        counts: dict[str, float] = {}
        for ex in examples:
            for term, n in ex.target_counts().items():
                counts[term] = counts.get(term, 0.0) + n
        totals = dict.fromkeys(counts, 0.0)
        for ex in examples:
            with self._autocast():
                output = self.model(**ex.model_inputs())
            sums = loss_sums(output, ex)
            sum(s / max(counts[t], 1.0) for t, s in sums.items()).backward()
            for t, s in sums.items():
                totals[t] += s.item()
            self.tokens_seen += int(ex.input_ids.numel())
            self.rows_seen += int(ex.input_ids.shape[0])
            if ex.layout.segment_ids is not None:
                self.pad_tokens += int((ex.layout.segment_ids == 0).sum())
        terms = {t: totals[t] / max(counts[t], 1.0) for t in totals}
        loss_value = sum(terms.values())
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(
                f"loss is {loss_value} at step {self.step + 1}; last good checkpoint is in {self.ckpt_dir}"
            )
        grad_norm = (
            float(nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip))
            if self.tc.grad_clip > 0
            else float("nan")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen}
        if len(terms) > 1:
            record.update({f"loss_{t}": v for t, v in terms.items()})
        skipped = getattr(self.objective, "skipped", 0)
        if skipped:  # pieces too short for the objective: counted, never a crash
            record["skipped"] = skipped
        return record

    def micro_batches(self) -> int:
        """Micro-batches in this step: grad_accum, or fewer while a batch ramp grows the batch
        linearly in tokens seen (counted in rows of train.seq_len, so resume recomputes it)."""
        ramp, full = self.tc.batch_ramp, self.tc.grad_accum
        if not ramp.start_tokens:
            return full
        micro_tokens = self.tc.batch_size * self.tc.seq_len
        seen = self.rows_seen * self.tc.seq_len
        if seen >= ramp.ramp_tokens:
            return full
        want = ramp.start_tokens + (full * micro_tokens - ramp.start_tokens) * seen / ramp.ramp_tokens
        return max(1, min(full, round(want / micro_tokens)))

    def _example(self) -> Example:
        # The objective keys its randomness by each row's global sample id: nothing to save for an
        # exact resume, and every rank count draws the same noise for the same sample.
        return self.objective(self.loader.next_batch()).to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.tc.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
