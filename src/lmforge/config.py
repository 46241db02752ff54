"""Typed run configuration: dataclasses loaded from YAML, with dotted CLI overrides.

Every stage reads its own section; `run` reads them all. Validation happens at load time so a typo
in a recipe fails before any work starts, with the dotted key that is wrong.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from lmforge.errors import ConfigError

__all__ = [
    "ConfigError", "ModelConfig", "ObjectiveConfig", "OptimizerConfig", "RunConfig", "ScheduleConfig", "parse_config",
    "register_variant",
]


@dataclass
class InputConfig:
    """One user data source: a file, a directory or a glob."""

    path: str
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    source: str | None = None  # label; None -> the record's `source` field, else the file's stem
    text_key: str = "text"
    id_key: str = "id"

    @classmethod
    def from_scalar(cls, value: str) -> InputConfig:
        return cls(path=value)


@dataclass
class BuiltinCorpusConfig:
    """The default corpus built from the Python standard library on this machine."""

    max_prose_bytes: int = 2_500_000
    max_code_bytes: int = 2_500_000
    min_docstring_chars: int = 200


@dataclass
class DataConfig:
    inputs: list[InputConfig] = field(default_factory=list)  # empty -> built-in corpus
    builtin: BuiltinCorpusConfig = field(default_factory=BuiltinCorpusConfig)
    # Each filter: a bare name (`pii`: its defaults) or {name: <registered filter>, sources: [..] or
    # absent for all, <its options>}; applied in order, so cheap rules first make a cascade.
    filters: list[Any] = field(
        default_factory=lambda: [
            {"name": "min_words", "min_words": 25},
            {"name": "symbol_ratio", "max_ratio": 0.1, "skip_sources": ["code"]},
            {"name": "stop_words", "skip_sources": ["code"]},
        ]
    )
    # Cross-document steps in order, each a bare name or {name: ..., <options>}: exact, minhash,
    # substring, repeated_sentences. `none` or [] for no dedup.
    dedup: list[Any] = field(default_factory=lambda: ["exact"])
    val_fraction: float = 0.02
    # train/val membership hashes the document id with this seed, never the training seed, so a seed
    # sweep evaluates every run on the same validation documents.
    split_seed: int = 1234
    docs_per_shard: int = 20_000
    workers: int = 0  # processes for the shard tasks; 0: every core once the input is 32 MB or more
    # An input's files go to tasks in file order, a task closing once it holds this many bytes (a
    # larger file is a task of its own): a folder of 100k small files is a few tasks, not 100k.
    task_bytes: int = 16 << 20
    executor: Literal["local", "ray"] = "local"  # ray: the same tasks on a Ray cluster (lmforge[ray])
    max_doc_bytes: int = 64 << 20  # one record larger than this is quarantined unread
    # An alarm for every dedup step: one removing more than this share of a source's documents (of a
    # source with >= 100 documents) stops the stage with a report before any output is written.
    # 0 turns it off; minhash also has its own (max_removed_share, max_cluster).
    max_dedup_share: float = 0.0


@dataclass
class TokenizerConfig:
    """Every kind is byte-level (any text encodes, no unknown token); see lmforge.tokenizer.train."""

    kind: Literal["bpe", "unigram", "wordpiece"] = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2  # bpe and wordpiece; unigram has no such option
    max_train_bytes: int = 200_000_000
    pre_tokenizer: Literal["gpt2", "gpt4"] = "gpt2"  # the GPT-2 or the cl100k (GPT-4) split regex
    split_digits: bool = False  # every digit its own pre-token
    cjk: Literal["none", "chars"] = "none"  # chars: every CJK ideograph its own pre-token, as BERT
    normalizer: Literal["none", "nfc", "nfkc"] = "none"
    from_: str = ""  # recipe key `from`: a tokenizer.json or HF directory used instead of training

    def __post_init__(self) -> None:
        # WordPiece holds the 256 byte symbols twice (word-initial and continuation), 13 roles, 100 sentinels.
        least = {"wordpiece": 13 + 2 * 256 + 100}.get(self.kind, 0)
        if self.vocab_size < least:
            raise ConfigError(f"tokenizer.vocab_size: {self.kind} needs at least {least} (got {self.vocab_size})")
        if self.kind == "unigram" and self.cjk == "chars":
            # HF's Unigram trainer seeds pieces from substrings repeated across distinct pre-tokens; a
            # one-ideograph pre-token is inside no other, so no ideograph would ever get a token.
            raise ConfigError("tokenizer.cjk: 'chars' does not work with kind 'unigram' (no ideograph is learned)")


@dataclass
class MixtureConfig:
    """T3: how much of each source training draws, by tokens (see lmforge.tokens.mixture)."""

    weights: dict[str, float] = field(default_factory=dict)  # source -> share of tokens; {} -> temperature
    temperature: float = 1.0  # without weights: p ∝ n^(1/T) for a source of n tokens (1: natural shares)
    max_epochs: float = 4.0  # warn when a source starts more epochs than this (0: never)


@dataclass
class CurriculumStage:
    """T4: one stage of a curriculum: its token budget, sequence length and mixture."""

    tokens: int = 0  # tokens drawn in this stage; 0 in the last stage: the rest of the run
    seq_len: int = 0  # 0 -> train.seq_len
    mixture: MixtureConfig = field(default_factory=MixtureConfig)


@dataclass
class TokensConfig:
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    # `lmforge tokenize`'s tiktoken threads; 0: every core this process may use. The `tokenizers`
    # fallback parallelises inside its own calls (RAYON_NUM_THREADS sets its pool).
    threads: int = 0
    packing: Literal["greedy", "best_fit"] = "greedy"  # best_fit: every row starts at a document start
    long_docs: Literal["crop", "split"] = "crop"  # best_fit: a document longer than a row
    block_docs: int = 1024  # best_fit packs this many shuffled documents at a time
    # Padded (encoder, encoder-decoder) examples: a step's rows regrouped by length, padding columns cut
    length_buckets: bool = False
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    curriculum: list[CurriculumStage] = field(default_factory=list)  # empty: one stage, `mixture`


# ---------------------------------------------------------------- sections chosen by name
#
# `model` and `objective` are families: the recipe's `arch` / `name` picks a dataclass that the
# family registered (models/decoder.py registers DecoderConfig as arch "decoder", ...). This module
# imports no family; each registers itself through `register_variant` when it is imported.

VARIANTS: dict[type, dict[str, type]] = {}  # base dataclass -> name -> subclass


def register_variant(base: type, name: str, cls: type) -> None:
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, base)):
        raise TypeError(f"{cls.__name__} must be a dataclass subclassing {base.__name__}")
    table = VARIANTS.setdefault(base, {})
    if table.get(name, cls) is not cls:
        raise ValueError(f"{base.__name__} variant {name!r} is registered twice")
    table[name] = cls


@dataclass
class ModelConfig:
    """What every architecture's config has; `arch` chooses the subclass."""

    DISCRIMINATOR: ClassVar[str] = "arch"
    family: ClassVar[str] = ""  # decoder | encoder | encoder_decoder: which objectives can train it

    arch: str = "decoder"
    vocab_size: int = 0  # 0 -> taken from the trained tokenizer
    max_seq_len: int = 1024

    def validate(self, where: str) -> None:
        """Shape checks of this family, raising ConfigError with `where.<key>`."""
        check(where, "max_seq_len", self.max_seq_len > 0, "must be > 0", self.max_seq_len)
        check(where, "vocab_size", self.vocab_size >= 0, "must be >= 0 (0 = the tokenizer's)", self.vocab_size)


@dataclass
class ObjectiveConfig:
    """What every objective's config has; `name` chooses the subclass."""

    DISCRIMINATOR: ClassVar[str] = "name"
    families: ClassVar[tuple[str, ...]] = ()  # model families it can train

    name: str = "lm"

    def validate(self, where: str) -> None:
        """Option checks of this objective, raising ConfigError with `where.<key>`."""

    def check_model(self, model: ModelConfig, where: str) -> None:
        """Checks that need the model too (MLM with NSP needs an NSP head), after `families` passed."""


@dataclass
class OptimizerConfig:
    """What every optimizer's config has; `name` chooses the subclass (lmforge.train.optim)."""

    DISCRIMINATOR: ClassVar[str] = "name"

    name: str = "adamw"
    lr: float = 3e-3  # the peak learning rate the schedule scales
    weight_decay: float = 0.1  # matrices only, never norms, biases or (for some) embeddings

    def validate(self, where: str) -> None:
        check(where, "lr", self.lr > 0, "must be > 0", self.lr)
        check(where, "weight_decay", self.weight_decay >= 0, "must be >= 0", self.weight_decay)


@dataclass
class ScheduleConfig:
    """What every LR schedule's config has; `name` chooses the subclass (lmforge.train.schedules).
    Schedules run on tokens seen, counted in steps of the full batch, so a batch ramp keeps them."""

    DISCRIMINATOR: ClassVar[str] = "name"

    name: str = "cosine"
    warmup_steps: int = 20  # linear warmup, in full-batch steps (of tokens)
    warmup_from: float = 0.0  # the warmup starts at this fraction of the peak (0: from zero)
    min_lr_ratio: float = 0.1  # the floor the decay ends at, as a fraction of the peak

    def validate(self, where: str) -> None:
        check(where, "warmup_steps", self.warmup_steps >= 0, "must be >= 0", self.warmup_steps)
        check(where, "warmup_from", 0.0 <= self.warmup_from <= 1.0, "must be in [0, 1]", self.warmup_from)
        check(where, "min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "must be in [0, 1]", self.min_lr_ratio)


def check(where: str, key: str, ok: bool, msg: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{_join(where, key)}: {msg} (got {value!r})")


@dataclass
class BatchRampConfig:
    """P3: GPT-3's batch-size ramp: the batch grows linearly from `start_tokens` to the full batch
    over the first `ramp_tokens` tokens, in whole micro-batches (off while start_tokens is 0)."""

    start_tokens: int = 0
    ramp_tokens: int = 0


@dataclass
class StabilityConfig:
    """P4: loss-spike / NaN detection with automatic rollback (PaLM §5.1; lmforge.train.stability).
    A step is a spike when its loss or gradient norm is non-finite, or its loss (and with grad_z_threshold
    its gradient norm) scores more than a z-score above the mean of the last `window` good steps (after
    `min_steps` of them). The step is not applied; training restarts from the newest checkpoint at least
    `rewind_steps` before the spike, skips batches, and goes on."""

    enabled: bool = True  # off: a non-finite loss or gradient stops the run (NonFiniteLoss), spikes train on
    window: int = 50  # good steps whose mean and standard deviation the z-scores use
    min_steps: int = 20  # good steps seen before z-scores are judged (warmup losses move fast)
    # Healthy small runs measured (6 runs of 500-600 steps on the built-in corpus): loss z-scores up to 2.9,
    # gradient-norm z-scores up to 19 (a 4.5x blip with the loss unmoved): the norm is heavy-tailed and
    # clipping makes such blips harmless, so by default only the loss is judged, as PaLM did.
    z_threshold: float = 6.0  # loss z-score that is a spike
    grad_z_threshold: float = 0.0  # gradient-norm z-score that is a spike (0: off; NaN/Inf is always judged)
    min_rel_std: float = 0.02  # std floor, as a fraction of the mean: a flat window makes any wiggle huge
    rewind_steps: int = 10  # restart from the newest checkpoint at least this many steps before the spike
    skip_batches: int = 20  # global batches skipped from the restored position (at least up to the spike)
    max_rollbacks: int = 5  # give up (TrainingDiverged) after this many without a checkpoint past the spike


@dataclass
class FaultInjectionConfig:
    """Drills and tests of P4: at these steps the loss (so the gradients too) is multiplied by
    `spike_scale`, or made NaN; each fires once per run, rollbacks and resumes included."""

    spike_at: list[int] = field(default_factory=list)
    nan_at: list[int] = field(default_factory=list)
    spike_scale: float = 1e4


@dataclass
class ParallelConfig:
    """S2: how the processes torchrun starts share the work (lmforge.train.parallel)."""

    mode: Literal["none", "ddp", "fsdp", "tp", "pp"] = "none"
    microbatches: int = 2  # pp: micro-batches per micro-batch of train.batch_size rows (GPipe)
    cpu_offload: bool = False  # fsdp: parameters, gradients and the optimizer step on the CPU
    checkpoint_format: Literal["auto", "safetensors", "dcp"] = "auto"  # auto: dcp with several processes


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    batch_tokens: int = 0  # tokens per optimizer step; > 0 derives grad_accum = batch_tokens / (batch_size x seq_len)
    batch_ramp: BatchRampConfig = field(default_factory=BatchRampConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    max_steps: int = 500
    # Chosen by name: `train.optimizer.name=muon` (or `train.optimizer=muon`), each with its own keys.
    optimizer: OptimizerConfig = field(default_factory=lambda: choose_variant(OptimizerConfig, {}, "train.optimizer"))
    schedule: ScheduleConfig = field(default_factory=lambda: choose_variant(ScheduleConfig, {}, "train.schedule"))
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, forever (0: none)
    log_every: int = 10
    resume: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Weights, gradients and optimizer state stay fp32; bf16 / fp16 autocast the compute (fp16 with
    # dynamic loss scaling).
    # Continual pretraining: start from this Hugging Face model directory (Llama, BERT, T5, BART);
    # the model section is then the checkpoint's own. Pair with tokenizer.from=<the same dir>.
    init_from: str = ""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"  # recompute in backward to save memory
    compile: bool = False  # torch.compile each block
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    fault_injection: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)


@dataclass
class GenerateConfig:
    prompt: str = "def "
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL's rule)
    stop: list[str] = field(default_factory=list)  # generation ends at the first of these strings


@dataclass
class EvalConfig:
    max_tokens: int = 0  # 0 -> the whole validation split
    batch_size: int = 8
    checkpoint: str = ""  # "" -> latest
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    # During training: validation loss per source every `every` steps (0: only `lmforge eval`), on
    # `every_tokens` tokens of each source, logged as val_loss and val_loss/<source> in metrics.jsonl.
    every: int = 0
    every_tokens: int = 16384
    # `lmforge eval` over several checkpoints: step numbers or checkpoint directories ("all": every
    # kept one); writes eval_checkpoints.json and a loss-vs-tokens plot.
    checkpoints: list[str] = field(default_factory=list)
    # Zero-shot tasks: JSONL files of {"id", "context", "choices": [...], "gold": k}; "builtin" adds
    # the small task set made from the built-in corpus.
    tasks: list[str] = field(default_factory=list)


@dataclass
class ExportConfig:
    format: Literal["auto", "none"] = "auto"  # auto: the family's transformers class; none: no export
    dir: str = ""  # "" -> <out_dir>/export/hf
    verify: bool = True


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    seed: int = 1234
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    model: ModelConfig = field(default_factory=lambda: choose_variant(ModelConfig, {}, "model"))
    objective: ObjectiveConfig = field(default_factory=lambda: choose_variant(ObjectiveConfig, {}, "objective"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def out(self) -> Path:
        return Path(self.out_dir)


# ---------------------------------------------------------------- loading and validation


def parse_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML recipe, then `a.b.c=value` overrides; typed and shape-checked.
    Registry names (filters, optimizers, ...) are checked by `lmforge.recipe.load_config`, which
    imports the families first; use that one."""
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
                f"{_join(where, key)}: unknown key; allowed here: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _join(where, name))
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_join(where, missing[0])}: required")
    return cls(**kwargs)


def choose_variant(base: type, data: Any, where: str) -> Any:
    """The registered subclass of `base` named by data[base.DISCRIMINATOR] (or its default), built.
    A bare name stands for {DISCRIMINATOR: name} (`train.optimizer=muon`)."""
    if isinstance(data, str):
        data = {base.DISCRIMINATOR: data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    key = base.DISCRIMINATOR
    default = {f.name: f.default for f in dataclasses.fields(base)}[key]
    name = data.get(key, default)
    table = VARIANTS.get(base, {})
    if name not in table:
        known = ", ".join(sorted(table)) or "(none registered: load configs with lmforge.load_config)"
        raise ConfigError(f"{_join(where, key)}: unknown {where} {name!r}; known: {known}")
    return build(table[name], {**data, key: name}, where)


def _join(where: str, key: str) -> str:
    key = key[:-1] if key.endswith("_") and keyword.iskeyword(key[:-1]) else key  # messages name the recipe key
    return f"{where}.{key}" if where else key


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


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    from lmforge.io_utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
