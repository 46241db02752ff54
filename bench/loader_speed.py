"""Loader throughput per core: lmforge's PackedLoader (3-source mixture, best_fit and greedy packing)
against nanoGPT's `get_batch` (random np.memmap slices at torch.randint offsets, stacked) on the
same token shards.

    .venv/bin/python bench/loader_speed.py [--mtokens 75] [--rounds 3] [--seconds 3] [--quick] [--profile]

Synthetic shards are written with lmforge's ShardWriter into a temporary directory (removed at the
end): three sources of random ids (vocab 32768, uint16), document lengths lognormal with the means
below, EOS after every document. Both sides are single-threaded numpy/torch CPU code, so tokens/s is
per core. A batch is 8 rows of a 2048-token window, counted as 8 x 2047 target tokens for both
sides (nanoGPT's block_size = window - 1: the same inputs and targets). nanoGPT reads one file; here
each row's source is drawn by the mixture weight and the memmaps are reopened every batch, as its
train.py does. Rounds are interleaved (ours best_fit, ours greedy, nanoGPT) so a shared machine's
noise hits all three; the best round of each is kept. --profile adds a cProfile of ours.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmforge.tokens.loader import PackedLoader
from lmforge.tokens.shard_writer import ShardWriter
from lmforge.tokens.shards import TokenDataset

VOCAB = 32768
EOS = 0
# name: (share of tokens and mixture weight, mean document length in tokens, lognormal sigma)
SOURCES = {"web": (0.6, 600, 1.0), "code": (0.25, 900, 1.2), "papers": (0.15, 2500, 0.8)}
TARGET = 20e6  # tokens/s the issue asks of the loader, so it is never the bottleneck


def build_shards(out_dir: Path, total_tokens: int, seed: int = 0) -> dict[str, TokenDataset]:
    rng = np.random.default_rng(seed)
    for name, (share, mean, sigma) in SOURCES.items():
        n = int(total_tokens * share)
        ids = rng.integers(1, VOCAB, size=n, dtype=np.uint16)  # 0 is EOS
        mu = np.log(mean) - sigma**2 / 2  # lognormal with this mean
        lengths = np.clip(rng.lognormal(mu, sigma, size=2 * n // mean + 16).astype(np.int64), 8, 200_000)
        with ShardWriter(out_dir, name, "synthetic", VOCAB, eos_id=EOS) as w:
            at = 0
            for length in lengths:
                if at + length + 1 > n:
                    break
                w.add(ids[at : at + length], name, 4 * int(length))
                at += length + 1
    return {name: TokenDataset(out_dir, name) for name in SOURCES}


def nanogpt_batches(bins: list[Path], weights: list[float], block_size: int, batch_size: int) -> Callable:
    """nanoGPT's train.py get_batch (CPU), with each row's source drawn by its mixture weight."""
    w = torch.tensor(weights, dtype=torch.float64)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        # nanoGPT recreates np.memmap every batch to avoid a memory leak
        data = [np.memmap(p, dtype=np.uint16, mode="r") for p in bins]
        src = torch.multinomial(w, batch_size, replacement=True).tolist()
        ix = [torch.randint(len(data[s]) - block_size, (1,)).item() for s in src]
        rows = list(zip(src, ix, strict=True))
        x = torch.stack([torch.from_numpy((data[s][i : i + block_size]).astype(np.int64)) for s, i in rows])
        y = torch.stack([torch.from_numpy((data[s][i + 1 : i + 1 + block_size]).astype(np.int64)) for s, i in rows])
        return x, y

    return get_batch


def rate(step: Callable, targets_per_batch: int, seconds: float) -> float:
    """Target tokens/s of `step` called for about `seconds`."""
    step()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n * targets_per_batch / elapsed


def profile(step: Callable, seconds: float, top: int) -> str:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    while time.perf_counter() - t0 < seconds:
        step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mtokens", type=float, default=75, help="million tokens of synthetic shards")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="per side per round")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="20M tokens, 1 s per side per round")
    ap.add_argument("--profile", action="store_true", help="also cProfile ours (top functions by own time)")
    args = ap.parse_args()
    if args.quick:
        args.mtokens, args.seconds = 20, 1.0
    torch.set_num_threads(1)
    targets = args.batch * (args.window - 1)
    weights = {name: share for name, (share, _, _) in SOURCES.items()}
    with tempfile.TemporaryDirectory(prefix="lmforge-loader-bench-") as tmp:
        t0 = time.perf_counter()
        sets = build_shards(Path(tmp), int(args.mtokens * 1e6))
        built = time.perf_counter() - t0
        loaders = {
            packing: PackedLoader(sets, args.window, args.batch, seed=0, weights=weights, packing=packing)
            for packing in ("best_fit", "greedy")
        }
        bins = [s.bin_path for name in SOURCES for s in sets[name].shards]
        assert len(bins) == len(SOURCES), "one shard per source expected"
        sides: dict[str, Callable] = {
            "ours best_fit": loaders["best_fit"].next_batch,
            "ours greedy": loaders["greedy"].next_batch,
            "nanoGPT get_batch": nanogpt_batches(bins, list(weights.values()), args.window - 1, args.batch),
        }
        best = dict.fromkeys(sides, 0.0)
        for _ in range(args.rounds):
            for name, step in sides.items():
                best[name] = max(best[name], rate(step, targets, args.seconds))
        reports = {name: profile(sides[name], args.seconds, 18) for name in list(sides)[:2]} if args.profile else {}
        cropped = loaders["best_fit"].stats()["cropped_share"]
        n_tokens = sum(ds.n_tokens for ds in sets.values())
        n_docs = sum(ds.n_docs for ds in sets.values())

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus "
          "(shared: other jobs may have been running)")
    print(f"shards: {n_tokens / 1e6:.1f}M tokens, {n_docs:,} documents in 3 sources "
          + ", ".join(f"{n} {w:.0%} (mean {m} tok)" for n, (w, m, _) in SOURCES.items())
          + f", written in {built:.1f} s")
    print(f"batch {args.batch} x window {args.window} ({targets:,} targets), one thread, "
          f"best of {args.rounds} interleaved rounds of {args.seconds:g} s")
    peer = best["nanoGPT get_batch"]
    for name, tok_s in best.items():
        extra = "" if name == "nanoGPT get_batch" else (
            f"  ours/nanoGPT {tok_s / peer:.3f}, vs 20M target {tok_s / TARGET:.3f}")
        print(f"{name:18s} {tok_s / 1e6:8.2f}M tokens/s/core{extra}")
    print(f"best_fit cropped {cropped:.1%} of the tokens it drew on these synthetic lengths (rows are always "
          "full; the issue's anchor, 34.6% at 2048 on web text, needs web text's lengths)")
    for name, text in reports.items():
        print(f"\n--- cProfile of {name} ({args.seconds:g} s), top by own time ---\n{text}")


if __name__ == "__main__":
    main()
