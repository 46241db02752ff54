"""GPU throughput and MFU of lmforge's training step at ~125M and ~1B parameters, bf16.

The model of `recipes/gpt3-125m.yaml` and `recipes/llama-1b.yaml` (vocab 50,257 / 32,000), built by
lmforge, trained by lmforge's Trainer step as `train.compile=true` runs it (fused AdamW, bf16
autocast, SDPA's fused causal kernel, each block and the token loss compiled) on random tokens, so
only the model and the loop are measured.
MFU = tokens/s x FLOPs per token (6N + 12·L·H·Q·T, lmforge.train.metrics) / the device's bf16 peak.
Targets: >= 41% at 125M (llm.c's GPT-2 figure), >= 50% at 1B (nanochat's d24).

    python bench/gpu_mfu.py              # both sizes, ~5 minutes on an H100 including compilation
    python bench/gpu_mfu.py --sizes 125m --steps 20
    python bench/gpu_mfu.py --sizes 125m --rows 32 --profile   # where the step's GPU time goes
    python bench/gpu_mfu.py --sizes 125m --eager-loss          # blocks compiled, the loss not
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lmforge.models import build_model
from lmforge.objectives import ObjectiveContext, build_objective
from lmforge.recipe import load_config
from lmforge.tokenizer.special_tokens import SpecialTokens
from lmforge.tokens.loader import Batch
from lmforge.train.metrics import device_peak_flops, flops_per_token
from lmforge.train.parallel import Dist, parallelize
from lmforge.train.trainer import Trainer

SIZES = {"125m": ("recipes/gpt3-125m.yaml", 50257, 16), "1b": ("recipes/llama-1b.yaml", 32000, 8)}


class RandomTokens:
    """Uniform random rows: the loader's cost is not what is measured here."""

    def __init__(self, vocab: int, rows: int, window: int):
        self.rng, self.vocab, self.rows, self.window, self.drawn = np.random.default_rng(0), vocab, rows, window, 0

    def next_batch(self) -> Batch:
        tokens = self.rng.integers(1, self.vocab, (self.rows, self.window))
        ids = np.arange(self.drawn, self.drawn + self.rows)
        self.drawn += self.rows
        return Batch(tokens, np.zeros_like(tokens), ids)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]


def measure(size: str, steps: int, compile_blocks: bool, rows: int = 0, profile: bool = False,
            compile_loss: bool = True) -> dict:
    recipe, vocab, default_rows = SIZES[size]
    rows = rows or default_rows
    cfg = load_config(recipe, [f"model.vocab_size={vocab}", f"train.batch_size={rows}", "train.grad_accum=1",
                               "train.batch_tokens=0", "train.batch_ramp.start_tokens=0", "train.precision=bf16",
                               "train.device=cuda", f"train.max_steps={steps + 5}", "train.schedule.warmup_steps=0",
                               "out_dir=/tmp/lmforge_gpu_mfu",
                               f"train.compile={'true' if compile_blocks and compile_loss else 'false'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda()
    fpt = flops_per_token(model, cfg.train.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    model = parallelize(model, Dist(device=torch.device("cuda")), compile_blocks=compile_blocks)
    objective = build_objective(cfg.objective, ObjectiveContext(SpecialTokens(eos=0), vocab, cfg.seed))
    loader = RandomTokens(vocab, rows, objective.window(cfg.train.seq_len))
    trainer = Trainer(cfg, model, loader, objective, "/tmp/lmforge_gpu_mfu/ckpt", "/tmp/lmforge_gpu_mfu/m.jsonl",
                      progress=False, dist=Dist(device=torch.device("cuda")))
    for _ in range(5):  # compilation and allocator warm-up
        trainer.train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_s = steps * rows * cfg.train.seq_len / seconds
    if profile:
        profile_steps(trainer, seconds / steps)
    peak, source = device_peak_flops(torch.device("cuda"), "bf16")
    return {"rows": rows, "size": size, "params": n_params, "tokens_s": tokens_s,
            "mfu": tokens_s * fpt / peak if peak else None, "peak": source,
            "memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def profile_steps(trainer: Trainer, step_seconds: float, steps: int = 3) -> None:
    """The kernels that take the step's GPU time, and how busy the GPU is (kernel time / wall time):
    a low share means the host (launches, syncs) limits the step, not the kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] or events  # kernels' own rows
    kernel_us = sum(e.self_device_time_total for e in on_gpu)
    print(f"GPU kernels busy {kernel_us / 1e6 / (steps * step_seconds):.0%} of the timed step time")
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["125m", "1b"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=60, help="timed steps (20 left 125M runs varying by 4 points)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--eager-loss", action="store_true", help="compile the blocks but not the token loss")
    parser.add_argument("--rows", type=int, default=0, help="rows per step (default: the recipe's micro-batch)")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 steps")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for size in args.sizes:
        r = measure(size, args.steps, not args.no_compile, args.rows, args.profile, not args.eager_loss)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        loss = "eager loss, " if args.eager_loss and not args.no_compile else ""
        print(f"{size:>5}: {r['params'] / 1e6:.0f}M params, {r['rows']} rows, {loss}{r['tokens_s']:,.0f} tokens/s, "
              f"MFU {mfu} ({r['peak']}), peak memory {r['memory_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
