"""P6: `lmforge train --dry-run`: what a run will cost, before it starts.

Prints the parameter count, the batch and token budget, a memory estimate per process and a time
estimate from a short timed probe, and draws the learning-rate and batch-size curves; nothing is
trained, no checkpoint or config is written: the only outputs are `<out_dir>/dry_run/schedule.png`
and `report.json`. It needs no earlier stage: the vocabulary is `model.vocab_size`, else the trained
tokenizer's if `lmforge tokenizer` has run, else `tokenizer.vocab_size` (the size it will train to).

The memory estimate's formulas are in memory_estimate.py, the timed probe in probe.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from torch import nn

from lmforge.config import RunConfig
from lmforge.io_utils import atomic_write_json
from lmforge.plots import save_figure, subplots
from lmforge.train.memory_estimate import available_bytes, memory_estimate
from lmforge.train.metrics import device_peak_flops, flops_per_token
from lmforge.train.probe import probe_config, run_probe

GIB = 2**30
# A CPU probes the real model and micro-batch only up to this many FLOPs per micro-batch (about a second
# here): small models run below a CPU's matmul speed, so scaling a smaller probe would mislead most there.
CPU_FULL_PROBE_FLOPS = 1e11


# ---------------------------------------------------------------------------- the run's shape


def resolve_vocab(cfg: RunConfig) -> tuple[int, str]:
    """(vocabulary size, where it came from), as stage_train will see it, without needing any stage."""
    if cfg.model.vocab_size > 0:
        return cfg.model.vocab_size, "model.vocab_size"
    from lmforge.run_dir import RunPaths

    path = RunPaths(cfg.out).tokenizer
    if path.exists():
        from lmforge.tokenizer.train import load_tokenizer

        return load_tokenizer(path).get_vocab_size(), f"the trained tokenizer ({path})"
    return cfg.tokenizer.vocab_size, "tokenizer.vocab_size (no tokenizer trained yet: the size it trains to)"


@dataclass
class Plan:
    """Micro-batches per optimizer step over the run: the batch ramp's steps, then full ones."""

    rows: int  # rows per micro-batch
    seq_len: int
    full: int  # micro-batches of a full step (grad_accum)
    max_steps: int
    ramp: list[int] = field(default_factory=list)  # micro-batches of each step before the batch is full

    def rows_before(self, step: np.ndarray) -> np.ndarray:
        """Rows trained on before 0-based `step` (the schedule's clock)."""
        ramp_rows = np.concatenate([[0], np.cumsum(np.asarray(self.ramp, dtype=np.int64))]) * self.rows
        k = len(self.ramp)
        inside = ramp_rows[np.minimum(step, k)]
        return inside + np.maximum(step - k, 0) * self.full * self.rows

    def micro_at(self, step: np.ndarray) -> np.ndarray:
        ramp = np.asarray(self.ramp + [self.full], dtype=np.int64)
        return ramp[np.minimum(step, len(self.ramp))]

    @property
    def total_tokens(self) -> int:
        return int(self.rows_before(np.array([self.max_steps]))[0]) * self.seq_len

    @property
    def full_step_tokens(self) -> int:
        return self.full * self.rows * self.seq_len


def plan_batches(cfg: RunConfig) -> Plan:
    """Replays Trainer.micro_batches (the trainer's own code, on a stand-in holding its two inputs)
    through the ramp; after it every step is full, so the rest is arithmetic."""
    from lmforge.train.trainer import Trainer

    tc = cfg.train
    plan = Plan(tc.batch_size, tc.seq_len, tc.grad_accum, tc.max_steps)
    state = SimpleNamespace(tc=tc, rows_seen=0)
    while len(plan.ramp) < tc.max_steps:
        micro = Trainer.micro_batches(state)  # type: ignore[arg-type]
        if micro >= tc.grad_accum:
            break
        plan.ramp.append(micro)
        state.rows_seen += micro * tc.batch_size
    return plan


def lr_curve(cfg: RunConfig, plan: Plan, steps: np.ndarray) -> np.ndarray:
    """The peak-LR multiple train_step sets at each 0-based step, times train.optimizer.lr."""
    from lmforge.train.schedules import build_schedule

    schedule = build_schedule(cfg.train.schedule, cfg.train.max_steps)
    clock = plan.rows_before(steps) / (plan.rows * plan.full)
    return np.array([schedule(float(s)) for s in clock]) * cfg.train.optimizer.lr


# ---------------------------------------------------------------------------- the time estimate


def time_estimate(cfg: RunConfig, meta_model: nn.Module, plan: Plan, vocab: int, steps: int,
                  estimate: int) -> dict[str, Any]:
    """The probe, and seconds per full step and for the run from it; {'skipped': why} when it cannot run."""
    from lmforge.models import count_params
    from lmforge.train.trainer import resolve_device

    if steps <= 0:
        return {"skipped": "--probe-steps 0"}
    device = resolve_device(cfg.train.device)
    free = available_bytes(device)
    micro_flops = flops_per_token(meta_model, cfg.train.seq_len) * plan.rows * plan.seq_len
    if device.type == "cuda":
        full = estimate < 0.9 * free
    else:
        full = estimate < 0.5 * free and micro_flops <= CPU_FULL_PROBE_FLOPS
    if not full:
        from lmforge.models import build_model

        pcfg = probe_config(cfg, full, device)
        need = memory_estimate(pcfg, build_model(pcfg.model, init=False), vocab)["total"]
        if need > 0.8 * free:  # a shared machine: better no estimate than a swapped or killed process
            return {"skipped": f"the probe needs about {_gib(need)}, {_gib(free)} is free on {device}"}
    try:
        probe = run_probe(cfg, vocab, steps, full, device)
    except Exception as e:  # an OOM or an objective that needs the real tokenizer: report, do not fail
        return {"skipped": f"probe failed on {device}: {type(e).__name__}: {e}"}
    if full:
        step_s = probe["micro_s"] * plan.full + probe["optimizer_s"]
    else:  # FLOPs at the probe's rate; the optimizer (memory-bound) in proportion to parameters
        step_s = (flops_per_token(meta_model, cfg.train.seq_len) * plan.full_step_tokens / probe["flops_per_s"]
                  + probe["optimizer_s"] * count_params(meta_model) / probe["params"])
    peak, peak_source = device_peak_flops(device, cfg.train.precision)
    return {**probe, "device": str(device), "free_memory": free, "step_s": step_s,
            "total_s": step_s * plan.total_tokens / plan.full_step_tokens,
            "mfu": probe["flops_per_s"] / peak if peak else None, "peak_source": peak_source}


# ---------------------------------------------------------------------------- outputs


def plot_curves(cfg: RunConfig, plan: Plan, path: Path) -> Path:
    """LR and tokens per step against tokens seen; right: log-scaled tokens, for warmup and ramp."""

    n = plan.max_steps
    early = max(cfg.train.schedule.warmup_steps, len(plan.ramp), 1) * 3
    steps = np.unique(np.concatenate([np.linspace(0, n - 1, 1500), np.linspace(0, min(early, n - 1), 500)]))
    steps = steps.astype(np.int64)
    tokens = (plan.rows_before(steps + 1) * plan.seq_len) / 1e9
    lr, batch = lr_curve(cfg, plan, steps), plan.micro_at(steps) * plan.rows * plan.seq_len
    fig, axes = subplots(2, 2, sharex="col", figsize=(10, 5.5))
    for col, xscale in enumerate(("linear", "log")):
        axes[0, col].plot(tokens, lr, lw=1)
        axes[1, col].plot(tokens, batch, lw=1, color="tab:green")
        axes[1, col].set_xlabel("tokens seen (billions)" + (", log scale" if col else ""))
        for ax in axes[:, col]:
            ax.set_xscale(xscale)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("learning rate")
    axes[1, 0].set_ylabel("tokens per step")
    fig.suptitle(f"{cfg.out_dir}: {cfg.train.schedule.name} schedule, {n:,} steps")
    return save_figure(fig, path)


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.2f} s"


def _tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:,.2f}{unit}"
    return f"{n:,.0f}"


def format_report(cfg: RunConfig, r: dict[str, Any]) -> str:
    tc, plan, mem, t = cfg.train, r["plan"], r["memory"], r["time"]
    ramp = tc.batch_ramp
    lines = [
        f"lmforge dry run: {cfg.out_dir} (nothing trained; only {r['png']} and report.json written)",
        f"parameters   {r['params']:,} ({r['non_embedding_params']:,} non-embedding), model.arch {cfg.model.arch}",
        f"vocabulary   {r['vocab']:,} from {r['vocab_source']}",
        f"batch        {plan.full_step_tokens:,} tokens per step = {tc.batch_size} rows x {tc.seq_len} tokens x "
        f"{plan.full} micro-batches"
        + (f"; ramp from {ramp.start_tokens:,} over {_tokens(ramp.ramp_tokens)} tokens ({len(plan.ramp):,} steps)"
           if ramp.start_tokens else ""),
        f"budget       {tc.max_steps:,} steps, {r['total_tokens']:,} tokens ({_tokens(r['total_tokens'])}), "
        f"{r['total_tokens'] / max(r['params'], 1):.1f} tokens per parameter",
        f"schedule     {tc.schedule.name}, peak lr {tc.optimizer.lr:.2e} ({tc.optimizer.name}), warmup "
        f"{tc.schedule.warmup_steps:,} steps ({_tokens(tc.schedule.warmup_steps * plan.full_step_tokens)} tokens)",
        f"memory       per process, {tc.precision}, micro-batch {tc.batch_size} x {tc.seq_len}"
        + ("" if mem["exact_family"] else f" (approximate for {cfg.model.family} models: decoder formula)"),
        f"  weights          {_gib(mem['weights']):>13}   4 B x N (fp32 master weights)",
        f"  gradients        {_gib(mem['gradients']):>13}   4 B x N",
        *([f"  autocast copies  {_gib(mem['autocast_copies']):>13}   2 B x N (bf16 weights cached for the step)"]
          if mem["autocast_copies"] else []),
        f"  optimizer state  {_gib(mem['optimizer_state']):>13}   {mem['optimizer_formula']}",
        f"  activations      {_gib(mem['activations']['none']):>13}   {mem['formula']}",
        f"    selective AC   {_gib(mem['activations']['selective']):>13}   {mem['formula_selective']}",
        f"    full AC        {_gib(mem['activations']['full']):>13}   {mem['formula_full']}",
        f"  logits           {_gib(mem['logits']):>13}   {mem['formula_logits']}",
        f"  total            {_gib(mem['total']):>13}   with train.activation_checkpointing={mem['mode']} "
        f"(none {_gib(mem['totals']['none'])}, selective {_gib(mem['totals']['selective'])}, "
        f"full {_gib(mem['totals']['full'])})",
    ]
    lines += _time_lines(t)
    return "\n".join(lines)


def _time_lines(t: dict[str, Any]) -> list[str]:
    if "skipped" in t:
        return [f"time         not estimated: {t['skipped']}"]
    how = ("the real model and micro-batch" if t["full"]
           else f"{t['layers']} layer, {t['rows']} x {t['seq_len']} tokens, scaled by FLOPs")
    lines = [f"time         {_duration(t['step_s'])} per full step, {_duration(t['total_s'])} for the run on "
             f"{t['device']}",
             f"  probe          {t['micro_s'] * 1e3:,.1f} ms per micro-batch, {t['optimizer_s'] * 1e3:,.1f} ms per "
             f"optimizer step ({how}); "
             f"{t['flops_per_s'] / 1e12:,.3f} TFLOP/s model FLOPs"
             + (f", MFU {t['mfu']:.1%} of {t['peak_source']}" if t.get("mfu") else "")]
    if "peak_memory" in t:
        lines.append(f"  measured       peak {_gib(t['peak_memory'])} allocated in the probe ({_gib(t['free_memory'])} "
                     "free before it)")
    return lines


def dry_run(cfg: RunConfig, probe_steps: int = 3) -> dict[str, Any]:
    """The report of `lmforge train --dry-run` (its text under "text"); writes only <out_dir>/dry_run/."""
    from lmforge.models import build_model, count_params

    cfg = copy.deepcopy(cfg)
    vocab, vocab_source = resolve_vocab(cfg)
    cfg.model.vocab_size = vocab
    meta = build_model(cfg.model, init=False)  # on the meta device: shapes without memory
    plan = plan_batches(cfg)
    memory = memory_estimate(cfg, meta, vocab)
    out = cfg.out / "dry_run"
    report: dict[str, Any] = {
        "params": count_params(meta), "non_embedding_params": count_params(meta, non_embedding=True),
        "vocab": vocab, "vocab_source": vocab_source, "steps": cfg.train.max_steps,
        "tokens_per_step": plan.full_step_tokens, "ramp_steps": len(plan.ramp), "total_tokens": plan.total_tokens,
        "flops_per_token": flops_per_token(meta, cfg.train.seq_len), "memory": memory,
        "time": time_estimate(cfg, meta, plan, vocab, probe_steps, memory["total"]),
        "png": str(plot_curves(cfg, plan, out / "schedule.png")),
    }
    report["plan"] = plan
    report["text"] = format_report(cfg, report)
    atomic_write_json(out / "report.json", {k: v for k, v in report.items() if k not in ("plan", "text")})
    return report
