"""The model a training run starts from: imported (train.init_from) or built, then parallelised
and initialised in the order train.parallel.mode needs (stage_train calls these; parallel.py holds
the wrappers themselves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.config import ConfigError, RunConfig


def import_init_from(cfg: RunConfig) -> torch.nn.Module | None:
    """train.init_from: the imported model, whose config replaces the recipe's model section (a
    checkpoint of this run, if any, is loaded over its weights by the trainer, as any resume)."""
    if not cfg.train.init_from:
        return None
    from lmforge.export import import_hf

    model, model_cfg = import_hf(Path(cfg.train.init_from))
    cfg.model = model_cfg
    model_cfg.validate("model")
    if cfg.model.family not in cfg.objective.families:
        raise ConfigError(f"train.init_from: {cfg.train.init_from} is a {cfg.model.family} model; objective "
                          f"{cfg.objective.name!r} trains: {', '.join(cfg.objective.families)}")
    return model


def grow_vocabulary(model: torch.nn.Module, cfg: RunConfig, tokenizer: Any, tokenizer_path: Path) -> str | None:
    """train.init_from with an extended tokenizer (`lmforge extend-vocab`, then `tokenizer.from`): the
    imported model gets rows for the new ids, each the mean of the rows of the model's own tokens
    (models.resize), also where the model has padding rows past its tokenizer (they were never
    trained, and the new ids take them first). Refused unless the run's tokenizer keeps every id of
    the model's own tokenizer (its tokenizer.json), since the old rows are indexed by those ids.
    `tokenizer`: the run's, loaded from `tokenizer_path`. Returns a line saying what was done, or None
    when the run's tokenizer adds nothing."""
    from tokenizers import Tokenizer

    from lmforge.models.resize import resize_token_embeddings

    rows, new_size = cfg.model.vocab_size, tokenizer.get_vocab_size()
    own = Path(cfg.train.init_from) / "tokenizer.json"
    if not own.is_file():
        if rows >= new_size:
            return None
        raise ConfigError(f"train.init_from: {cfg.train.init_from} has {rows} token rows, the run's tokenizer "
                          f"{new_size} tokens, and no tokenizer.json to check that the old ids kept their meaning; "
                          "add the model's tokenizer.json there, or use the model's own tokenizer (tokenizer.from)")
    old_tokenizer = Tokenizer.from_file(str(own))
    old_size = old_tokenizer.get_vocab_size()
    if new_size <= old_size:
        return None
    new_vocab = tokenizer.get_vocab()
    moved = [t for t, i in old_tokenizer.get_vocab().items() if new_vocab.get(t) != i]
    if moved:
        raise ConfigError(f"train.init_from: the run's tokenizer ({tokenizer_path}) is not an extension of {own}: "
                          f"{len(moved)} of its tokens have other ids or are missing (e.g. {moved[0]!r}); an "
                          "extension keeps every old id (lmforge extend-vocab)")
    size = max(rows, new_size)
    resize_token_embeddings(model, size, real_rows=old_size)
    cfg.model.vocab_size = size
    return (f"train.init_from: {new_size - old_size:,} new tokens ({old_size:,} -> {new_size:,}); the model's "
            f"{rows:,} embedding and output rows become {size:,}, rows from {min(old_size, rows):,} on starting "
            "at the mean of the model's own tokens' rows")


def build_parallel_model(cfg: RunConfig, d: Any, imported: torch.nn.Module | None) -> tuple[Any, Any, int]:
    """(model, pipeline runner or None, parameter count): built, parallelised and initialised in
    torchtitan's order where the layout splits parameters (fsdp, tp): on the meta device, then
    wrapped, then each rank materialises and initialises only its own pieces, so no rank ever holds
    the whole model. `models.init` draws every piece as the unsplit model would, so 1 and N ranks
    start from identical weights. ddp and pp replicate or cut a whole model, built and initialised
    first."""
    from lmforge.models import build_model, count_params, materialize

    torch.manual_seed(cfg.seed)
    meta_first = imported is None and d.world > 1 and d.mode in ("fsdp", "tp")
    if imported is not None:
        model = imported.to(d.device)
    else:
        model = build_model(cfg.model, init=not meta_first, device=d.device)
    n_params = count_params(model)  # before a pipeline cuts it; meta parameters have their sizes
    model, pipeline = _wrap(cfg, model, d)
    if meta_first:
        # FSDP's CPU offload keeps the shards on the host: they are created there (as torchtitan does).
        materialize(model, "cpu" if cfg.train.parallel.cpu_offload else d.device)
        model.init_weights()
    return model, pipeline, n_params


def _wrap(cfg: RunConfig, model: torch.nn.Module, d: Any) -> tuple[torch.nn.Module, Any]:
    """The model as train.parallel.mode wraps it, and the pipeline runner for pp (else None)."""
    from lmforge.train.parallel import parallelize

    tc = cfg.train
    if d.mode != "pp" or d.world == 1:
        return parallelize(model, d, tc.parallel.cpu_offload, tc.activation_checkpointing, tc.compile), None
    from lmforge.train.pipeline import PipelineRunner

    if cfg.objective.name != "lm" or getattr(cfg.objective, "document_mask", False):
        raise ConfigError("train.parallel.mode: pp trains the plain `lm` objective (no document_mask)")
    if tc.precision == "fp16" or tc.activation_checkpointing != "none" or tc.compile:
        raise ConfigError("train.parallel.mode: pp runs without fp16 loss scaling, activation checkpointing "
                          "and compile for now; use bf16 / fp32 and leave those off")
    pipeline = PipelineRunner(model, d, cfg.train.parallel.microbatches)
    return pipeline.module, pipeline
