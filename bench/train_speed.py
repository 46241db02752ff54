"""CPU training speed: our full `lmforge train` step against a nanoGPT-style GPT loop, in one run.

    .venv/bin/python bench/train_speed.py [--steps 15] [--no-compile] [--variants] [--profile]

Ours: Trainer.train_step of the default decoder (RMSNorm, SwiGLU, RoPE, SDPA) at d=384, 5 layers,
vocab 4096, under bf16 autocast when the CPU multiplies bf16 natively (avx512_bf16 or AMX: the
issue's "whatever makes ours faster") and in fp32 too ("ours, fp32"), else fp32 only: loader
(PackedLoader over token shards), objective, forward, loss, backward, clip, AdamW from
train.optimizer, metrics. Peer: nanoGPT's model.py and train.py loop (LayerNorm, GELU, learned
positions, tied head, torch.optim.AdamW with nanoGPT's decay groups, clip 1.0, random offsets into
the token array), fp32, at the same width and depth: 4d^2 + 8d^2 matmul weights per layer on both
sides (SwiGLU's d_ff = 8/3 d = 1024), so the same model FLOPs per token; the peer also holds
256 x 384 learned positions. The peer runs eager and under torch.compile (compile time excluded).
The sides take one step in turn, so a shared machine's load hits all alike; medians and bests of
the per-step times are printed, and the ratios of both.
--variants also times ours with one change each: AdamW's per-tensor loop (torch's CPU default, and
ours before it chose fused), AdamW foreach, bf16 autocast, a torch.compile'd model; and the peer
under bf16 autocast. Always printed: AdamW's step alone (loop, foreach, fused) on our parameters.
--profile prints torch.profiler's top ops of one of our steps.
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models import build_model, count_params
from lmforge.objectives import ObjectiveContext, build_objective
from lmforge.recipe import load_config
from lmforge.tokenizer.special_tokens import SpecialTokens
from lmforge.tokens.loader import PackedLoader
from lmforge.tokens.shard_writer import ShardWriter
from lmforge.tokens.shards import TokenDataset
from lmforge.train.metrics import flops_per_token, matmul_params
from lmforge.train.optim import param_groups
from lmforge.train.trainer import Trainer

VOCAB, D, LAYERS, HEADS, SEQ = 4096, 384, 5, 6, 256


# ---------------------------------------------------------------------------- the peer: nanoGPT


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D, bias=False)
        self.c_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D, bias=False), nn.LayerNorm(D, bias=False)
        self.attn = CausalSelfAttention()
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D, bias=False), nn.GELU(), nn.Linear(4 * D, D, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT with bias=False and dropout 0."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(SEQ, D)
        self.h = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D, bias=False)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # residual projections scaled by 1/sqrt(2 L), as nanoGPT does
                residual = name.endswith(("c_proj.weight", "mlp.2.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * LAYERS) if residual else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def peer_step(model: nn.Module, opt: torch.optim.Optimizer, data: np.ndarray, batch: int, it: int,
              bf16: bool = False) -> float:
    """One iteration of nanoGPT's train.py: get_batch, cosine LR, forward, loss, backward, clip, step
    (with bf16=True, forward and loss under bf16 autocast, as nanoGPT's `dtype='bfloat16'`)."""
    ix = np.random.randint(0, len(data) - SEQ - 1, size=batch)
    x = torch.from_numpy(np.stack([data[i : i + SEQ] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + SEQ] for i in ix]).astype(np.int64))
    lr = 6e-4 * 0.5 * (1 + math.cos(math.pi * min(it, 1000) / 1000))
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def make_peer(compiled: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95))  # nanoGPT: fused on CUDA only
    return (torch.compile(model) if compiled else model), opt


# ---------------------------------------------------------------------------- ours


def make_dataset(root: Path, n_tokens: int) -> TokenDataset:
    rng = np.random.default_rng(0)
    with ShardWriter(root, "train", tokenizer_sha256="bench", vocab_size=VOCAB) as w:
        written = 0
        while written < n_tokens:
            doc = rng.integers(13, VOCAB, size=int(rng.integers(50, 2000)))
            w.add(doc, "bench", n_bytes=4 * len(doc))
            written += len(doc) + 1
    return TokenDataset(root, "train")


def make_ours(ds: TokenDataset, root: Path, batch: int, overrides: tuple[str, ...] = ()) -> Trainer:
    cfg = load_config(None, [f"model.vocab_size={VOCAB}", f"model.d_model={D}", f"model.n_layers={LAYERS}",
                             f"model.n_heads={HEADS}", f"train.seq_len={SEQ}", f"train.batch_size={batch}",
                             "train.device=cpu", f"out_dir={root}", "train.optimizer.lr=6e-4", *overrides])
    torch.manual_seed(0)
    objective = build_objective(cfg.objective, ObjectiveContext(SpecialTokens(eos=0), VOCAB, cfg.seed))
    loader = PackedLoader(ds, objective.window(cfg.train.seq_len), cfg.train.batch_size, cfg.seed)
    return Trainer(cfg, build_model(cfg.model), loader, objective, root / "ckpt", root / "m.jsonl", progress=False)


def with_adamw(trainer: Trainer, **flags: bool) -> Trainer:
    """Ours with torch.optim.AdamW built with `flags` (foreach / fused) instead of the registry's."""
    opt = trainer.tc.optimizer
    trainer.optimizer = torch.optim.AdamW(param_groups(trainer.model, opt.weight_decay), lr=opt.lr,
                                          betas=(opt.beta1, opt.beta2), eps=opt.eps, **flags)
    for group in trainer.optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return trainer


def variants(ds: TokenDataset, root: Path, args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """Ours with one thing changed each: what would make the step faster."""
    out: dict[str, Callable[[], object]] = {
        "ours, AdamW for-loop": with_adamw(make_ours(ds, root / "v1", args.batch), foreach=False).train_step,
        "ours, AdamW foreach": with_adamw(make_ours(ds, root / "v2", args.batch), foreach=True).train_step,
        "ours, bf16 autocast": make_ours(ds, root / "v3", args.batch, ("train.precision=bf16",)).train_step,
    }
    peer, opt = make_peer(False)
    data, it = ds.tokens(0, ds.n_tokens), iter(range(10**9))
    out["nanoGPT eager, bf16"] = lambda: peer_step(peer, opt, data, args.batch, next(it), bf16=True)
    if not args.no_compile:
        trainer = make_ours(ds, root / "v4", args.batch)
        trainer.model = torch.compile(trainer.model)  # type: ignore[assignment]
        trainer.train_step()  # compiles
        out["ours, compiled model"] = trainer.train_step
    return out


# ---------------------------------------------------------------------------- timing


def step_times(sides: dict[str, Callable[[], object]], steps: int) -> dict[str, list[float]]:
    """Seconds of each side's steps, the sides taking one step in turn: a shared machine's load swings
    within seconds, and turn-taking spreads them evenly over all sides."""
    for step in sides.values():
        step()  # warm-up: allocator, thread pools (a compiled side compiled before this)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(steps):
        for name, step in sides.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def adamw_step_ms(model: nn.Module, rounds: int = 5) -> dict[str, float]:
    """AdamW's step alone on `model`'s parameters (random gradients): torch's CPU default (a loop over
    tensors), foreach and fused; best of `rounds` x 5 steps, the three interleaved."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    flags = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opts = {k: torch.optim.AdamW(param_groups(model, 0.1), lr=1e-6, **f) for k, f in flags.items()}
    best = dict.fromkeys(opts, math.inf)
    for _ in range(rounds):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(5):
                opt.step()
            best[name] = min(best[name], (time.perf_counter() - t0) / 5 * 1e3)
    model.zero_grad(set_to_none=True)
    return best


def profile_ours(trainer: Trainer) -> None:
    from torch.profiler import ProfilerActivity, profile

    trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15, help="timed steps per side")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also ours with AdamW loop/foreach, bf16, compiled")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ds = make_dataset(root / "tokens", 2_000_000)
        data = ds.tokens(0, ds.n_tokens)
        it = iter(range(10**9))
        # The rule: whatever makes ours faster, bf16 where the CPU has it (a native bf16 dot
        # product: avx512_bf16 or AMX). fp32 ours is timed too, beside it.
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        ours = make_ours(ds, root / "ours", args.batch, ("train.precision=bf16",) if native_bf16 else ())
        sides: dict[str, Callable[[], object]] = {"ours": ours.train_step}
        if native_bf16:
            sides["ours, fp32"] = make_ours(ds, root / "ours32", args.batch).train_step
        eager, eager_opt = make_peer(False)
        sides["nanoGPT eager"] = lambda: peer_step(eager, eager_opt, data, args.batch, next(it))
        compile_s = None
        if not args.no_compile:
            compiled, compiled_opt = make_peer(True)
            t0 = time.perf_counter()
            try:
                peer_step(compiled, compiled_opt, data, args.batch, 0)  # compiles forward and backward
                compile_s = time.perf_counter() - t0
                sides["nanoGPT compiled"] = lambda: peer_step(compiled, compiled_opt, data, args.batch, next(it))
            except Exception as e:  # report why and go on with the eager comparison
                print(f"torch.compile failed on this CPU: {type(e).__name__}: {str(e)[:300]}")
        if args.variants:
            sides.update(variants(ds, root, args))
        times = step_times(sides, args.steps)
        adamw = adamw_step_ms(build_model(ours.cfg.model))
        if args.profile:
            profile_ours(ours)
        report(args, ours, eager, times, compile_s)
        print("AdamW step alone, ours' parameters: " + ", ".join(f"{k} {v:.1f} ms" for k, v in adamw.items()))


def report(args: argparse.Namespace, ours: Trainer, peer: nn.Module, times: dict[str, list[float]],
           compile_s: float | None) -> None:
    tokens = args.batch * SEQ
    median = {name: tokens / float(np.median(t)) for name, t in times.items()}
    best = {name: tokens / min(t) for name, t in times.items()}
    peer_flops = 6 * matmul_params(peer) + 12 * LAYERS * D * SEQ  # no lmforge Attention modules to find
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"ours: {count_params(ours.model):,} params, {flops_per_token(ours.model, SEQ) / 1e6:.1f} MFLOP/token; "
          f"nanoGPT: {count_params(peer):,} params, {peer_flops / 1e6:.1f} MFLOP/token (6N + 12LdT)")
    print(f"d={D} L={LAYERS} heads {HEADS} vocab {VOCAB}, batch {args.batch}x{SEQ}; ours {ours.tc.precision} "
          f"(bf16 autocast where the CPU has native bf16), nanoGPT fp32; {args.steps} timed steps per side, sides "
          "taking turns step by step" + (f"; compile took {compile_s:.0f} s" if compile_s else ""))
    for name in times:
        print(f"  {name:<22} median {median[name]:>7,.0f} tok/s   best {best[name]:>7,.0f} tok/s")
    for side in ("ours", "ours, fp32"):
        for peer_name, target in (("nanoGPT eager", 1.2), ("nanoGPT compiled", 1.0)):
            if side in median and peer_name in median:
                print(f"ratio {side} / {peer_name}: {median[side] / median[peer_name]:.3f} median, "
                      f"{best[side] / best[peer_name]:.3f} best (target >= {target})")


if __name__ == "__main__":
    main()
