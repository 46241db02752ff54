"""`lmforge finetune`: the subcommand's flags and what it prints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig
from lmforge.finetune.fit import finetune


def add_cli_parser(sub: Any) -> None:
    """Add `finetune` to the CLI's subparsers; `out_dir=runs/x` (an override) picks the pretrained run."""
    sp = sub.add_parser("finetune", help="fine-tune a pretrained run with a classification head on labelled JSONL")
    sp.add_argument("--config", "-c", action="append",
                    help="YAML recipe of the pretrained run; repeat to merge fragments over it")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    sp.add_argument("--train", required=True, type=Path, help='JSONL, one {"text": ..., "label": ...} per line')
    sp.add_argument("--out", required=True, type=Path, help="directory for the fine-tuned model, labels and metrics")
    sp.add_argument("--epochs", type=int, default=3, help="passes over the training split (default 3)")
    sp.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    sp.add_argument("--batch-size", type=int, default=16, help="texts per step (default 16)")
    sp.add_argument("--max-len", type=int, default=256, help="tokens per text, special tokens included (default 256)")
    sp.add_argument("--holdout", type=float, default=0.2, help="share of each label held out for scoring (0.2)")
    sp.add_argument("--freeze-body", action="store_true", help="train the head only; the pretrained body stays")
    sp.add_argument("--text-key", default="text", help="JSON key of the text (default: text)")
    sp.add_argument("--label-key", default="label", help="JSON key of the label (default: label)")
    sp.add_argument("--seed", type=int, help="seed of the split, head and shuffling (default: the run's seed)")
    sp.add_argument("overrides", nargs="*", metavar="key.sub=value",
                    help="dotted config overrides; out_dir=runs/x selects the pretrained run")


def cli_main(args: argparse.Namespace, cfg: RunConfig, progress: bool) -> int:
    from lmforge.train.trainer import resolve_device

    result = finetune(cfg, args.train, args.out, label_key=args.label_key, text_key=args.text_key,
                      epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_len=args.max_len,
                      holdout=args.holdout, seed=cfg.seed if args.seed is None else args.seed,
                      device=str(resolve_device(cfg.train.device)), freeze_body=args.freeze_body, progress=progress)
    print(report(result))
    return 0


def report(metrics: dict[str, Any]) -> str:
    """Accuracy, then the confusion matrix as a table: a row per true label, a column per prediction."""
    names = [str(n) for n in metrics["confusion"]["labels"]]
    matrix = metrics["confusion"]["matrix"]
    corner = "true \\ predicted"
    first = max(len(corner), *(len(n) for n in names))
    widths = [max(len(n), *(len(str(row[j])) for row in matrix)) for j, n in enumerate(names)]
    lines = [
        f"accuracy {metrics['accuracy']:.1%} on {metrics['n_heldout']} held-out texts "
        f"({metrics['n_train']} trained on; final train loss {metrics['train_loss'][-1]:.4f})",
        "  ".join([corner.ljust(first), *(n.rjust(w) for n, w in zip(names, widths, strict=True))]),
    ]
    for name, row in zip(names, matrix, strict=True):
        lines.append("  ".join([name.ljust(first), *(str(c).rjust(w) for c, w in zip(row, widths, strict=True))]))
    if "out_dir" in metrics:
        lines.append(f"saved: {metrics['out_dir']}")
    return "\n".join(lines)
