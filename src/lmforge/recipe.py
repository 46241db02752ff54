"""Reading a recipe into a run config, with every family registered: the entry point of the CLI and
the Python API.

`lmforge.config` is the schema and imports no family; this module imports them (so their config
variants are known), reads the YAML recipe and `a.b.c=value` overrides into the dataclasses, checking
every key, type and cross-field rule, and then the names that live in registries, so a typo in a
filter, optimizer or schedule fails at load, not after hours of data work.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge import models, objectives  # noqa: F401  (register architectures and objectives)
from lmforge.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    check,
    default_variant_name,
    join_key,
    variant_class,
)
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


def parse_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML recipe, then `a.b.c=value` overrides; typed and shape-checked (the
    registry names are load_config's to check)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        raw = loaded or {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    cfg = build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
        node = nxt
    node[parts[-1]] = value


def build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass `cls` from plain data, checking every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = {f"{k}_" if keyword.iskeyword(k) else k: v for k, v in data.items()}  # recipe `from` -> field `from_`
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{join_key(where, key)}: unknown key; allowed here: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], join_key(where, name))
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{join_key(where, missing[0])}: required")
    return cls(**kwargs)


def choose_variant(base: type, data: Any, where: str) -> Any:
    """The registered subclass of `base` named by data[base.DISCRIMINATOR] (or its default), built.
    A bare name stands for {DISCRIMINATOR: name} (`train.optimizer=muon`)."""
    if isinstance(data, str):
        data = {base.DISCRIMINATOR: data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    key = base.DISCRIMINATOR
    name = data.get(key, default_variant_name(base))
    return build(variant_class(base, name, where), {**data, key: name}, where)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and "DISCRIMINATOR" in vars(tp):
        return choose_variant(tp, value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict) and hasattr(tp, "from_scalar"):
            return tp.from_scalar(_coerce(str, value, key))
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # `data.inputs=my_dir/` means a one-element list
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _scalar(tp, value, key)


def _scalar(tp: type, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        as_float = _maybe_float(value)
        if as_float is not None and as_float.is_integer():
            return int(as_float)
    elif tp is float:
        as_float = _maybe_float(value)
        if as_float is not None and math.isfinite(as_float):
            return as_float
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")


def _maybe_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    checks = [
        ("seed", cfg.seed >= 0, "must be >= 0"),
        ("data.val_fraction", 0.0 < cfg.data.val_fraction < 0.5, "must be in (0, 0.5)"),
        ("data.docs_per_shard", cfg.data.docs_per_shard > 0, "must be > 0"),
        ("data.workers", cfg.data.workers >= 0, "must be >= 0 (0: every core)"),
        ("data.max_doc_bytes", cfg.data.max_doc_bytes > 0, "must be > 0"),
        ("tokenizer.vocab_size", 400 <= cfg.tokenizer.vocab_size <= 2**32 - 1, "must be in [400, 2^32)"),
        ("train.seq_len", 0 < cfg.train.seq_len <= cfg.model.max_seq_len, "must be in (0, model.max_seq_len]"),
        ("tokens.block_docs", cfg.tokens.block_docs > 0, "must be > 0"),
        ("data.task_bytes", cfg.data.task_bytes > 0, "must be > 0"),
        ("tokens.threads", cfg.tokens.threads >= 0, "must be >= 0 (0: every core)"),
        ("train.parallel.microbatches", cfg.train.parallel.microbatches > 0, "must be > 0"),
        ("tokens.mixture.temperature", cfg.tokens.mixture.temperature > 0, "must be > 0"),
        ("train.batch_size", cfg.train.batch_size > 0, "must be > 0"),
        ("train.grad_accum", cfg.train.grad_accum > 0, "must be > 0"),
        ("train.max_steps", cfg.train.max_steps > 0, "must be > 0"),
        ("train.schedule.warmup_steps", cfg.train.schedule.warmup_steps <= cfg.train.max_steps,
         "must be <= train.max_steps"),
        ("train.checkpoint_every", cfg.train.checkpoint_every > 0, "must be > 0"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints > 0, "must be > 0"),
        ("train.log_every", cfg.train.log_every > 0, "must be > 0"),
        ("train.grad_clip", cfg.train.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
        ("eval.batch_size", cfg.eval.batch_size > 0, "must be > 0"),
        ("eval.max_tokens", cfg.eval.max_tokens >= 0, "must be >= 0 (0 = the whole split)"),
        ("eval.generate.max_new_tokens", cfg.eval.generate.max_new_tokens >= 0, "must be >= 0"),
        ("eval.generate.temperature", cfg.eval.generate.temperature >= 0, "must be >= 0"),
        ("eval.generate.top_k", cfg.eval.generate.top_k >= 0, "must be >= 0 (0 disables top-k)"),
        ("eval.generate.top_p", 0.0 < cfg.eval.generate.top_p <= 1.0, "must be in (0, 1]"),
    ]
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg} (got {_get_dotted(cfg, key)!r})")
    if cfg.data.dedup in (["none"], [None]):
        cfg.data.dedup = []
    _derive_accumulation(cfg.train)
    _validate_stability(cfg.train)
    _validate_curriculum(cfg)
    cfg.train.optimizer.validate("train.optimizer")
    cfg.train.schedule.validate("train.schedule")
    cfg.model.validate("model")
    cfg.objective.validate("objective")
    if cfg.model.family not in cfg.objective.families:
        raise ConfigError(
            f"objective.name: objective {cfg.objective.name!r} cannot train model.arch {cfg.model.arch!r} "
            f"(a {cfg.model.family} model); it trains: {', '.join(cfg.objective.families)}"
        )
    cfg.objective.check_model(cfg.model, "objective")


def _derive_accumulation(tc: TrainConfig) -> None:
    """A batch given in tokens sets grad_accum; it must be whole micro-batches (for one process:
    data-parallel ranks divide it further when they start)."""
    micro = tc.batch_size * tc.seq_len
    if tc.batch_tokens:
        if tc.batch_tokens < 0 or tc.batch_tokens % micro:
            raise ConfigError(
                f"train.batch_tokens: {tc.batch_tokens:,} is not a multiple of train.batch_size x train.seq_len "
                f"= {tc.batch_size} x {tc.seq_len} = {micro:,} tokens per micro-batch"
            )
        tc.grad_accum = tc.batch_tokens // micro
    ramp = tc.batch_ramp
    if ramp.start_tokens:
        full = micro * tc.grad_accum
        if not micro <= ramp.start_tokens <= full:
            raise ConfigError(f"train.batch_ramp.start_tokens: must be in [one micro-batch = {micro:,}, the full "
                              f"batch = {full:,}] (got {ramp.start_tokens:,})")
        if ramp.ramp_tokens <= 0:
            raise ConfigError(f"train.batch_ramp.ramp_tokens: must be > 0 with a ramp (got {ramp.ramp_tokens})")


def _validate_stability(tc: TrainConfig) -> None:
    st, fi, where = tc.stability, tc.fault_injection, "train.stability"
    check("train", "keep_every", tc.keep_every >= 0, "must be >= 0 (0: keep only the newest)", tc.keep_every)
    check(where, "window", st.window >= 2, "must be >= 2 (a standard deviation needs two steps)", st.window)
    check(where, "min_steps", 2 <= st.min_steps <= st.window, "must be in [2, window]", st.min_steps)
    check(where, "z_threshold", st.z_threshold > 0, "must be > 0", st.z_threshold)
    check(where, "grad_z_threshold", st.grad_z_threshold >= 0, "must be >= 0 (0: off)", st.grad_z_threshold)
    check(where, "min_rel_std", st.min_rel_std >= 0, "must be >= 0", st.min_rel_std)
    check(where, "rewind_steps", st.rewind_steps >= 0, "must be >= 0", st.rewind_steps)
    check(where, "skip_batches", st.skip_batches >= 0, "must be >= 0", st.skip_batches)
    check(where, "max_rollbacks", st.max_rollbacks >= 0, "must be >= 0", st.max_rollbacks)
    for key, steps in (("spike_at", fi.spike_at), ("nan_at", fi.nan_at)):
        check("train.fault_injection", key, all(s > 0 for s in steps), "steps must be > 0", steps)
    check("train.fault_injection", "spike_scale", fi.spike_scale > 0, "must be > 0", fi.spike_scale)


def _validate_curriculum(cfg: RunConfig) -> None:
    """Stage lengths fit the model, and the budgets fit the run (counted for one process; more
    ranks draw more tokens per step, which only ends stages sooner)."""
    stages = cfg.tokens.curriculum
    run_tokens = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum
    for i, stage in enumerate(stages):
        where = f"tokens.curriculum[{i}]"
        seq_len = stage.seq_len or cfg.train.seq_len
        if not 0 < seq_len <= cfg.model.max_seq_len:
            raise ConfigError(f"{where}.seq_len: must be in (0, model.max_seq_len={cfg.model.max_seq_len}] "
                              f"(got {seq_len})")
        if stage.tokens < 0 or (stage.tokens == 0 and i + 1 < len(stages)):
            raise ConfigError(f"{where}.tokens: must be > 0 (0 only in the last stage: the rest of the run)")
        if stage.mixture.temperature <= 0:
            raise ConfigError(f"{where}.mixture.temperature: must be > 0 (got {stage.mixture.temperature!r})")
    budget = sum(s.tokens for s in stages)
    smallest = run_tokens * min((s.seq_len or cfg.train.seq_len) for s in stages) if stages else 0
    if stages and budget > smallest:
        raise ConfigError(
            f"tokens.curriculum: stage budgets add up to {budget:,} tokens, more than this run draws "
            f"(train.max_steps x batch_size x grad_accum x seq_len = about {smallest:,}); lower them or train longer"
        )


def _get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


