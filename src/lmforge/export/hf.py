"""E4/E7: export the decoder to and import it from the Hugging Face Llama format, and check an export
loads back.

Our decoder uses transformers' Llama module names and RoPE layout, so weights move across by adding
or removing the `model.` prefix, with no permutation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from lmforge.config import GenerateConfig, ModelConfig, ObjectiveConfig
from lmforge.export import EXPORTERS, Exporter
from lmforge.io_utils import atomic_path, atomic_write_json
from lmforge.models import build_model
from lmforge.models.decoder import DecoderConfig
from lmforge.tokenizer.special_tokens import EOS, SpecialTokens, load_special_tokens

# Exercises byte-level merges, unicode, tabs, runs of spaces and a special token in running text.
SAMPLE_TEXT = f"Hello, world!\n\tdef f(x):  return x ** 2  # café, naïve, 日本語 ✓{EOS}Next doc."

# Non-persistent in recent transformers but present in older Llama checkpoints; we recompute it.
_IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)


def llama_refusal(cfg: ModelConfig, objective: ObjectiveConfig | None = None) -> str | None:
    """Why LlamaForCausalLM cannot compute what this decoder computes, or None."""
    assert isinstance(cfg, DecoderConfig)
    if cfg.position != "rope":
        return f"model.position={cfg.position!r} (Llama has RoPE only)"
    if cfg.sliding_window:
        return f"model.sliding_window={cfg.sliding_window} (Llama attends to the whole context)"
    if objective is not None and objective.name == "prefix_lm":
        return "a prefix decoder (objective prefix_lm): Llama attends causally everywhere"
    return None


def _rope_kwargs(cfg: DecoderConfig) -> dict[str, Any]:
    """Exact mappings only: NTK-aware scaling is RoPE with a larger base; linear interpolation is
    transformers' "linear" rope type."""
    theta = cfg.rope_theta
    if cfg.rope_scaling == "ntk":
        theta *= cfg.rope_factor ** (cfg.head_dim / (cfg.head_dim - 2))
    kwargs: dict[str, Any] = {"rope_theta": theta}
    if cfg.rope_scaling == "linear" and cfg.rope_factor != 1.0:
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    return kwargs


def export_hf_llama(
    model: nn.Module,
    cfg: DecoderConfig,
    tokenizer_path: Path,
    out_dir: Path,
    generate: GenerateConfig | None = None,
) -> Path:
    """Write a LlamaForCausalLM directory (config, safetensors weights, tokenizer, generation config)
    atomically to out_dir. `tokenizer_path` is a tokenizer.json (or a directory holding one);
    `generate` sets the sampling defaults in generation_config.json."""
    if cfg.arch != "decoder":
        raise ValueError(f"only the 'decoder' architecture exports to Llama, got model.arch={cfg.arch!r}")
    why = llama_refusal(cfg)
    if why:
        raise ValueError(f"cannot export to LlamaForCausalLM: {why}")
    tokenizer_path, special = export_tokenizer(tokenizer_path)
    eos_id = special.eos
    pad_id = special.pad if special.pad is not None else eos_id
    # Documents are packed as `... <eos> doc <eos> ...`, so EOS is also what precedes a document
    # start: it doubles as BOS (GPT-2 convention) and HF tools that prepend a BOS stay in-distribution.
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    hf_config = transformers.LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.resolved_d_ff(),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        **_rope_kwargs(cfg),
        **ids,
    )
    weights = {
        _hf_name(name): t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
        if not (cfg.tie_embeddings and name == "lm_head.weight")  # HF re-ties it from embed_tokens
    }
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        hf_config.save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer_files(tmp, tokenizer_path, special, cfg.max_seq_len, {"bos_token": "eos"})
        generation_config(ids, generate).save_pretrained(tmp)
    return out_dir


def export_tokenizer(tokenizer_path: Path) -> tuple[Path, SpecialTokens]:
    """The tokenizer.json an export copies (a directory holding one is accepted) and its role map."""
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    return tokenizer_path, load_special_tokens(tokenizer_path, Tokenizer.from_file(str(tokenizer_path)))


def verify_seq2seq_export(
    hf_class: type,
    model: nn.Module,
    out_dir: Path,
    input_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Load an encoder-decoder export as `hf_class` (fp32, eager attention, local files) and compare
    its logits with `model`'s on the given ids, and its tokenizer with `tokenizer`."""
    device = next(model.parameters()).device
    hf_model = hf_class.from_pretrained(
        Path(out_dir), dtype=torch.float32, local_files_only=True, attn_implementation="eager"
    ).to(device).eval()
    input_ids, decoder_input_ids = input_ids.to(device), decoder_input_ids.to(device)
    with torch.no_grad():
        ours = model(input_ids, decoder_input_ids=decoder_input_ids).float()
        theirs = hf_model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits.float()
    return tokenizer_check(Path(out_dir), (ours - theirs).abs().max().item(), tokenizer)


def write_tokenizer_files(
    out: Path, tokenizer_path: Path, special: SpecialTokens, max_len: int, aliases: dict[str, str] | None = None
) -> None:
    """tokenizer.json, our role map and a tokenizer_config.json naming the roles' tokens for
    transformers. `aliases` maps an HF token name to the role that plays it (Llama: bos -> eos).
    Written by hand rather than by save_pretrained: transformers 5 names its own backend class there,
    which transformers 4 cannot load; PreTrainedTokenizerFast loads in both."""
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    atomic_write_json(out / "special_tokens.json", special.to_json())
    names = {"bos_token": "bos", "eos_token": "eos", "pad_token": "pad", "mask_token": "mask",
             "cls_token": "cls", "sep_token": "sep", "unk_token": None}
    names.update(aliases or {})
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                              "clean_up_tokenization_spaces": False}
    for hf_name, role in names.items():
        if role is not None and role in special.tokens:
            config[hf_name] = special.tokens[role]
    atomic_write_json(out / "tokenizer_config.json", config)


def verify_llama(model: nn.Module, out_dir: Path, seed: int = 0, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=g)
    return verify_hf_export(model, out_dir, ids, tokenizer)


def verify_hf_export(
    model: nn.Module,
    out_dir: Path,
    input_ids: torch.Tensor,
    tokenizer: Tokenizer | None = None,
    sample_text: str = SAMPLE_TEXT,
) -> dict[str, Any]:
    """Load the export with transformers (fp32, local files only) and compare it with `model` on
    input_ids [B, T], and its tokenizer with `tokenizer` (default: the exported tokenizer.json, which
    still checks that transformers' wrapper adds nothing of its own). Compare fp32 models for a tight
    logit bound."""
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, local_files_only=True, attn_implementation="eager"
    ).to(device)
    hf_model.eval()
    input_ids = input_ids.to(device)
    with torch.no_grad():
        ours = model(input_ids).float()
        theirs = hf_model(input_ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    return tokenizer_check(out_dir, diff, tokenizer, sample_text)


def tokenizer_check(
    out_dir: Path, diff: float, tokenizer: Tokenizer | None, sample_text: str = SAMPLE_TEXT
) -> dict[str, Any]:
    """The logit check's result plus whether transformers' tokenizer of the export encodes like ours."""
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    tokenizer = tokenizer or Tokenizer.from_file(str(Path(out_dir) / "tokenizer.json"))
    our_ids = tokenizer.encode(sample_text).ids
    hf_ids = hf_tokenizer(sample_text)["input_ids"]
    return {
        "max_abs_diff": diff,
        "tokenizer_match": hf_ids == our_ids,
        "sample_text": sample_text,
    }


def import_hf_llama(src: Path) -> tuple[nn.Module, DecoderConfig]:
    """Load a LlamaForCausalLM directory (safetensors, single or sharded) as our decoder in fp32."""
    src = Path(src)
    hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg = _model_config(hf, src)
    state = {}
    for name, tensor in read_weights(src).items():
        if not name.endswith(_IGNORED_HF_KEYS):
            state[name.removeprefix("model.")] = tensor
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # some exports store a copy; HF ignores it
    model = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{src}: weights do not match a Llama model of this config: {e}") from e
    return model, cfg


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def generation_config(ids: dict[str, int], generate: GenerateConfig | None) -> Any:
    sampling: dict[str, Any] = {}
    if generate is not None:
        sampling["max_new_tokens"] = generate.max_new_tokens
        if generate.temperature > 0:  # our temperature 0 means greedy, HF's means do_sample=False
            sampling.update(
                do_sample=True, temperature=generate.temperature, top_k=generate.top_k, top_p=generate.top_p
            )
    return transformers.GenerationConfig(**ids, **sampling)


def _model_config(hf: dict[str, Any], src: Path) -> DecoderConfig:
    """Our config for an HF Llama config, refusing features our decoder does not implement (rather
    than importing a model that silently computes something else)."""
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    rope = hf.get("rope_parameters") or {}  # transformers 5; older configs keep rope_theta at top level
    scaling = hf.get("rope_scaling") or rope  # transformers 4 keeps the scaling apart
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    unsupported = {
        "model_type": (hf.get("model_type") != "llama", hf.get("model_type")),
        "hidden_act": (hf.get("hidden_act", "silu") != "silu", hf.get("hidden_act")),
        "attention_bias": (bool(hf.get("attention_bias")), hf.get("attention_bias")),
        "mlp_bias": (bool(hf.get("mlp_bias")), hf.get("mlp_bias")),
        "rope_parameters.rope_type": (rope_type not in ("default", "linear"), rope_type),  # linear is exact
        "head_dim": (hf.get("head_dim") not in (None, hidden // heads), hf.get("head_dim")),
    }
    for key, (bad, value) in unsupported.items():
        if bad:
            raise ValueError(f"{src}/config.json: {key}={value!r} is not supported by lmforge's decoder")
    if hidden % heads:
        raise ValueError(f"{src}/config.json: hidden_size {hidden} is not a multiple of {heads} heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    return DecoderConfig(
        arch="decoder",
        vocab_size=hf["vocab_size"],
        d_model=hidden,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=0 if kv_heads == heads else kv_heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        rope_scaling="linear" if rope_type == "linear" else "none",
        rope_factor=float(scaling.get("factor", 1.0)) if rope_type == "linear" else 1.0,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(load_file(str(src / shard)))
        return weights
    raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json (.bin is not read)")


EXPORTERS["decoder"] = lambda cfg: Exporter("LlamaForCausalLM", export_hf_llama, verify_llama, llama_refusal)
