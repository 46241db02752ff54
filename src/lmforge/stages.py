"""One function per pipeline stage. Each reads its section of the run config and files on disk,
and writes its outputs under `out_dir`, so every stage can be run, resumed and tested alone."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ConfigError, CurriculumStage, RunConfig, save_config, to_dict
from lmforge.io_utils import atomic_write_json
from lmforge.run_dir import RunPaths, load_trained, need, objective_for, open_datasets

# ---------------------------------------------------------------------------- data


def stage_data(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    from lmforge.data.pipeline import run_data_stage

    return run_data_stage(cfg.data, RunPaths(cfg.out).data, cfg.seed, progress=progress)


def stage_tokenizer(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    from lmforge.data.doc_shards import read_documents
    from lmforge.tokenizer.train import import_tokenizer, spread_sample, train_tokenizer

    paths = RunPaths(cfg.out)
    if cfg.tokenizer.from_:  # a given tokenizer instead of training one: the data stage is not needed
        tok = import_tokenizer(cfg.tokenizer.from_, paths.tokenizer)
        return {"path": str(paths.tokenizer), "vocab_size": tok.get_vocab_size(), "from": cfg.tokenizer.from_,
                "tiktoken": _export_tiktoken(paths.tokenizer, progress),
                "bytes_per_token": _bytes_per_token(paths, tok, progress)}
    docs = read_documents(need(paths.data / "train", "data"), meta=False)  # texts are what it trains on
    ledger = json.loads(need(paths.data / "ledger.json", "data").read_text(encoding="utf-8"))
    corpus_bytes = ledger["totals"]["bytes_kept"]
    rate = min(1.0, 1.1 * cfg.tokenizer.max_train_bytes / max(corpus_bytes, 1))  # 10% slack; the budget caps it
    texts = spread_sample(docs, rate, cfg.seed)
    tok = train_tokenizer(texts, cfg.tokenizer, paths.tokenizer, progress=progress)
    return {"path": str(paths.tokenizer), "vocab_size": tok.get_vocab_size(), "sample_rate": rate,
            "tiktoken": _export_tiktoken(paths.tokenizer, progress),
            "bytes_per_token": _bytes_per_token(paths, tok, progress)}


def _bytes_per_token(paths: RunPaths, tok: Any, progress: bool) -> dict[str, Any] | None:
    """Bytes and characters per token of each source's val documents (text the tokenizer was not
    trained on; at most 5 MB a source), or None before the data stage ran (an imported tokenizer).
    `lmforge tokenizer-report` gives the same for any split."""
    from lmforge.data.doc_shards import read_documents
    from lmforge.tokenizer.report import format_table, measure

    val = paths.data / "val"
    if not val.is_dir():
        return None
    rows = measure(tok, ((d.source, d.text) for d in read_documents(val, meta=False)), 5_000_000)
    if progress:
        print(format_table(rows, f"tokenizer {paths.tokenizer} on the val split"))
    return rows


def _export_tiktoken(tokenizer_path: Path, progress: bool) -> str:
    from lmforge.tokenizer.tiktoken_file import export_tiktoken

    line = export_tiktoken(tokenizer_path)
    if progress:
        print(line)
    return line


def stage_tokenize(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """One token set per (split, source), resumable per input document shard; returns each split's
    manifest (tokens, documents, bytes and bytes/token per source)."""
    from lmforge.data.doc_shards import read_documents, shard_paths
    from lmforge.tokenizer.fast_encode import usable_cpus
    from lmforge.tokenizer.tiktoken_file import stage_encoder
    from lmforge.tokenizer.train import tokenizer_hash
    from lmforge.tokens.token_sets import LANGUAGE_META_KEY, LanguageTagger, tokenize_splits

    paths = RunPaths(cfg.out)
    # tiktoken when it reproduces this tokenizer exactly, else `tokenizers`; either way a document
    # quoting "<|endoftext|>" encodes it as text, never as a real EOS that would split it in two.
    # One thread per encode call and the stage's own worker threads: tiktoken releases the GIL, so
    # workers overlap; `tokenizers` parallelises inside its own call, so it gets one.
    sha256 = tokenizer_hash(need(paths.tokenizer, "tokenizer"))  # the export is checked against it, sets record it
    encoder, vocab_size, special = stage_encoder(paths.tokenizer, threads=1, sha256=sha256)
    eos = special.eos
    workers = (cfg.tokens.threads or usable_cpus()) if encoder.backend == "tiktoken" else 1
    if progress:
        print(f"tokenize: encoding with {encoder.backend} on {workers} thread(s) ({encoder.reason})")
    inputs = {split: shard_paths(need(paths.data / split, "data")) for split in ("train", "val")}
    read_text = functools.partial(read_documents, meta=False)  # the stage needs id, text and source
    tagger = None
    if cfg.tokens.language_tags:
        if not special.lang_tags:
            raise ConfigError(f"tokens.language_tags: the tokenizer {paths.tokenizer} has no language tags; set "
                              "tokenizer.language_tags (e.g. [en, zh]) and rerun `lmforge tokenizer`")
        tagger = LanguageTagger(special.lang_tags)
        # ...and the one meta value the tags need, at the same parsing cost
        read_text = functools.partial(read_documents, meta=False, meta_key=LANGUAGE_META_KEY)
    out = tokenize_splits(inputs, read_text, encoder.encode_arrays, paths.tokens, sha256, vocab_size, eos,
                          workers, dtype=cfg.tokens.dtype, progress=progress, encode_joined=encoder.encode_joined,
                          tagger=tagger)
    return {**out, "encoder": encoder.backend}


# ---------------------------------------------------------------------------- model


def build_loader(cfg: RunConfig, sources: dict[str, Any], objective: Any, rank: int = 0, world_size: int = 1) -> Any:
    """The training loader: the mixture (or each curriculum stage's) over the train token sets."""
    from lmforge.tokens.loader import PackedLoader, Stage
    from lmforge.tokens.mixture import resolve_weights

    sizes = {name: ds.n_tokens for name, ds in sources.items()}
    tc = cfg.tokens
    plan = tc.curriculum or [CurriculumStage(mixture=tc.mixture)]
    stages = [
        Stage(st.tokens, objective.window(st.seq_len or cfg.train.seq_len),
              resolve_weights(sizes, st.mixture.weights, st.mixture.temperature,
                              f"tokens.curriculum[{i}].mixture" if tc.curriculum else "tokens.mixture"),
              max_epochs=st.mixture.max_epochs)  # each stage warns past its own mixture's max_epochs
        for i, st in enumerate(plan)
    ]
    return PackedLoader(sources, stages[0].window, cfg.train.batch_size, cfg.seed, rank, world_size,
                        packing=tc.packing, long_docs=tc.long_docs, block_docs=tc.block_docs, stages=stages,
                        max_epochs=plan[0].mixture.max_epochs)


def stage_train(cfg: RunConfig, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    from lmforge.tokenizer.train import load_tokenizer
    from lmforge.train.checkpoint import find_latest, read_state
    from lmforge.train.model_setup import build_parallel_model, grow_vocabulary, import_init_from
    from lmforge.train.optim import build_optimizer
    from lmforge.train.parallel import setup
    from lmforge.train.precision import Precision
    from lmforge.train.trainer import Trainer, resolve_device

    paths = RunPaths(cfg.out)
    d = setup(cfg.train.parallel.mode, resolve_device(cfg.train.device))
    _share_batch(cfg, d.data_world)
    train_ds, val_ds = open_datasets(paths)
    imported = import_init_from(cfg)
    tokenizer = load_tokenizer(paths.tokenizer)
    tokenizer_vocab = tokenizer.get_vocab_size()
    if imported is not None:
        line = grow_vocabulary(imported, cfg, tokenizer, paths.tokenizer)
        if line and progress and d.is_main:
            print(line)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer_vocab
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} (0 = match it)"
        )
    latest = find_latest(paths.checkpoints) if cfg.train.resume else None
    if latest is not None and read_state(latest)["config"]["model"] != to_dict(cfg.model):
        raise ConfigError(
            f"{latest} was trained with another model config; use a new out_dir or train.resume=false"
        )
    model, pipeline, n_params = build_parallel_model(cfg, d, imported)
    objective = objective_for(cfg)
    loader = build_loader(cfg, train_ds, objective, rank=d.data_rank, world_size=d.data_world)
    if d.is_main:
        save_config(cfg, cfg.out / "config.yaml")
    optimizer, precision = build_optimizer(model, cfg.train.optimizer), Precision(cfg.train.precision, d.device)
    trainer = Trainer(cfg, model, loader, objective, paths.checkpoints, paths.metrics, progress=progress, dist=d,
                      pipeline=pipeline, evaluator=_periodic_eval(cfg, val_ds, objective, d, pipeline),
                      optimizer=optimizer, precision=precision)
    t0 = time.perf_counter()
    result = trainer.fit(stop_after=stop_after)
    seconds = time.perf_counter() - t0
    return {
        "params": n_params,
        "steps": result.final_step,
        "resumed_from": result.resumed_from,
        "tokens_seen": result.tokens_seen,
        "final_train_loss": result.losses[max(result.losses)] if result.losses else None,
        "seconds": seconds,
        "checkpoint": str(find_latest(paths.checkpoints)),
        "data": {**trainer.loader.stats(), "utilisation": 1 - trainer.pad_tokens / max(trainer.tokens_seen, 1)},
    }


def _periodic_eval(cfg: RunConfig, val_ds: dict[str, Any], objective: Any, d: Any, pipeline: Any) -> Any:
    """eval.every: validation loss per source during training (every rank runs it: sharded models
    need all of them for a forward; only rank 0 writes)."""
    if not cfg.eval.every:
        return None
    if pipeline is not None:
        raise ConfigError("eval.every: periodic evaluation does not run under train.parallel.mode=pp; "
                          "evaluate checkpoints with `lmforge eval eval.checkpoints=all`")
    from lmforge.eval.perplexity import evaluate_sources

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            m = evaluate_sources(model, val_ds, objective, cfg.train.seq_len, cfg.eval.batch_size,
                                 cfg.eval.every_tokens, d.device)
        model.train()
        return {"val_loss": m["loss"], **{f"val_loss/{k}": v["loss"] for k, v in m.get("sources", {}).items()}}

    return evaluate


def _share_batch(cfg: RunConfig, data_world: int) -> None:
    """A batch given in tokens is global: data-parallel ranks split its micro-batches."""
    tc = cfg.train
    if data_world == 1 or not tc.batch_tokens:
        return
    if tc.grad_accum % data_world:
        raise ConfigError(
            f"train.batch_tokens: {tc.batch_tokens:,} tokens make {tc.grad_accum} micro-batches of "
            f"{tc.batch_size} x {tc.seq_len}, which {data_world} data-parallel ranks cannot share evenly"
        )
    tc.grad_accum //= data_world


# ---------------------------------------------------------------------------- eval and use


def stage_eval(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    from lmforge.eval.perplexity import evaluate_sources, unigram_cross_entropy
    from lmforge.train.trainer import resolve_device

    if cfg.eval.checkpoints:
        from lmforge.eval.checkpoints import evaluate_checkpoints

        return evaluate_checkpoints(cfg, progress)
    paths = RunPaths(cfg.out)
    model, trained, ckpt = load_trained(cfg)
    device = resolve_device(cfg.train.device)
    train_ds, val_ds = open_datasets(paths)
    objective = objective_for(cfg, trained)

    def score(m: torch.nn.Module) -> dict[str, Any]:
        return evaluate_sources(m.to(device), val_ds, objective, trained.train.seq_len, cfg.eval.batch_size,
                        cfg.eval.max_tokens, device, progress)

    metrics: dict[str, Any] = score(model)
    # The same objective on the model as training initialised it (same seed): how far training moved
    # the validation loss, for every family alike.
    from lmforge.models import build_model

    torch.manual_seed(trained.seed)
    metrics["loss_at_init"] = score(build_model(trained.model))["loss"]
    metrics["unigram_loss"] = unigram_cross_entropy(train_ds, val_ds, trained.model.vocab_size)
    metrics["checkpoint"] = str(ckpt)
    metrics["objective"] = trained.objective.name
    if cfg.eval.tasks:
        metrics.update(_zero_shot(cfg, paths, model, trained, device))
    atomic_write_json(paths.eval, metrics)  # kept even if sampling below fails
    metrics["prompt"] = cfg.eval.generate.prompt
    metrics["sample"] = _sample(cfg, model, device)
    atomic_write_json(paths.eval, metrics)
    return metrics


def _zero_shot(cfg: RunConfig, paths: RunPaths, model: torch.nn.Module, trained: RunConfig,
               device: torch.device) -> dict[str, Any]:
    """eval.tasks: acc / acc_norm per task ("builtin": continuations of held-out documents), with each
    task's 13-gram overlap with the training documents."""
    from lmforge.data.doc_shards import read_documents
    from lmforge.eval.builtin_tasks import builtin_task_file
    from lmforge.eval.contamination import contamination
    from lmforge.eval.tasks import evaluate_tasks
    from lmforge.tokenizer.special_tokens import load_special_tokens
    from lmforge.tokenizer.train import load_tokenizer

    out: dict[str, Any] = {}
    tasks = [t for t in cfg.eval.tasks if t != "builtin"]
    built_clean = []  # its passages sharing a 13-gram with the training set were left out as it was built
    if "builtin" in cfg.eval.tasks:
        try:
            held_out, train = (read_documents(paths.data / split, meta=False) for split in ("val", "train"))
            built_clean.append(str(builtin_task_file(paths.root / "eval" / "tasks", held_out, exclude=train)))
            tasks += built_clean
        except ValueError as e:  # too few held-out documents for a task: said, not fatal
            out["zero_shot_skipped"] = f"builtin: {e}"
    if not tasks:
        return out
    tok = load_tokenizer(paths.tokenizer)
    special = load_special_tokens(paths.tokenizer, tok)
    out["zero_shot"] = evaluate_tasks(model, tok, special, tasks, trained.model.family, device, cfg.eval.batch_size)
    out["contamination"] = contamination(tasks, read_documents(paths.data / "train", meta=False), checked=built_clean)
    return out


def stage_generate(cfg: RunConfig, prompt: str | None = None, fill_mask: str | None = None,
                   lang: str | None = None) -> dict[str, Any]:
    """Sample from the trained model; `fill_mask` is for encoders (text with [MASK] placeholders);
    `lang` starts a decoder's prompt with that language's tag (tokens.language_tags)."""
    from lmforge.train.trainer import resolve_device

    model, _, ckpt = load_trained(cfg)
    if fill_mask is not None:
        if model.cfg.family != "encoder":
            raise ConfigError(f"--fill-mask needs an encoder (model.arch=encoder); this run trained {model.cfg.arch!r}")
        prompt = fill_mask
    device = resolve_device(cfg.train.device)
    return {"checkpoint": str(ckpt), "text": _sample(cfg, model.to(device), device, prompt, lang)}


def _sample(cfg: RunConfig, model: torch.nn.Module, device: torch.device, prompt: str | None = None,
            lang: str | None = None) -> str:
    """What the family does with a prompt: a decoder continues it, an encoder-decoder answers it (its
    input), an encoder fills its [MASK] placeholders."""
    from lmforge.tokenizer.special_tokens import MissingRoleError, load_special_tokens
    from lmforge.tokenizer.train import load_tokenizer

    g = cfg.eval.generate
    path = need(RunPaths(cfg.out).tokenizer, "tokenizer")
    tok = load_tokenizer(path)
    text = g.prompt if prompt is None else prompt
    special = load_special_tokens(path, tok)
    family = model.cfg.family
    if lang is not None:  # checked before sampling: a wrong code is the command's fault
        if family != "decoder":
            raise ConfigError(f"--lang: starts a decoder's prompt; this run trained a {family} ({model.cfg.arch!r})")
        try:
            special.lang_tag_id(lang, "--lang")
        except MissingRoleError as e:
            raise ConfigError(str(e)) from None
    if family == "encoder":
        from lmforge.eval.fill_mask import PLACEHOLDER, fill_mask

        if prompt is None and PLACEHOLDER not in text:  # a decoder's prompt: ask for what follows it
            text = f"{text}{PLACEHOLDER}"
        return fill_mask(model, tok, text, special, device=str(device))
    sampling = dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                    repetition_penalty=g.repetition_penalty, stop=g.stop,
                    seed=cfg.seed, device=str(device))
    if family == "encoder_decoder":
        from lmforge.eval.seq2seq import generate_seq2seq

        return generate_seq2seq(model, tok, text, special, **sampling)
    from lmforge.eval.generate import generate

    return generate(model, tok, text, special=special, lang=lang, **sampling)


def stage_export(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    from lmforge.export import exporter_for
    from lmforge.tokenizer.train import load_tokenizer

    paths = RunPaths(cfg.out)
    if cfg.export.format == "none":
        return {"path": None, "format": "none (export.format=none)"}
    model, trained, ckpt = load_trained(cfg)
    exporter = exporter_for(trained.model, trained.objective)
    out_dir = Path(cfg.export.dir) if cfg.export.dir else cfg.out / "export" / "hf"
    path = exporter.export(model, trained.model, need(paths.tokenizer, "tokenizer"), out_dir, cfg.eval.generate)
    result: dict[str, Any] = {"path": str(path), "checkpoint": str(ckpt), "format": exporter.name}
    if cfg.export.verify:
        # Compare against our own tokenizer, not the exported copy, so a lossy export cannot pass.
        check = exporter.verify(model, path, seed=cfg.seed, tokenizer=load_tokenizer(paths.tokenizer))
        result.update(check)
        if not check["max_abs_diff"] < 1e-4 or not check["tokenizer_match"]:
            raise RuntimeError(f"export check failed for {path}: {json.dumps(check)}")
    atomic_write_json(cfg.out / "export" / "check.json", result)  # the run report shows it
    return result
