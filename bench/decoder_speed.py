"""The default decoder path before and after a change: forward + backward + AdamW tokens/s of the
plain causal decoder (SDPA's fused causal kernel), for code at two git revisions.

    .venv/bin/python bench/decoder_speed.py [--base fadf66b] [--rounds 3] [--steps 20]

Each side runs in its own process (PYTHONPATH pointing at that revision's src/), rounds interleaved
so a shared machine's noise hits both; the best round of each is kept. Prints tok/s and after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F
from lmforge.models import build_model
try:  # after the per-family configs
    from lmforge.models.decoder import DecoderConfig as Config
except ImportError:  # before: one flat ModelConfig
    from lmforge.config import ModelConfig as Config
d, layers, vocab, batch, seq, steps = map(int, sys.argv[1:7])
torch.manual_seed(0)
model = build_model(Config(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=4, max_seq_len=seq))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, vocab, (batch, seq + 1))
def step():
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step()  # warm-up
t0 = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"tok_s": steps * batch * seq / (time.perf_counter() - t0)}))
"""


def checkout(rev: str, into: Path) -> Path:
    """The src/ of `rev`, extracted with git archive (no worktree left behind)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def measure(src: Path, args: argparse.Namespace) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-c", CHILD, *map(str, (args.d_model, args.layers, args.vocab, args.batch, args.seq,
                                                   args.steps))]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="fadf66b", help="git revision measured as 'before'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before_src = checkout(args.base, Path(tmp))
        best = {"before": 0.0, "after": 0.0}
        for _ in range(args.rounds):
            best["before"] = max(best["before"], measure(before_src, args))
            best["after"] = max(best["after"], measure(REPO / "src", args))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"decoder d={args.d_model} L={args.layers} vocab {args.vocab}, batch {args.batch}x{args.seq}, "
          f"{args.steps} steps, best of {args.rounds} interleaved rounds")
    print(f"before ({args.base}): {best['before']:,.0f} tok/s")
    print(f"after (working tree): {best['after']:,.0f} tok/s")
    print(f"ratio after/before:   {best['after'] / best['before']:.3f}")


if __name__ == "__main__":
    main()
