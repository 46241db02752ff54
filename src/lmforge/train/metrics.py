"""Metrics: one JSONL line per step, so plots and reports can be rebuilt after the run, and what the
trainer derives and shows from them (E8): tokens/s, MFU, time waiting for data, TensorBoard
scalars, a one-line progress bar (or plain lines when the output is not a terminal), and a loss/LR
plot at the end.

MFU (model FLOPs utilisation) is achieved model FLOP/s over the device's peak, with PaLM's count
(Chowdhery et al. 2022, appendix B) of model FLOPs per token, 6·N + 12·L·H·Q·T:
- 6·N: forward (2) and backward (4) FLOPs per matmul weight per token. N counts the weights of every
  nn.Linear, once each: a tied embedding counts once (as the output projection), while untied input
  tables and learned positions are lookups, not matmuls, and are left out.
- 12·L·H·Q·T: attention scores and their weighted sum (2·2·T·H·Q per token and layer forward, x3 with
  backward), H·Q the attention width and T the row length, over every position even where a causal
  mask skips half (PaLM's convention, also nanoGPT's).
Recomputation (activation checkpointing) is not counted: it is model, not hardware, FLOPs.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from lmforge.config import TrainConfig
from lmforge.io_utils import atomic_write_text
from lmforge.plots import save_figure, subplots


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled  # in a multi-process job only rank 0 writes
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the curve has no replayed duplicates."""
        if self.enabled and self.path.exists():
            kept = [r for r in self.read() if r.get("step", 0) <= step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All complete records; a line torn by a crash mid-append is skipped, not fatal."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


# ---------------------------------------------------------------------------- FLOPs and peaks


def matmul_params(model: nn.Module) -> int:
    """Weights of the model's nn.Linear layers, each counted once (tied weights are shared)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def attention_width(model: nn.Module) -> int:
    """Sum over attention modules (self and cross) of heads x head width: the L·H·Q of PaLM's count."""
    from lmforge.models.layers import Attention

    return sum(m.n_heads * m.head_dim for m in model.modules() if isinstance(m, Attention))


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward and backward): 6·N + 12·L·H·Q·T (module docstring)."""
    return 6.0 * matmul_params(model) + 12.0 * attention_width(model) * seq_len


# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets: (name pattern, label, bf16 tensor core,
# fp32 without tensor cores). TF32 tensor cores run at half the bf16 rate on all of these. Matched on
# torch.cuda.get_device_name(), first match wins, so specific names come before general ones.
PEAK_FLOPS: tuple[tuple[str, str, float, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756e12, 51e12),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835e12, 60e12),
    (r"\bH100\b", "H100 SXM", 989e12, 67e12),
    (r"\bGH200\b", "GH200", 989e12, 67e12),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835e12, 60e12),
    (r"\bH200\b", "H200 SXM", 989e12, 67e12),
    (r"\bA100\b", "A100", 312e12, 19.5e12),
    (r"\bL40S\b", "L40S", 362e12, 91.6e12),
    (r"\bL40\b", "L40", 181e12, 90.5e12),
    (r"\bL4\b", "L4", 121e12, 30.3e12),
    (r"\bA10\b", "A10", 125e12, 31.2e12),
    (r"\bRTX 4090\b", "RTX 4090", 165e12, 82.6e12),
)


def gpu_peak_flops(name: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, how it was found) of a CUDA device by name; None for a device not in the table."""
    for pattern, label, bf16, fp32 in PEAK_FLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            if precision in ("bf16", "fp16"):  # the tensor cores' 16-bit peak is the same for both
                return bf16, f"{label} {precision} peak {bf16 / 1e12:.0f} TFLOP/s"
            if torch.get_float32_matmul_precision() != "highest":  # fp32 matmuls run on TF32 cores
                return bf16 / 2, f"{label} TF32 peak {bf16 / 2e12:.0f} TFLOP/s"
            return fp32, f"{label} fp32 peak {fp32 / 1e12:.1f} TFLOP/s"
    return None, f"no peak known for {name!r} (add it to PEAK_FLOPS): MFU not computed"


@functools.cache
def cpu_matmul_peak(precision: str, n: int = 1024) -> float:
    """A CPU has no datasheet peak to hand, so measure one: the best of a few n x n matmuls (2n^3
    FLOPs each) at the run's precision, once per process, on the threads torch uses."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, packing buffers
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    if device.type == "cpu":
        peak, threads = cpu_matmul_peak(precision), torch.get_num_threads()
        return peak, f"CPU measured {precision} matmul peak {peak / 1e9:.0f} GFLOP/s ({threads} threads)"
    return None, f"no peak for device type {device.type!r}: MFU not computed"


# ---------------------------------------------------------------------------- pieces of the monitor

Fn = TypeVar("Fn", bound=Callable[..., Any])


class Stopwatch:
    """Seconds spent inside the callables it wraps, accumulated until `take()` reads and resets them."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Fn) -> Fn:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed  # type: ignore[return-value]

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def is_rank0() -> bool:
    """Only one process writes shared outputs (TensorBoard, plots, console) in a distributed run."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TensorBoardLog:
    """Scalars per step under `dir`; without the tensorboard package it warns once and does nothing."""

    def __init__(self, directory: Path, purge_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # training never fails for want of a viewer
            warnings.warn(f"TensorBoard logging off: {e}", stacklevel=2)
            self.writer = None
            return
        # purge_step: a resumed run drops the events a crashed run logged past its checkpoint.
        self.writer = SummaryWriter(str(directory), purge_step=purge_step or None)

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss_lr(records: list[dict[str, Any]], path: Path) -> Path:
    """Loss and learning rate against step, one panel each."""
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = subplots(2, 1, sharex=True, figsize=(7, 5), height_ratios=(2, 1))
    ax_loss.plot(steps, [r["loss"] for r in records], lw=0.8)
    ax_loss.set_ylabel("train loss (nats)")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in records], lw=0.8, color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    return save_figure(fig, path)


def console_mode(progress: bool) -> str:
    """'bar' where tqdm draws (its stream, stderr, is a terminal), 'lines' where it is a file or pipe
    (a bar's carriage returns would fill a log), 'off' without progress."""
    if not progress or not is_rank0():
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


# ---------------------------------------------------------------------------- the monitor


class TrainMonitor:
    """Everything `Trainer.fit` reports per step. Every step's record gains `step_s` and `data_s`
    (seconds in the loader, objective and copy to the device); every log_every-th step also gains
    `tokens_per_s` and `mfu` over the steps since the last, and goes to the console."""

    def __init__(self, model: nn.Module, tc: TrainConfig, device: torch.device, log: MetricsLog,
                 progress: bool, step: int, tokens: int):
        self.tc, self.log = tc, log
        self.flops_per_token = flops_per_token(model, tc.seq_len)
        self.peak, self.peak_source = device_peak_flops(device, tc.precision)
        self.data = Stopwatch()
        self.rank0 = is_rank0()
        out = log.path.parent
        self.tensorboard = TensorBoardLog(out / "tensorboard", purge_step=step + 1) if self.rank0 else None
        self.plot_path = out / "plots" / "loss_lr.png"
        self.mode = console_mode(progress)
        self.bar = (tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
                    if self.mode == "bar" else None)
        if self.mode == "lines":
            print(f"train: steps {step + 1}-{tc.max_steps}; MFU against {self.peak_source}", file=sys.stderr,
                  flush=True)
        self.t_step = self.t_last = time.perf_counter()
        self.tokens_last, self.data_since = tokens, 0.0

    def start_step(self) -> None:
        self.t_step = time.perf_counter()
        self.data.take()

    def end_step(self, record: dict[str, Any]) -> dict[str, Any]:
        """Adds the derived metrics to `record` and writes it everywhere."""
        now, step = time.perf_counter(), record["step"]
        record["step_s"], record["data_s"] = now - self.t_step, self.data.take()
        self.data_since += record["data_s"]
        if record["tokens"] < self.tokens_last:  # a rollback to an earlier checkpoint: the interval restarts
            self.t_last, self.tokens_last, self.data_since = now, record["tokens"], 0.0
        elif step % self.tc.log_every == 0 or step == self.tc.max_steps:
            self._rates(record, now)
        self.log.write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if self.bar is not None:
            self.bar.update(1)
        return record

    def extra(self, record: dict[str, Any], evaluate: Callable[[nn.Module], dict[str, float]],
              model: nn.Module) -> None:
        """Periodic evaluation after step `record["step"]`: its own line in the logs, with the step
        and tokens; its time is left out of the next tokens/s."""
        start = time.perf_counter()
        values = evaluate(model)
        seconds = time.perf_counter() - start
        self.t_last += seconds
        out = {"step": record["step"], "tokens": record["tokens"], **values, "eval_s": seconds}
        self.log.write(out)
        if self.tensorboard is not None:
            self.tensorboard.write(out)
        if self.mode == "lines":
            print(f"step {out['step']}  " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()),
                  file=sys.stderr, flush=True)

    def _rates(self, record: dict[str, Any], now: float) -> None:
        elapsed = max(now - self.t_last, 1e-9)
        tok_s = (record["tokens"] - self.tokens_last) / elapsed
        record["tokens_per_s"] = tok_s
        if self.peak:
            record["mfu"] = tok_s * self.flops_per_token / self.peak
        data_share = self.data_since / elapsed
        self.t_last, self.tokens_last, self.data_since = now, record["tokens"], 0.0
        mfu = f"{record['mfu']:.1%}" if "mfu" in record else "n/a"
        if self.bar is not None:  # short: tqdm trims a line wider than the terminal, never wraps it
            self.bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.1e} {tok_s:,.0f} tok/s mfu {mfu}")
        elif self.mode == "lines":
            print(f"step {record['step']}/{self.tc.max_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                  f"grad_norm {record['grad_norm']:.3f}  {tok_s:,.0f} tok/s  mfu {mfu}  data {data_share:.0%}",
                  file=sys.stderr, flush=True)

    def close(self, finished: bool) -> Path | None:
        """Closes the outputs; after a run that ended normally, plots its whole curve (earlier runs of
        a resumed one included). A plot that fails only warns: the checkpoints are already written."""
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if not (finished and self.rank0):
            return None
        records = [r for r in self.log.read() if "loss" in r and "lr" in r]
        try:
            return plot_loss_lr(records, self.plot_path) if records else None
        except Exception as e:
            warnings.warn(f"loss/LR plot not written: {e}", stacklevel=2)
            return None
