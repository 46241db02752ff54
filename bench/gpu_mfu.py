"""GPU throughput and MFU of lmforge's training step for the reference recipes, bf16: the ~125M and ~1B
decoders (the MFU targets), BERT-base and T5-base.

The model of `recipes/gpt3-125m.yaml` or `recipes/llama-1b.yaml` (vocab 50,257 / 32,000; or of
`bert-base.yaml` / `t5-base.yaml`), built by lmforge, trained by lmforge's Trainer step as
`train.compile=true` runs it (fused AdamW, bf16 autocast, SDPA's fused causal kernel, each block and
the token loss compiled) on random tokens, so only the model and the loop are measured.
MFU = tokens/s x FLOPs per token (6N + 12·L·H·Q·T, lmforge.train.metrics) / the device's bf16 peak.
Targets: >= 41% at 125M (llm.c's GPT-2 figure), >= 50% at 1B (nanochat's d24).

    python bench/gpu_mfu.py              # both sizes, ~5 minutes on an H100 including compilation
    python bench/gpu_mfu.py --sizes 125m --steps 20
    python bench/gpu_mfu.py --sizes 125m --rows 32 --profile   # where the step's GPU time goes
    python bench/gpu_mfu.py --sizes 125m --eager-loss          # blocks compiled, the loss not
    python bench/gpu_mfu.py --sizes bert-base t5-base          # the encoder and encoder-decoder recipes
    python bench/gpu_mfu.py --device cpu --no-compile --rows 1 --steps 1 --sizes t5-base   # a smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.models import build_model
from lmforge.objectives import ObjectiveContext, build_objective
from lmforge.recipe import load_config
from lmforge.train.metrics import device_peak_flops, flops_per_token
from lmforge.train.parallel import Dist, parallelize
from lmforge.train.probe import RandomTokens, default_special_tokens, probe_tokenizer
from lmforge.train.trainer import Trainer

# recipe, vocabulary, rows per micro-batch (the recipe's). MFU targets are set for the decoders; the
# encoder (BERT-base) and encoder-decoder (T5-base) recipes run here too, for their throughput.
SIZES = {"125m": ("recipes/gpt3-125m.yaml", 50257, 16), "1b": ("recipes/llama-1b.yaml", 32000, 8),
         "bert-base": ("recipes/bert-base.yaml", 30522, 32), "t5-base": ("recipes/t5-base.yaml", 32128, 32)}


def measure(size: str, steps: int, compile_blocks: bool, rows: int = 0, profile: bool = False,
            compile_loss: bool = True, device: str = "cuda") -> dict:
    recipe, vocab, default_rows = SIZES[size]
    rows = rows or default_rows
    dev = torch.device(device)
    cfg = load_config(recipe, [f"model.vocab_size={vocab}", f"train.batch_size={rows}", "train.grad_accum=1",
                               "train.batch_tokens=0", "train.batch_ramp.start_tokens=0", "train.precision=bf16",
                               f"train.device={device}", f"train.max_steps={steps + 5}",
                               "train.schedule.warmup_steps=0", "out_dir=/tmp/lmforge_gpu_mfu",
                               f"train.compile={'true' if compile_blocks and compile_loss else 'false'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev)
    fpt = flops_per_token(model, cfg.train.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    model = parallelize(model, Dist(device=dev), compile_blocks=compile_blocks)
    # lmforge's role ids, and a stand-in vocabulary for objectives that read token strings (BERT's NSP).
    context = ObjectiveContext(default_special_tokens(vocab), vocab, cfg.seed, probe_tokenizer(vocab))
    objective = build_objective(cfg.objective, context)
    loader = RandomTokens(objective.window(cfg.train.seq_len), rows, vocab, 0)
    trainer = Trainer(cfg, model, loader, objective, "/tmp/lmforge_gpu_mfu/ckpt", "/tmp/lmforge_gpu_mfu/m.jsonl",
                      progress=False, dist=Dist(device=dev))
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    for _ in range(5):  # compilation and allocator warm-up
        trainer.train_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    seconds = time.perf_counter() - t0
    tokens_s = steps * rows * cfg.train.seq_len / seconds
    if profile:
        profile_steps(trainer, seconds / steps)
    peak, source = device_peak_flops(dev, "bf16")
    memory = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
    # 6N per token holds for a decoder; BERT predicts at 15% of positions and T5's decoder reads ~114
    # target tokens per 512 inputs, so their MFU would be overstated: tokens/s only.
    decoder = cfg.model.family == "decoder"
    return {"rows": rows, "size": size, "params": n_params, "tokens_s": tokens_s,
            "mfu": tokens_s * fpt / peak if peak and decoder else None, "peak": source, "memory_gib": memory}


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
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the same code (no MFU claim)")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device: {name}, torch {torch.__version__}")
    for size in args.sizes:
        r = measure(size, args.steps, not args.no_compile, args.rows, args.profile, not args.eager_loss, args.device)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        loss = "eager loss, " if args.eager_loss and not args.no_compile else ""
        print(f"{size:>9}: {r['params'] / 1e6:.0f}M params, {r['rows']} rows, {loss}{r['tokens_s']:,.0f} tokens/s, "
              f"MFU {mfu} ({r['peak']}), peak memory {r['memory_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
