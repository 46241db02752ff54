"""The data stage's own tools on the command line: `lmforge train-classifier` (the model a
`quality_classifier` or `toxicity` filter reads) and `lmforge plan-dedup` (what a MinHash setting
will catch and cost, before a run)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig


def add_parsers(sub: Any) -> None:
    sp = sub.add_parser("train-classifier", help="train a fastText-style quality/toxicity classifier from JSONL")
    sp.add_argument("--positive", nargs="+", required=True, help="JSONL files of examples to keep (label 1)")
    sp.add_argument("--negative", nargs="+", required=True, help="JSONL files of examples to drop (label 0)")
    sp.add_argument("--out", required=True, help="directory for classifier.safetensors and classifier.json")
    sp.add_argument("--text-key", default="text", help="field holding each example's text")
    sp.add_argument("--epochs", type=int, default=5)
    sp.add_argument("--buckets", type=int, default=1 << 20, help="hashed feature buckets")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(config=None, quiet=False, overrides=[])  # self-contained: no recipe
    sp = sub.add_parser("plan-dedup", help="the MinHash S-curve, error rates and memory of the recipe's minhash step")
    sp.add_argument("--config", "-c", action="append", help="YAML recipe whose data.dedup holds the minhash step")
    sp.add_argument("--docs", type=int, default=1_000_000, help="corpus size for the memory estimate")
    sp.add_argument("--quiet", "-q", action="store_true")
    sp.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def run(args: argparse.Namespace, cfg: RunConfig) -> int | None:
    """Runs the command if it is one of these; None otherwise."""
    if args.stage == "train-classifier":
        from lmforge.data.classifier import train_classifier

        metrics = train_classifier([Path(p) for p in args.positive], [Path(p) for p in args.negative],
                                   Path(args.out), text_key=args.text_key, epochs=args.epochs,
                                   buckets=args.buckets, seed=args.seed)
        print(json.dumps(metrics, indent=2))
        return 0
    if args.stage == "plan-dedup":
        from lmforge.data.dedup.lsh_plan import format_plan

        print(format_plan(docs=args.docs, **minhash_options(cfg)))
        return 0
    return None


def minhash_options(cfg: RunConfig) -> dict[str, Any]:
    """bands, rows and threshold of the recipe's minhash step (its defaults when it sets none)."""
    from lmforge.data.rounds import build_dedup

    steps = [s for s in build_dedup(cfg.data) if s.name == "minhash"]
    if not steps:
        from lmforge.data.dedup.minhash import MinHashDedup

        steps = [MinHashDedup()]
    step = steps[0]
    return {"bands": step.bands, "rows": step.rows, "threshold": step.threshold}
