"""The training loop: micro-batches -> objective -> loss -> clipped optimizer step -> checkpoints.

Everything that decides the next step (weights, optimizer moments, loader position, RNG, step)
is in the checkpoint, and per-step randomness is derived from (seed, step), so a resumed run
continues the same loss curve as one that was never interrupted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lmforge.config import RunConfig, to_dict
from lmforge.objectives.base import Example, Objective, loss_sums, row_losses, token_losses, token_nll
from lmforge.objectives.bucketing import bucket_by_length
from lmforge.tokens.loader import Batch
from lmforge.train.checkpoint import (
    NonFiniteWeights,
    list_checkpoints,
    load_first,
    load_latest,
    save_checkpoint,
    step_dir_name,
    sweep_stale,
)
from lmforge.train.dist_checkpoint import save_distributed
from lmforge.train.metrics import MetricsLog, TrainMonitor
from lmforge.train.optim import build_optimizer
from lmforge.train.parallel import Dist, clip_grad_norm, no_sync
from lmforge.train.precision import Precision
from lmforge.train.schedules import build_schedule
from lmforge.train.stability import SpikeDetected, StabilityState, detect, id_ranges, injection, rollback_order

log = logging.getLogger(__name__)


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


class TrainingDiverged(NonFiniteLoss):
    """A spike that rollbacks could not get past (train.stability.max_rollbacks), or nothing to roll back to."""


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
        dist: Dist | None = None,
        pipeline: Any = None,
        evaluator: Callable[[nn.Module], dict[str, float]] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        precision: Precision | None = None,
    ):
        """`model` comes parallelised and initialised (stage_train: meta -> parallelize -> init);
        `optimizer` and `precision` are built over it outside too (None: from cfg.train here)."""
        self.cfg, self.tc = cfg, cfg.train
        # Validation metrics every eval.every steps (and at the last), logged beside the training loss.
        self.evaluator = evaluator
        # Built outside (train.parallel): the process's place in the job; `pipeline` runs pp stages.
        self.dist = dist or Dist(device=resolve_device(self.tc.device))
        self.pipeline = pipeline
        self.device = self.dist.device
        if getattr(cfg.model, "attention", "sdpa") == "flex" and self.device.type != "cuda":
            # torch's FlexAttention has no CPU backward; the dense path computes the same attention.
            raise RuntimeError("model.attention=flex trains on CUDA only (torch has no FlexAttention "
                               "backward on CPU); use model.attention=sdpa here")
        self.model = model.to(self.device)
        self.loader = loader
        self.objective = objective
        self.ckpt_dir = Path(ckpt_dir)
        self.metrics = MetricsLog(metrics_path, enabled=self.dist.is_main)  # rank 0 alone writes metrics
        self.progress = progress and self.dist.is_main
        self.optimizer = optimizer or build_optimizer(self.model, self.tc.optimizer)
        self.precision = precision or Precision(self.tc.precision, self.device)
        self.schedule = build_schedule(self.tc.schedule, self.tc.max_steps)
        # Under train.compile the loss is compiled too: the cast of the logits to fp32, the log-softmax
        # and the gather fuse into one pass over the [tokens, vocab] logits (a GPU profile of the 125M
        # recipe found the separate fp32 copy and log-softmax ~26% of a step).
        self._token_nll = torch.compile(token_nll) if self.tc.compile else token_nll
        self.step = 0
        self.tokens_seen = 0
        # Rows trained on, the schedule's clock: rows / (batch_size x grad_accum) full steps, so a step
        # of a batch ramp (fewer rows) advances the schedule by its share of tokens, not by one step.
        self.rows_seen = 0
        self.pad_tokens = 0  # input positions that are padding (segment 0): 1 - pad/seen is the utilisation
        self.stability = StabilityState(self.tc.stability.window)
        self.batches_drawn = 0  # loader batches drawn, skipped ones too: what a rollback must skip past

    # ------------------------------------------------------------------ state

    def maybe_resume(self) -> int:
        sweep_stale(self.ckpt_dir)  # what a save killed mid-write left; nothing of this process is in flight yet
        found = load_latest(self.ckpt_dir, self.model, self.optimizer) if self.tc.resume else None
        if found is None:
            return 0
        self._restore(found[1])
        self.metrics.truncate_after(self.step)
        return self.step

    def _restore(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen, self.rows_seen = state["step"], state["tokens_seen"], state["rows_seen"]
        self.pad_tokens = state.get("pad_tokens", 0)
        self.batches_drawn = state.get("batches_drawn", 0)
        self.stability.load_state_dict(state.get("stability", {}))
        self.precision.load_state_dict(state.get("loss_scaler", {}))

    def save(self) -> Path | None:
        self.stability.saved(self.step)
        state = {
            "tokens_seen": self.tokens_seen,
            "rows_seen": self.rows_seen,
            "pad_tokens": self.pad_tokens,
            "batches_drawn": self.batches_drawn,
            "stability": self.stability.state_dict(),
            "loss_scaler": self.precision.state_dict(),
            "loader": self.loader.state_dict(),
            "config": to_dict(self.cfg),
        }
        # Keep the checkpoints a later spike may roll back to (at least rewind_steps before it).
        protect = self.step + 1 - self.tc.stability.rewind_steps if self.tc.stability.enabled else None
        try:
            if self.distributed_checkpoints:
                return save_distributed(self.ckpt_dir, self.step, self.model, self.optimizer, state, self.dist,
                                        keep=self.tc.keep_checkpoints, keep_every=self.tc.keep_every, protect=protect)
            return save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, state,
                                   keep=self.tc.keep_checkpoints, keep_every=self.tc.keep_every, protect=protect)
        except NonFiniteWeights as e:
            if not self.tc.stability.enabled or self.step >= self.tc.max_steps:
                raise
            # Finite loss and gradients, yet the update overflowed: the next step's loss is NaN and rolls back.
            log.warning("%s; the next step will roll back", e)
            return None

    @property
    def distributed_checkpoints(self) -> bool:
        """DCP (any world size and layout reads it) for multi-process jobs or when asked for."""
        fmt = self.tc.parallel.checkpoint_format
        return fmt == "dcp" or (fmt == "auto" and self.dist.world > 1)

    # ------------------------------------------------------------------ loop

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to train.max_steps (or stop after `stop_after` steps, to simulate an interruption)."""
        resumed = self.maybe_resume()
        result = TrainResult(self.step, self.tokens_seen, resumed_from=resumed)
        if self.step == 0:
            self.metrics.truncate_after(0)
        monitor = TrainMonitor(self.model, self.tc, self.device, self.metrics, self.progress, self.step,
                               self.tokens_seen)
        # Time spent getting data (loader, objective, copy to the device), measured around the one
        # method train_step gets it through, so train_step itself stays as it is.
        self._example = monitor.data.wrap(Trainer._example.__get__(self))  # type: ignore[method-assign]
        self.model.train()
        finished = False
        try:
            while self.step < self.tc.max_steps:
                monitor.start_step()
                try:
                    record = monitor.end_step(self.train_step())
                except SpikeDetected as spike:
                    self.rollback(spike)  # to a checkpoint before the spike, past its batches
                    result.losses = {s: v for s, v in result.losses.items() if s <= self.step}
                    continue
                result.losses[self.step] = record["loss"]
                if self.evaluator is not None and (self.step % self.cfg.eval.every == 0
                                                   or self.step == self.tc.max_steps):
                    monitor.extra(record, self.evaluator, self.model)
                if self.step % self.tc.checkpoint_every == 0 or self.step == self.tc.max_steps:
                    self.save()
                if stop_after is not None and self.step >= stop_after:
                    break
            finished = True
        finally:
            del self._example
            monitor.close(finished)
        result.final_step, result.tokens_seen = self.step, self.tokens_seen
        return result

    def train_step(self) -> dict[str, Any]:
        factor = self.schedule(self.rows_seen / (self.tc.batch_size * self.tc.grad_accum))
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        lr = self.tc.optimizer.lr * factor
        examples = [self._example() for _ in range(self.micro_batches())]
        if self.cfg.tokens.length_buckets:
            examples = bucket_by_length(examples)
        scale = self._fault_scale()  # 1.0 but at train.fault_injection's steps (exact: x * 1.0 == x)
        counts = self._global(self._counts(examples))
        dp = self.dist.data_world  # DDP/FSDP average gradients over ranks: scale so they sum instead
        # Kept on the device and read once per step: an .item() per micro-batch would sync each time.
        totals = {t: torch.zeros((), dtype=torch.float32, device=self.device) for t in counts}
        totals["_pad"] = torch.zeros((), dtype=torch.float32, device=self.device)
        sources = list(getattr(self.loader, "names", []))  # per-source loss when the mixture has several
        by_source = torch.zeros(2, len(sources), device=self.device)  # summed nats, targets
        for i, ex in enumerate(examples):
            with no_sync(self.model, last=i == len(examples) - 1):
                if self.pipeline is not None:
                    totals["lm"] += self.pipeline.step(ex.input_ids, ex.labels, ex.loss_mask, counts["lm"]) * scale
                else:
                    with self.precision.autocast():
                        output = self.model(**ex.model_inputs())
                    losses = token_losses(output, ex, self._token_nll)
                    sums = loss_sums(output, ex, losses)
                    self.precision.backward(sum(s / max(counts[t], 1.0) for t, s in sums.items()) * scale * dp)
                    for t, s in sums.items():
                        totals[t] = totals[t] + s.detach() * scale
                    if len(sources) > 1 and ex.source_ids is not None:
                        by_source.index_add_(1, ex.source_ids, torch.stack(row_losses(output, ex, losses)))
            self.tokens_seen += int(ex.input_ids.numel()) * dp
            self.rows_seen += int(ex.input_ids.shape[0])
            if ex.layout.segment_ids is not None:
                totals["_pad"] = totals["_pad"] + (ex.layout.segment_ids == 0).sum()
        # Every rank takes the same decisions from the same numbers: summed over the ranks that hold
        # different rows (dp) or different stages (pp, where only the last one has the loss).
        keys = sorted(totals) + [f"_src{j}" for j in range(len(sources))] + [f"_cnt{j}" for j in range(len(sources))]
        values = torch.cat([torch.stack([totals[t] for t in sorted(totals)]), by_source.flatten()])
        local = dict(zip(keys, values.tolist(), strict=True))  # the step's one read from the device
        reduced = self._global(local, every_rank=self.pipeline is not None)
        self.pad_tokens += int(reduced.pop("_pad"))
        source_loss = {f"loss/{name}": reduced[f"_src{j}"] / reduced[f"_cnt{j}"]
                       for j, name in enumerate(sources) if reduced.get(f"_cnt{j}", 0) > 0}
        terms = {t: reduced[t] / max(counts[t], 1.0) for t in counts}
        loss_value = sum(terms.values())
        # The norm before clipping, computed with clipping off too (max_norm=inf scales by exactly 1);
        # over every rank's shard (FSDP, TP) or stage (pp).
        self.precision.unscale(self.optimizer)
        grad_norm = clip_grad_norm([p for p in self.model.parameters() if p.grad is not None],
                                   self.tc.grad_clip or math.inf, self.dist if self.pipeline is not None else None)
        if self.precision.overflowed(grad_norm):  # fp16: the scaler skips this update and halves its scale
            log.info("step %d: fp16 gradients overflowed at loss scale %s; update skipped", self.step + 1,
                     self.precision.loss_scale)
        else:
            self._guard(loss_value, grad_norm)  # raises, and nothing steps, on NaN/Inf or a spike
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen}
        if self.precision.loss_scale is not None:
            record["loss_scale"] = self.precision.loss_scale
        if len(terms) > 1:
            record.update({f"loss_{t}": v for t, v in terms.items()})
        record.update(source_loss)
        skipped = getattr(self.objective, "skipped", 0)
        if skipped:  # pieces too short for the objective: counted, never a crash
            record["skipped"] = skipped
        return record

    @staticmethod
    def _counts(examples: list[Example]) -> dict[str, float]:
        """Targets per loss term in the step. Each term is normalised by its step total, not per
        micro-batch: objectives with variable loss masks (prefix LM, MLM, span corruption) would
        otherwise weigh tokens unequally; terms (MLM and NSP) are added after each is averaged."""
        counts: dict[str, float] = {}
        for ex in examples:
            for term, n in ex.target_counts().items():
                counts[term] = counts.get(term, 0.0) + n
        return counts

    def _global(self, values: dict[str, float], every_rank: bool = False) -> dict[str, float]:
        """`values` summed over the data-parallel ranks (or over every rank)."""
        if (self.dist.data_world if not every_rank else self.dist.world) == 1:
            return values
        keys = sorted(values)
        return dict(zip(keys, self.dist.all_reduce([values[k] for k in keys]), strict=True))

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

    # ------------------------------------------------------------------ stability (P4)

    def _guard(self, loss: float, grad_norm: float) -> None:
        """Judge the step before its update. `loss` and `grad_norm` must be the same on every rank
        (the all-reduced loss, the global norm) so that every rank takes the same decision."""
        st = self.tc.stability
        reason = detect(self.stability.history if st.enabled else (), loss, grad_norm, st)
        if reason is None:
            self.stability.history.append((loss, grad_norm))
            return
        self.optimizer.zero_grad(set_to_none=True)
        if not st.enabled:
            raise NonFiniteLoss(f"{reason} at step {self.step + 1}; last good checkpoint is in {self.ckpt_dir}")
        raise SpikeDetected(self.step + 1, reason, loss, grad_norm)

    def rollback(self, spike: SpikeDetected) -> None:
        """Restore the checkpoint `rollback_order` picks, skip the batches around the spike, save at
        once (so a resume neither replays the skipped batches nor refires an injection), and log it."""
        st, kept = self.tc.stability, self.stability.state_dict()
        if kept["pending"] >= st.max_rollbacks:
            raise TrainingDiverged(f"{spike}: gave up after {st.max_rollbacks} rollbacks without getting past a "
                                   f"spike (train.stability.max_rollbacks); checkpoints are in {self.ckpt_dir}")
        order = rollback_order([s for s, _ in list_checkpoints(self.ckpt_dir)], spike.step, st.rewind_steps)
        if not order:
            raise TrainingDiverged(f"{spike}, and there is no checkpoint before it to roll back to")
        drawn = self.batches_drawn
        path, state = load_first([self.ckpt_dir / step_dir_name(s) for s in order], self.model, self.optimizer)
        self._restore(state)
        self.stability.rolled_back(kept, spike.step)
        skipped = self._skip(max(st.skip_batches * self.micro_batches(), drawn - self.batches_drawn))
        log.warning("%s: rolled back to %s, skipped %d loader batches", spike, path.name, skipped["loader_batches"])
        self.save()  # first: from here on a resume starts past the skipped batches
        self.metrics.truncate_after(self.step)
        self.metrics.write({"step": self.step, "event": "rollback", "spike_step": spike.step, "reason": spike.reason,
                            "spike_loss": spike.loss, "spike_grad_norm": spike.grad_norm, "restored": path.name,
                            "rollbacks": self.stability.rollbacks, **{f"skipped_{k}": v for k, v in skipped.items()}})

    def _skip(self, n: int) -> dict[str, Any]:
        """Draw `n` loader batches without training on them; their sample and document ids as runs."""
        samples, docs = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
        for _ in range(n):
            batch = self.loader.next_batch()
            samples.append(np.asarray(batch.sample_ids).ravel())
            docs.append(np.unique(batch.doc_ids))
        self.batches_drawn += n
        return {"loader_batches": n, "sample_ids": id_ranges(np.concatenate(samples).tolist()),
                "doc_ids": id_ranges(np.concatenate(docs).tolist())}

    def _fault_scale(self) -> float:
        factor, name = injection(self.tc.fault_injection, self.step + 1, self.stability.fired)
        if name is not None:
            self.stability.fired.add(name)
            log.warning("fault injection %s: loss x %s", name, factor)
        return factor

    def _example(self) -> Example:
        self.batches_drawn += 1
        # The objective keys its randomness by each row's global sample id: nothing to save for an
        # exact resume, and every rank count draws the same noise for the same sample.
        batch = self.loader.next_batch()
        ex = self.objective(batch)
        if batch.source_ids is not None and len(batch.source_ids) == ex.input_ids.shape[0]:
            ex.source_ids = torch.as_tensor(batch.source_ids)  # rows keep their order through every objective
        return ex.to(self.device)
