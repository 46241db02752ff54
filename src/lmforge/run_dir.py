"""A run directory: where each stage reads and writes (`RunPaths`), and what later steps open from it:
the token sets checked against the run's tokenizer, the objective built with the tokenizer's roles,
and the model of a checkpoint built from the config saved with it. Below the stages, so the modules
that need these (evaluation, fine-tuning, the perplexity filter, the tokenizer report) never import
the stage functions; heavy imports stay inside the functions, so importing this is cheap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.config import RunConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunPaths:
    """Where each stage reads and writes inside out_dir."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer" / "tokenizer.json"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"


def need(path: Path, stage: str) -> Path:
    """`path`, or FileNotFoundError naming the stage that writes it."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `lmforge {stage}` first (or `lmforge run`)")
    return path


def open_datasets(paths: RunPaths) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and val token sets, {source: TokenDataset} each, checked against the run's tokenizer."""
    from lmforge.tokenizer.train import tokenizer_hash
    from lmforge.tokens.token_sets import open_split

    need(paths.tokens, "tokenize")
    train, val = open_split(paths.tokens, "train"), open_split(paths.tokens, "val")
    digest = tokenizer_hash(need(paths.tokenizer, "tokenizer"))
    for ds in [*train.values(), *val.values()]:
        ds.check_tokenizer(digest)
    return train, val


def objective_for(cfg: RunConfig, trained: RunConfig | None = None) -> Any:
    """The objective `trained` (default: `cfg`) names, built with the run's tokenizer roles."""
    from lmforge.objectives import ObjectiveContext, build_objective
    from lmforge.tokenizer.special_tokens import load_special_tokens
    from lmforge.tokenizer.train import load_tokenizer

    trained = trained or cfg
    path = need(RunPaths(cfg.out).tokenizer, "tokenizer")
    tok = load_tokenizer(path)
    ctx = ObjectiveContext(load_special_tokens(path, tok), trained.model.vocab_size, cfg.seed, tok)
    return build_objective(trained.objective, ctx)


def load_trained(cfg: RunConfig) -> tuple[torch.nn.Module, RunConfig, Path]:
    """The model of `eval.checkpoint` (default: the latest), built from the config saved with it;
    returns that saved config too (its model and objective are the ones trained)."""
    from lmforge.models import build_model
    from lmforge.recipe import config_from_dict
    from lmforge.train.checkpoint import find_latest, load_weights, read_state

    paths = RunPaths(cfg.out)
    ckpt = Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else find_latest(paths.checkpoints)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {paths.checkpoints}: run `lmforge train` first")
    trained = config_from_dict(read_state(need(ckpt, "train"))["config"])
    model = build_model(trained.model)
    load_weights(ckpt, model)
    return model.eval(), trained, ckpt
