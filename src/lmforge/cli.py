"""`lmforge <stage> [--config recipe.yaml] [key.sub=value ...]`"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lmforge import stages
from lmforge.config import ConfigError, RunConfig
from lmforge.data import commands as data_commands
from lmforge.data.dedup import DedupAlarm
from lmforge.data.pipeline import DataStageError
from lmforge.recipe import load_config
from lmforge.tokens.shards import ShardError
from lmforge.train.trainer import NonFiniteLoss

STAGES: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {
    "data": (stages.stage_data, "read, filter and deduplicate raw text into clean document shards"),
    "tokenizer": (stages.stage_tokenizer, "train a tokenizer on the clean documents, or import one (tokenizer.from)"),
    "tokenize": (stages.stage_tokenize, "turn clean documents into memory-mapped token shards"),
    "train": (stages.stage_train, "pretrain the model, with periodic checkpoints and resume"),
    "eval": (stages.stage_eval, "validation loss, perplexity, bits/byte and a sample"),
    "export": (stages.stage_export, "export to a Hugging Face directory and check it loads"),
}
PIPELINE = ["data", "tokenizer", "tokenize", "train", "eval", "export"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Flags may come after the key=value overrides; argparse leaves the overrides after them here.
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    try:
        configs = args.config or []  # later --config files merge over the first, as overrides do
        cfg = load_config(configs[0] if configs else None, [*fragment_overrides(configs[1:]), *args.overrides])
        return _dispatch(args, cfg)
    except (ConfigError, FileNotFoundError) as e:  # the command or its inputs are wrong
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except (ShardError, DataStageError, DedupAlarm, NonFiniteLoss) as e:  # the work failed; outputs kept as they were
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, KeyError) as e:  # e.g. a checkpoint that does not fit the data
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge: error: {e} (LMFORGE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="Raw text to a pretrained, evaluated, exported LM.")
    sub = p.add_subparsers(dest="stage", required=True)
    commands = {name: help_ for name, (_, help_) in STAGES.items()}
    commands["generate"] = "sample text from a checkpoint"
    commands["tokenizer-report"] = "bytes per token of the run's tokenizer, per source of its clean documents"
    commands["run"] = "all stages, in order, from one recipe"
    commands["mixture-search"] = "train small proxies on candidate mixtures and pick the best (T6)"
    commands["scaling"] = "fit L(N, D) = E + A/N^a + B/D^b over a sweep of small runs; predict a larger one"
    commands["report"] = "rebuild the run's self-contained HTML report (report.html) from its files"
    for name, help_ in commands.items():
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", "-c", action="append",
                        help="YAML recipe (defaults: the built-in CPU demo); repeat to merge fragments over it")
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        if name == "generate":
            what = sp.add_mutually_exclusive_group()
            what.add_argument("--prompt", help="text to continue (decoders) or to answer (encoder-decoders)")
            what.add_argument("--fill-mask", metavar="TEXT", help='text with [MASK] placeholders (encoders)')
            sp.add_argument("--lang", metavar="CODE",
                            help="start the prompt with this language's tag (decoders; tokens.language_tags)")
        if name in ("train", "run"):
            sp.add_argument("--dry-run", action="store_true",
                            help="print parameters, token budget, memory and time estimates; train nothing")
            sp.add_argument("--probe-steps", type=int, default=3, help="timed steps of the dry run's probe (0: none)")
        if name == "tokenizer-report":
            sp.add_argument("--split", choices=["train", "val"], default="val", help="documents to measure on")
        if name == "mixture-search":
            from lmforge.mixture_search import add_cli_options

            add_cli_options(sp)
        if name == "scaling":
            from lmforge.scaling import add_cli_options as add_scaling_options

            add_scaling_options(sp)
        sp.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    _extend_vocab_parser(sub)
    data_commands.add_parsers(sub)
    from lmforge.finetune import add_cli_parser as add_finetune_parser

    add_finetune_parser(sub)
    return p


def _extend_vocab_parser(sub: Any) -> None:
    sp = sub.add_parser("extend-vocab", help="append tokens learned on new text to a tokenizer; old ids kept")
    sp.add_argument("--base", required=True, help="tokenizer.json, or a directory holding one")
    sp.add_argument("--texts", required=True, nargs="+", help="files, directories or globs (text, jsonl, parquet)")
    sp.add_argument("--n-new", type=int, required=True, help="most tokens to append")
    sp.add_argument("--out", required=True, help="directory for the extended tokenizer.json and special_tokens.json")
    sp.set_defaults(config=None, quiet=False, overrides=[])  # no recipe: the command is self-contained


def _dispatch(args: argparse.Namespace, cfg: RunConfig) -> int:
    progress = not args.quiet
    if getattr(args, "dry_run", False):  # train and run: the estimate needs no earlier stage
        from lmforge.train.dry_run import dry_run

        print(dry_run(cfg, probe_steps=args.probe_steps)["text"])
        return 0
    if args.stage == "tokenizer-report":
        from lmforge.tokenizer.report import tokenizer_report

        print(tokenizer_report(cfg, split=args.split)["table"])
        return 0
    if args.stage == "extend-vocab":
        from lmforge.tokenizer.extend import extend_vocabulary, read_texts

        result = extend_vocabulary(args.base, read_texts(args.texts), args.n_new, args.out)
        print(json.dumps({k: v for k, v in result.items() if k != "new_tokens"}, indent=2))
        return 0
    done = data_commands.run(args, cfg)
    if done is not None:
        return done
    if args.stage == "finetune":
        from lmforge.finetune import cli_main as finetune_main

        return finetune_main(args, cfg, progress)
    if args.stage == "generate":
        print(stages.stage_generate(cfg, args.prompt, fill_mask=args.fill_mask, lang=args.lang)["text"])
        return 0
    if args.stage == "mixture-search":
        from lmforge.mixture_search import cli_main

        return cli_main(args, cfg, progress)
    if args.stage == "run":
        results = run_all(cfg, progress)
        print(summary(results))
        return 0
    if args.stage == "scaling":
        from lmforge.scaling import cli_main as scaling_main

        return scaling_main(args, cfg, progress)
    if args.stage == "report":
        from lmforge.report import build_report

        print(build_report(cfg.out))
        return 0
    fn, _ = STAGES[args.stage]
    result = fn(cfg, progress=progress)
    if "table" in result:  # the data ledger reads better as a table than as JSON
        print(result["table"])
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


def fragment_overrides(paths: list[str]) -> list[str]:
    """A recipe fragment's leaves as `a.b=value` overrides: mappings merge into the recipe, the rest replace."""
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix[:-1]}={json.dumps(node)}")

    for path in paths:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {path}: not a readable YAML file: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        walk(raw, "")
    return out


def run_all(cfg: RunConfig, progress: bool = True) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name in PIPELINE:
        print(f"== {name}: {STAGES[name][1]}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        results[name] = STAGES[name][0](cfg, progress=progress)
        results[name]["stage_seconds"] = time.perf_counter() - t0
    from lmforge.report import build_report

    results["report"] = {"path": str(build_report(cfg.out))}
    return results


def summary(r: dict[str, dict[str, Any]]) -> str:
    d, tok, tr, ev, ex = r["data"], r["tokenize"], r["train"], r["eval"], r["export"]
    below = 1 - ev["loss"] / ev["unigram_loss"]
    lines = [
        "",
        d["table"],
        "",
        "== lmforge run summary",
        f"documents   {d['docs_kept']:,} kept of {d['docs_in']:,} "
        f"({d['train_docs']:,} train / {d['val_docs']:,} val)",
        f"tokens      {tok['train']['n_tokens']:,} train / {tok['val']['n_tokens']:,} val "
        f"(vocab {r['tokenizer']['vocab_size']:,}, encoded with {tok['encoder']})",
        f"model       {tr['params']:,} params, {tr['steps']} steps, {tr['tokens_seen']:,} tokens seen",
        f"mixture     {_shares(tr['data'])}",
        f"validation  {ev['objective']} loss {ev['loss']:.3f} nats vs unigram baseline {ev['unigram_loss']:.3f} "
        f"({below:.0%} below); at init {ev['loss_at_init']:.3f} ({1 - ev['loss'] / ev['loss_at_init']:.0%} below)",
        f"            {_quality(ev)}",
        *(f"  {name:<9} loss {m['loss']:.3f}, ppl {m['perplexity']:.1f}" for name, m in ev.get("sources", {}).items()),
        *(f"zero-shot   {name}: acc {t['acc']:.3f}, acc_norm {t['acc_norm']:.3f} over {t['n']} items"
          for name, t in ev.get("zero_shot", {}).items()),
        f"sample      {ev['prompt']!r} -> {ev['sample']!r}",
        f"export      {ex['path']} ({ex['format']}; transformers logits max |diff| "
        f"{ex.get('max_abs_diff', float('nan')):.1e})" if ex["path"] else f"export      {ex['format']}",
        "time        " + ", ".join(f"{k} {v['stage_seconds']:.0f}s" for k, v in r.items() if "stage_seconds" in v),
    ]
    if "report" in r:
        lines.append(f"report      {r['report']['path']}")
    return "\n".join(lines)


def _shares(data: dict[str, Any]) -> str:
    """Realised token share and epochs drawn per source, and the cropped share when packing best-fit crops."""
    epochs = data.get("epochs", {})
    shares = ", ".join(f"{name} {share:.1%}" + (f" ({epochs[name]:.2f} epochs)" if name in epochs else "")
                       for name, share in data["source_share"].items() if share)
    return (f"{shares}; {data['utilisation']:.1%} of model inputs are not padding, "
            f"{data['cropped_share']:.1%} of tokens cropped by packing")


def _quality(ev: dict[str, Any]) -> str:
    """The metrics that fit the objective: bits/byte where targets are the text, accuracy for MLM."""
    parts = [f"ppl {ev['perplexity']:.1f}", f"target accuracy {ev['accuracy']:.1%}"]
    if "bits_per_byte" in ev:
        parts.append(f"{ev['bits_per_byte']:.3f} bits/byte")
    if "nsp_loss" in ev:
        parts.append(f"NSP loss {ev['nsp_loss']:.3f}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
