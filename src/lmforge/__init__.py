"""lmforge: raw text to a pretrained, evaluated, exported language model.

The Python API, imported lazily so `import lmforge` stays cheap:

    import lmforge
    cfg = lmforge.load_config("recipes/bert.yaml", ["train.max_steps=100"])
    lmforge.run(cfg)                      # every stage; or lmforge.stages.stage_train(cfg) etc.
    model = lmforge.build_model(cfg.model)
    lmforge.mixture_search(cfg, grid_step=0.25)   # proxies on candidate mixtures; the best as a fragment
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
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    if name in ("stages", "mixture_search"):  # submodules; mixture_search's module calls its function
        return importlib.import_module(f"lmforge.{name}")
    value = getattr(importlib.import_module(_API[name]), "run_all" if name == "run" else name)
    globals()[name] = value
    return value
