"""Loading a run config with every family registered: the entry point of the CLI and the Python API.

`lmforge.config` parses and type-checks but imports no family; this module imports them (so their
config variants are known) and then checks the names that live in registries, so a typo in a filter,
optimizer or schedule fails at load, not after hours of data work.
"""

from __future__ import annotations

from pathlib import Path

from lmforge import models, objectives  # noqa: F401  (register architectures and objectives)
from lmforge.config import RunConfig, build, parse_config
from lmforge.data.filters import build_filter
from lmforge.train import optim, schedules  # noqa: F401  (register optimizers and schedules)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML recipe, then `a.b.c=value` overrides; validated, typed."""
    cfg = parse_config(path, overrides)
    for i, spec in enumerate(cfg.data.filters):
        build_filter(spec, i)
    return cfg


def config_from_dict(raw: dict) -> RunConfig:
    """A RunConfig from its saved form (the `config` of a checkpoint's state)."""
    return build(RunConfig, raw, "")
