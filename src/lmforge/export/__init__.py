"""E7: export to Hugging Face `transformers`, one exporter per architecture, each checked by reloading.

An exporter refuses (with the option's name) what its target class cannot represent, rather than
writing a model that silently computes something else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import ModelConfig, ObjectiveConfig


@dataclass(frozen=True)
class Exporter:
    name: str  # the transformers class written
    export: Callable[..., Path]  # (model, cfg, tokenizer_path, out_dir, generate) -> out_dir
    verify: Callable[..., dict[str, Any]]  # (model, out_dir, seed=, tokenizer=) -> {max_abs_diff, tokenizer_match}
    refusal: Callable[[ModelConfig, ObjectiveConfig], str | None]  # why this model cannot be exported


EXPORTERS: dict[str, Callable[[ModelConfig], Exporter]] = {}  # arch -> the exporter for a config


def exporter_for(model_cfg: ModelConfig, objective_cfg: ObjectiveConfig) -> Exporter:
    from lmforge.export import bert, hf, t5  # noqa: F401  (registers the exporters)

    if model_cfg.arch not in EXPORTERS:
        raise ValueError(f"model.arch {model_cfg.arch!r} has no Hugging Face export; known: {', '.join(EXPORTERS)}")
    exporter = EXPORTERS[model_cfg.arch](model_cfg)
    why = exporter.refusal(model_cfg, objective_cfg)
    if why:
        raise ValueError(f"cannot export to {exporter.name}: {why}")
    return exporter


def import_hf(src: Path) -> tuple[Any, ModelConfig]:
    """A Hugging Face model directory (Llama, BERT, T5 or BART) as our model and its config, fp32,
    chosen by config.json's `model_type`."""
    import json

    from lmforge.export import bart, bert, hf, t5

    importers = {"llama": hf.import_hf_llama, "bert": bert.import_hf_bert, "t5": t5.import_hf_t5,
                 "bart": bart.import_hf_bart}
    config = Path(src) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{src}: no config.json: not a Hugging Face model directory")
    kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if kind not in importers:
        raise ValueError(f"{config}: model_type {kind!r} cannot be imported; known: {', '.join(importers)}")
    return importers[kind](Path(src))
