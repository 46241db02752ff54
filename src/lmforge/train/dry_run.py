"""P6: `lmforge train --dry-run`: what a run will cost, before it starts.

Prints the parameter count, the batch and token budget, a memory estimate per process and a time
estimate from a short timed probe, and draws the learning-rate and batch-size curves; nothing is
trained, no checkpoint or config is written: the only outputs are `<out_dir>/dry_run/schedule.png`
and `report.json`. It needs no earlier stage: the vocabulary is `model.vocab_size`, else the trained
tokenizer's if `lmforge tokenizer` has run, else `tokenizer.vocab_size` (the size it will train to).

Memory, per process (one device, no sharding), in bytes, with N parameters, L layers, micro-batch b
rows of s tokens, width h, key/value width h_kv, MLP width f, vocabulary V, activation bytes p (2 for
bf16 autocast, 4 for fp32) and r = 4 (the residual stream stays fp32 under autocast, as do norms):
- weights 4N and gradients 4N (fp32 master weights), plus under bf16 autocast 2N for the bf16 weight
  copies autocast caches for the step;
- optimizer state: AdamW/Adam 8N (two fp32 moments); SGD 4N (momentum; 0 without); Adafactor
  4(r + c) per r x c matrix (factored second moment, no first moment) and 4n per vector; Muon 4N
  on hidden matrices (momentum) plus AdamW's 8N on the rest;
- activations kept for backward, per layer: s·b·(4r·h + p·(c·h + 2h + 2h_kv + 4f)): each RMSNorm's
  input and normalised value (fp32), the matmul inputs (c copies of the normed input: c = 5 under
  bf16 autocast, which casts it once for each of q, k, v, gate and up; c = 2 in fp32, one per block),
  q and the attention output (h each), k and v (h_kv each; fused attention keeps no s x s scores),
  and SwiGLU's gate, up, silu(gate) and product (f each). This is Korthikanti et al. 2022's count
  (eq. 1, s·b·h·(34 + 5a·s/h) bytes for GPT at 16 bits) redone for this block (no dropout masks, no
  score term, a gated MLP, an fp32 residual stream), checked against the tensors autograd saves
  (tests/test_dry_run.py);
- with activation checkpointing (train.activation_checkpointing, lmforge.train.memory): `full`
  keeps L·s·b·r·h, the layer inputs (Korthikanti's 2sbhL, at fp32); `selective` keeps the inputs and
  the matmul and attention outputs, L·s·b·(r·h + p·(4h + 2h_kv + 2f)) (q, k, v, attention, o, gate,
  up, down); both plus one layer's activations, rebuilt during its backward;
- logits: s·b·V·(p + 4 + 8): the logits, their fp32 log-softmax, and two fp32 gradients of that
  size at the start of backward (often the largest single term at large vocabularies).
Other families are estimated with the decoder's formula and their own widths (labelled approximate).

The probe runs Trainer.train_step itself (objective, autocast, clipping, the optimizer) on random
tokens for a few steps after a warm-up. When the estimate fits the free memory (and, on a CPU, the
micro-batch is small: CPU_FULL_PROBE_FLOPS), it runs the real model on the real micro-batch and the
full step is grad_accum micro-batches; otherwise a one-layer copy of the model (on CPU on one row of
128 tokens) gives the FLOP/s it achieves, and the estimate scales the full step's FLOPs
(metrics.flops_per_token) by it: rough, and pessimistic where the probe's matmuls are smaller than
the real ones.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.config import BatchRampConfig, RunConfig
from lmforge.io_utils import atomic_write_json
from lmforge.plots import save_figure, subplots
from lmforge.tokens.loader import Batch
from lmforge.train.metrics import Stopwatch, device_peak_flops, flops_per_token

GIB = 2**30
PROBE_TOKENS_CPU = 128  # row length of the scaled CPU probe: seconds even for a 1B model's one layer
# A CPU probes the real model and micro-batch only up to this many FLOPs per micro-batch (about a second
# here): small models run below a CPU's matmul speed, so scaling a smaller probe would mislead most there.
CPU_FULL_PROBE_FLOPS = 1e11


# ---------------------------------------------------------------------------- the run's shape


def resolve_vocab(cfg: RunConfig) -> tuple[int, str]:
    """(vocabulary size, where it came from), as stage_train will see it, without needing any stage."""
    if cfg.model.vocab_size > 0:
        return cfg.model.vocab_size, "model.vocab_size"
    from lmforge.stages import RunPaths

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


# ---------------------------------------------------------------------------- memory


def optimizer_state_bytes(model: nn.Module, opt: Any) -> tuple[int, str]:
    """(bytes of fp32 optimizer state, the formula), for the optimizers lmforge registers."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    name = opt.name
    if name in ("adamw", "adam"):
        return 8 * n, f"{name}: two fp32 moments, 8 B x N"
    if name == "sgd":
        return (4 * n, "sgd: fp32 momentum, 4 B x N") if opt.momentum > 0 else (0, "sgd without momentum: none")
    if name == "adafactor":
        total = sum(4 * (math.prod(p.shape[:-2]) * (p.shape[-2] + p.shape[-1]) if p.dim() >= 2 else p.numel())
                    for p in params)
        return total, "adafactor: factored second moment, 4 B x (rows + cols) per matrix, 4 B x n per vector"
    if name == "muon":
        from lmforge.train.optim import _muon_split

        hidden, rest = _muon_split(model)
        n_hidden, n_rest = sum(p.numel() for p in hidden), sum(p.numel() for p in rest)
        return 4 * n_hidden + 8 * n_rest, (f"muon: momentum 4 B x {n_hidden:,} hidden-matrix params + "
                                           f"AdamW moments 8 B x {n_rest:,} others")
    return 8 * n, f"{name}: not modelled, assumed AdamW's 8 B x N"


def _widths(model_cfg: Any) -> tuple[int, int, int, int, bool]:
    """(layers, h, h_kv, f, exact): the decoder's own widths, or the nearest for other families."""
    h = model_cfg.d_model
    heads = model_cfg.n_heads
    kv = getattr(model_cfg, "n_kv_heads", 0) or heads
    layers = model_cfg.n_layers
    if model_cfg.family == "encoder_decoder":
        layers += getattr(model_cfg, "n_decoder_layers", 0) or model_cfg.n_layers
    d_ff = getattr(model_cfg, "d_ff", 0) or 4 * h
    f = model_cfg.resolved_d_ff() if hasattr(model_cfg, "resolved_d_ff") else d_ff
    return layers, h, h * kv // heads, f, model_cfg.family == "decoder"


def memory_estimate(cfg: RunConfig, model: nn.Module, vocab: int) -> dict[str, Any]:
    """Bytes per process (module docstring for every formula)."""
    n = sum(p.numel() for p in model.parameters())
    s, b = cfg.train.seq_len, cfg.train.batch_size
    p = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    r = 4
    layers, h, h_kv, f, exact = _widths(cfg.model)
    c = 5 if p == 2 else 2
    per_layer = s * b * (4 * r * h + p * (c * h + 2 * h + 2 * h_kv + 4 * f))
    logits = s * b * vocab * (p + 4 + 8)
    opt_bytes, opt_formula = optimizer_state_bytes(model, cfg.train.optimizer)
    copies = 2 * n if p == 2 else 0
    states = 4 * n + 4 * n + copies + opt_bytes
    activations = {  # by train.activation_checkpointing; the recomputed layer's activations come back in backward
        "none": layers * per_layer,
        "selective": layers * s * b * (r * h + p * (4 * h + 2 * h_kv + 2 * f)) + per_layer,
        "full": layers * s * b * r * h + per_layer,
    }
    mode = cfg.train.activation_checkpointing
    return {
        "weights": 4 * n, "gradients": 4 * n, "autocast_copies": copies,
        "optimizer_state": opt_bytes, "optimizer_formula": opt_formula, "activations": activations,
        "logits": logits, "per_layer": per_layer, "mode": mode, "total": states + activations[mode] + logits,
        "totals": {m: states + a + logits for m, a in activations.items()}, "exact_family": exact,
        "formula": (f"L x s·b·(4r·h + p·(c·h + 2h + 2h_kv + 4f)) = {layers} x {s}·{b}·(4·{r}·{h} + {p}·({c}·{h} + "
                    f"2·{h} + 2·{h_kv} + 4·{f}))"),
        "formula_selective": (f"L·s·b·(r·h + p·(4h + 2h_kv + 2f)) + one layer = {layers}·{s}·{b}·({r}·{h} + "
                              f"{p}·(4·{h} + 2·{h_kv} + 2·{f})) + {per_layer:,}"),
        "formula_full": f"L·s·b·r·h + one layer = {layers}·{s}·{b}·{r}·{h} + {per_layer:,}",
        "formula_logits": f"s·b·V·(p + 4 + 8) = {s}·{b}·{vocab}·({p} + 12)",
    }


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be allocated without swapping, page cache included
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------- the timed probe


class RandomTokens:
    """A loader of uniform random tokens, avoiding the special ids at both ends of lmforge's vocabularies."""

    def __init__(self, window: int, rows: int, vocab: int, seed: int):
        self.window, self.rows, self.drawn = window, rows, 0
        self.low, self.high = (13, vocab - 100) if vocab > 400 else (0, vocab)
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> Batch:
        tokens = self.rng.integers(self.low, self.high, size=(self.rows, self.window), dtype=np.int64)
        ids = np.arange(self.drawn, self.drawn + self.rows, dtype=np.int64)
        self.drawn += self.rows
        return Batch(tokens, np.zeros_like(tokens), ids, np.zeros(self.rows, dtype=np.int64))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def default_special_tokens(vocab: int) -> Any:
    """The roles at the ids an lmforge-trained tokenizer gives them: 13 at the bottom, 100 sentinels
    at the top (special_tokens.py), so objectives that need roles run without a tokenizer."""
    from lmforge.tokenizer.special_tokens import N_SENTINELS, SPECIAL_TOKENS, SpecialTokens

    roles = ["eos", "pad", "bos", "mask", "cls", "sep", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad",
             "nlu", "nlg", "s2s"]
    assert len(roles) == len(SPECIAL_TOKENS)
    sentinels = tuple(vocab - 1 - i for i in range(N_SENTINELS)) if vocab > 400 else ()
    return SpecialTokens(**dict(zip(roles, range(len(roles)), strict=True)), sentinels=sentinels)


def probe_config(cfg: RunConfig, full: bool, device: torch.device) -> RunConfig:
    """One micro-batch per step, no ramp; not full: one layer and, on CPU, one short row."""
    pcfg = copy.deepcopy(cfg)
    tc = pcfg.train
    tc.grad_accum, tc.batch_tokens, tc.batch_ramp = 1, 0, BatchRampConfig()
    if not full:
        pcfg.model.n_layers = 1
        if getattr(pcfg.model, "n_decoder_layers", 0):
            pcfg.model.n_decoder_layers = 1  # type: ignore[attr-defined]
        if device.type != "cuda":
            tc.batch_size, tc.seq_len = 1, min(tc.seq_len, PROBE_TOKENS_CPU)
    return pcfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_probe(cfg: RunConfig, vocab: int, steps: int, full: bool, device: torch.device) -> dict[str, Any]:
    """Seconds per micro-batch step and model FLOP/s of Trainer.train_step on random tokens."""
    from lmforge.models import build_model, count_params
    from lmforge.objectives import ObjectiveContext, build_objective
    from lmforge.train import memory
    from lmforge.train.trainer import Trainer

    pcfg = probe_config(cfg, full, device)
    pcfg.model.vocab_size = vocab
    torch.manual_seed(cfg.seed)
    model = build_model(pcfg.model, device=device)
    # As stage_train prepares it (lmforge.train.parallel: checkpointing, then compile), so the probe's
    # time has the recomputation and the fusion in it.
    model = memory.checkpoint_activations(model, pcfg.train.activation_checkpointing)
    if pcfg.train.compile:
        memory.compile_blocks(model)
    objective = build_objective(pcfg.objective, ObjectiveContext(default_special_tokens(vocab), vocab, cfg.seed))
    loader = RandomTokens(objective.window(pcfg.train.seq_len), pcfg.train.batch_size, vocab, cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:  # Trainer wants paths; nothing is saved
        trainer = Trainer(pcfg, model, loader, objective, Path(tmp) / "ckpt", Path(tmp) / "m.jsonl", progress=False)
        # The optimizer step is timed apart: a full step has grad_accum micro-batches but one of it,
        # and its cost grows with parameters, not tokens.
        opt_s = _time_optimizer(trainer, device)
        trainer.model.train()
        trainer.train_step()  # warm-up: allocations, kernels, thread pools
        _sync(device)
        opt_s.take()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        _sync(device)
        seconds, optimizer_s = (time.perf_counter() - t0) / steps, opt_s.take() / steps
    micro_s = seconds - optimizer_s
    tokens = pcfg.train.batch_size * pcfg.train.seq_len
    out = {"full": full, "micro_s": micro_s, "optimizer_s": optimizer_s, "params": count_params(model),
           "layers": pcfg.model.n_layers, "rows": pcfg.train.batch_size, "seq_len": pcfg.train.seq_len,
           "flops_per_s": flops_per_token(model, pcfg.train.seq_len) * tokens / micro_s}
    if device.type == "cuda":
        out["peak_memory"] = torch.cuda.max_memory_allocated(device)
    return out


def _time_optimizer(trainer: Any, device: torch.device) -> Stopwatch:
    """Wraps the trainer's optimizer.step in a stopwatch (synchronised: CUDA kernels run async)."""
    watch, step = Stopwatch(), trainer.optimizer.step

    def synced(*args: Any, **kwargs: Any) -> Any:
        _sync(device)
        out = step(*args, **kwargs)
        _sync(device)
        return out

    trainer.optimizer.step = watch.wrap(synced)
    return watch


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
