"""The dry run's timed probe: Trainer.train_step on random tokens, to estimate a step's time.

The probe runs Trainer.train_step itself (objective, autocast, clipping, the optimizer) on random
tokens for a few steps after a warm-up. When the estimate fits the free memory (and, on a CPU, the
micro-batch is small: dry_run.CPU_FULL_PROBE_FLOPS), it runs the real model on the real micro-batch and the
full step is grad_accum micro-batches; otherwise a one-layer copy of the model (on CPU on one row of
128 tokens) gives the FLOP/s it achieves, and the estimate scales the full step's FLOPs
(metrics.flops_per_token) by it: rough, and pessimistic where the probe's matmuls are smaller than
the real ones.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import BatchRampConfig, RunConfig
from lmforge.tokens.loader import Batch
from lmforge.train.metrics import Stopwatch, flops_per_token

PROBE_TOKENS_CPU = 128  # row length of the scaled CPU probe: seconds even for a 1B model's one layer


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


def probe_tokenizer(vocab: int) -> Any:
    """A stand-in vocabulary for objectives that read token strings (NSP's sentence ends, word starts):
    SentencePiece-style words, every 16th ending a sentence, so random rows hold words and sentences
    as text does. The probe only times the step; no text is encoded with it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    words = {f"\u2581w{i}." if i % 16 == 0 else f"\u2581w{i}": i for i in range(vocab)}
    return Tokenizer(WordLevel(words, unk_token="\u2581w1"))


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
    context = ObjectiveContext(default_special_tokens(vocab), vocab, cfg.seed, probe_tokenizer(vocab))
    objective = build_objective(pcfg.objective, context)
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
