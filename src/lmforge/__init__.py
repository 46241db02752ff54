"""lmforge: raw text to a pretrained, evaluated, exported language model.

The Python API, imported lazily so `import lmforge` stays cheap:

    import lmforge
    cfg = lmforge.load_config("recipes/bert.yaml", ["train.max_steps=100"])
    lmforge.run(cfg)                      # every stage; or lmforge.stages.stage_train(cfg) etc.
    model = lmforge.build_model(cfg.model)
    lmforge.mixture_search(cfg, grid_step=0.25)   # proxies on candidate mixtures; the best as a fragment
    lmforge.run_data_stage(cfg.data, "runs/web/data")   # cleaning alone: filters, PII, dedup, ledger
    lmforge.train_classifier([good], [bad], "models/quality")   # for quality_classifier / toxicity
    lmforge.finetune("runs/demo", "labels.jsonl", "runs/demo-cls")   # a classification head
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_config": "lmforge.recipe",
    "RunConfig": "lmforge.config",
    "ConfigError": "lmforge.errors",
    "build_model": "lmforge.models",
    "build_objective": "lmforge.objectives",
    "run": "lmforge.cli",
    "tokenizer_report": "lmforge.tokenizer.report",
    "extend_vocabulary": "lmforge.tokenizer.extend",
    "resize_token_embeddings": "lmforge.models.resize",
    "mixture_search": "lmforge",
    "stages": "lmforge",
    "run_data_stage": "lmforge.data.pipeline",
    "train_classifier": "lmforge.data.classifier",
    "load_classifier": "lmforge.data.classifier",
    "plan_dedup": "lmforge.data.dedup.lsh_plan",
    "import_hf": "lmforge.export",
    "finetune": "lmforge.finetune",
    "predict": "lmforge.finetune",
    "evaluate_checkpoints": "lmforge.eval.checkpoints",
    "scaling_law": "lmforge.scaling",
    "build_report": "lmforge.report",
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    if name in ("stages", "mixture_search"):  # submodules; mixture_search's module calls its function
        return importlib.import_module(f"lmforge.{name}")
    attr = {"run": "run_all", "plan_dedup": "format_plan"}.get(name, name)
    value = getattr(importlib.import_module(_API[name]), attr)
    globals()[name] = value
    return value
