"""Typed run configuration: the dataclasses every stage reads its section from.

This module is the schema only; `lmforge.recipe` reads a YAML recipe and dotted overrides into it
and checks them, so a typo fails at load time, before any work starts, naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import keyword
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from lmforge.errors import ConfigError

__all__ = [
    "ConfigError", "ModelConfig", "ObjectiveConfig", "OptimizerConfig", "RunConfig", "ScheduleConfig",
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
    # ISO-639-style codes (en, zh, pt-br) that each get a reserved `<|lang:xx|>` special token, after
    # the fixed roles (their ids never move); `tokens.language_tags` starts documents with them.
    language_tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check_language_tags()
        # WordPiece holds the 256 byte symbols twice (word-initial and continuation), 13 roles, the
        # language tags and 100 sentinels.
        least = {"wordpiece": 13 + len(self.language_tags) + 2 * 256 + 100}.get(self.kind, 0)
        if self.vocab_size < least:
            raise ConfigError(f"tokenizer.vocab_size: {self.kind} needs at least {least} (got {self.vocab_size})")
        if self.kind == "unigram" and self.cjk == "chars":
            # HF's Unigram trainer seeds pieces from substrings repeated across distinct pre-tokens; a
            # one-ideograph pre-token is inside no other, so no ideograph would ever get a token.
            raise ConfigError("tokenizer.cjk: 'chars' does not work with kind 'unigram' (no ideograph is learned)")

    def _check_language_tags(self) -> None:
        # Codes name tokens (`<|lang:xx|>`) and match the langid filter's meta["language"]: lowercase,
        # nothing that could end the token early, each once (a repeated token would shift no id but
        # would be reserved twice).
        seen: set[str] = set()
        for code in self.language_tags:
            if not (isinstance(code, str) and code and all(c.isascii() and (c.isalnum() or c in "-_") for c in code)
                    and code == code.lower()):
                raise ConfigError(f"tokenizer.language_tags: {code!r} is not a language code (lowercase letters, "
                                  "digits, '-' or '_', like en, zh, pt-br)")
            if code in seen:
                raise ConfigError(f"tokenizer.language_tags: {code!r} is listed twice")
            seen.add(code)
        if self.language_tags and self.from_:
            raise ConfigError("tokenizer.language_tags: only for a tokenizer lmforge trains; tokenizer.from's "
                              "tags are inferred from its own special tokens (<|lang:xx|>, <|xx|>, en_XX, __xx__)")


@dataclass
class MixtureConfig:
    """T3: how much of each source training draws, by tokens (see lmforge.tokens.mixture)."""

    weights: dict[str, float] = field(default_factory=dict)  # source -> share of tokens; {} -> temperature
    temperature: float = 1.0  # without weights: p ∝ n^(1/T) for a source of n tokens (1: natural shares)
    max_epochs: float = 4.0  # warn each time a source passes this many epochs, then one more, ... (0: never)


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
    # Start each document with its language's tag (the langid filter's meta["language"]); documents in
    # a language without a tag, or with none, get no tag. Needs tokenizer.language_tags.
    language_tags: bool = False


# ---------------------------------------------------------------- sections chosen by name
#
# `model` and `objective` are families: the recipe's `arch` / `name` picks a dataclass that the
# family registered (models/decoder.py registers DecoderConfig as arch "decoder", ...). This module
# imports no family; each registers itself through `register_variant` when it is imported.

VARIANTS: dict[type, dict[str, type]] = {}  # base dataclass -> name -> subclass


def default_variant(base: type, where: str) -> Any:
    """The registered subclass of `base` that its discriminator's default names, with its defaults
    (the section a recipe leaves out). Reading a recipe picks by name: `recipe.choose_variant`."""
    name = default_variant_name(base)
    return variant_class(base, name, where)(**{base.DISCRIMINATOR: name})


def default_variant_name(base: type) -> str:
    """The name `base`'s discriminator field defaults to (`arch: decoder`, `name: adamw`, ...)."""
    return {f.name: f.default for f in dataclasses.fields(base)}[base.DISCRIMINATOR]


def variant_class(base: type, name: str, where: str) -> type:
    table = VARIANTS.get(base, {})
    if name not in table:
        known = ", ".join(sorted(table)) or "(none registered: load configs with lmforge.load_config)"
        raise ConfigError(f"{join_key(where, base.DISCRIMINATOR)}: unknown {where} {name!r}; known: {known}")
    return table[name]


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
        raise ConfigError(f"{join_key(where, key)}: {msg} (got {value!r})")


def join_key(where: str, key: str) -> str:
    key = key[:-1] if key.endswith("_") and keyword.iskeyword(key[:-1]) else key  # messages name the recipe key
    return f"{where}.{key}" if where else key


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
    optimizer: OptimizerConfig = field(default_factory=lambda: default_variant(OptimizerConfig, "train.optimizer"))
    schedule: ScheduleConfig = field(default_factory=lambda: default_variant(ScheduleConfig, "train.schedule"))
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
    compile: bool = False  # torch.compile each block and the token loss
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
    model: ModelConfig = field(default_factory=lambda: default_variant(ModelConfig, "model"))
    objective: ObjectiveConfig = field(default_factory=lambda: default_variant(ObjectiveConfig, "objective"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def out(self) -> Path:
        return Path(self.out_dir)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    from lmforge.io_utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
