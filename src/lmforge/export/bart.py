"""E7: export the BART variant to and import it from transformers' BartForConditionalGeneration.

Our module names are transformers' with attention's `o_proj` for its `out_proj` and without the
`model.` prefix, so weights move by renaming. Token embeddings: we keep one matrix (`shared`) for both
stacks. transformers 5 ties `encoder/decoder.embed_tokens` to `shared` only when it ties the output
projection too, so an untied export writes the two copies, and an import refuses a checkpoint whose
stacks read different embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn

from lmforge.config import GenerateConfig, ModelConfig, ObjectiveConfig
from lmforge.export import Exporter
from lmforge.export.hf import (
    export_tokenizer,
    generation_config,
    read_weights,
    verify_seq2seq_export,
    write_tokenizer_files,
)
from lmforge.io_utils import atomic_path
from lmforge.models import build_model
from lmforge.models.encoder_decoder import EncoderDecoderConfig

HF_CLASS = "BartForConditionalGeneration"
HF_LAYERNORM_EPS = 1e-5  # transformers' BART builds nn.LayerNorm with the default eps; no config key sets it
_STACK_EMBEDDINGS = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
_IGNORED_HF_KEYS = ("model.encoder.version", "model.decoder.version")  # fairseq leftovers in old checkpoints


def bart_exporter() -> Exporter:
    return Exporter(HF_CLASS, export_hf_bart, verify_bart, bart_refusal)


def bart_refusal(cfg: ModelConfig, objective: ObjectiveConfig | None = None) -> str | None:
    """Why BartForConditionalGeneration cannot compute what this model computes, or None."""
    assert isinstance(cfg, EncoderDecoderConfig)
    if cfg.variant != "bart":
        return f"model.variant={cfg.variant!r} (only 'bart' exports to {HF_CLASS})"
    if cfg.eps != HF_LAYERNORM_EPS:
        return f"model.norm_eps={cfg.eps} ({HF_CLASS} always uses LayerNorm eps {HF_LAYERNORM_EPS})"
    return None


def export_hf_bart(
    model: nn.Module,
    cfg: EncoderDecoderConfig,
    tokenizer_path: Path,
    out_dir: Path,
    generate: GenerateConfig | None = None,
) -> Path:
    """Write a BartForConditionalGeneration directory (config, safetensors weights, tokenizer, generation
    config) atomically to out_dir. The decoder starts from the pad token, as lmforge trains it."""
    why = bart_refusal(cfg)
    if why:
        raise ValueError(f"cannot export to {HF_CLASS}: {why}")
    tokenizer_path, special = export_tokenizer(tokenizer_path)
    pad = special.require("pad", f"the {HF_CLASS} export (its decoder start token)")
    ids = {"bos_token_id": special.bos, "eos_token_id": special.eos, "pad_token_id": pad,
           "decoder_start_token_id": pad, "forced_bos_token_id": None, "forced_eos_token_id": None}
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        bart_hf_config(cfg, ids).save_pretrained(tmp)
        save_file(bart_hf_weights(model, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer_files(tmp, tokenizer_path, special, cfg.max_seq_len)
        generation_config(ids, generate).save_pretrained(tmp)
    return out_dir


def bart_hf_config(cfg: EncoderDecoderConfig, ids: dict[str, Any]) -> transformers.BartConfig:
    """Our sizes; no dropout, since lmforge trains without it (an HF fine-tune continues the same maths)."""
    return transformers.BartConfig(
        architectures=[HF_CLASS],
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len,
        d_model=cfg.d_model,
        encoder_layers=cfg.n_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.ff_dim,
        decoder_ffn_dim=cfg.ff_dim,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=cfg.init_std,
        scale_embedding=False,
        tie_word_embeddings=cfg.tied,
        **ids,
    )


def bart_hf_weights(model: nn.Module, cfg: EncoderDecoderConfig) -> dict[str, torch.Tensor]:
    weights = {
        _hf_name(name): t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
        if not (cfg.tied and name == "lm_head.weight")  # transformers re-ties it (and the stacks') to shared
    }
    if not cfg.tied:
        for key in _STACK_EMBEDDINGS:  # copies: safetensors refuses tensors that share memory
            weights[key] = weights["model.shared.weight"].clone()
    return weights


def _hf_name(name: str) -> str:
    name = name.replace(".o_proj.", ".out_proj.")
    return name if name in ("lm_head.weight", "final_logits_bias") else f"model.{name}"


def _our_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.").replace(".out_proj.", ".o_proj.")


def verify_bart(model: nn.Module, out_dir: Path, seed: int = 0, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Load the export with transformers (fp32, eager attention, local files only) and compare logits on
    random encoder and decoder ids, and the tokenizers on a sample text."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    length = min(64, cfg.max_seq_len)
    input_ids = torch.randint(0, cfg.vocab_size, (2, length), generator=g)
    decoder_input_ids = torch.randint(0, cfg.vocab_size, (2, max(1, length // 2)), generator=g)
    return verify_seq2seq_export(
        transformers.BartForConditionalGeneration, model, out_dir, input_ids, decoder_input_ids, tokenizer
    )


def import_hf_bart(src: Path) -> tuple[nn.Module, EncoderDecoderConfig]:
    """Load a BartForConditionalGeneration directory (safetensors, single or sharded) as our BART in
    fp32, refusing what our model cannot compute."""
    src = Path(src)
    cfg = _model_config(json.loads((src / "config.json").read_text(encoding="utf-8")), src)
    weights = read_weights(src)
    shared = weights.get("model.shared.weight", weights.get(_STACK_EMBEDDINGS[0]))
    if shared is None:
        raise ValueError(f"{src}: no model.shared.weight; not a {HF_CLASS} checkpoint")
    for key in _STACK_EMBEDDINGS:
        if key in weights and not torch.equal(weights[key], shared):
            raise ValueError(f"{src}: {key} differs from model.shared.weight; lmforge's BART reads one token "
                             "embedding in both stacks")
    state = {_our_name(k): t for k, t in weights.items() if k not in _STACK_EMBEDDINGS + _IGNORED_HF_KEYS}
    state["shared.weight"] = shared
    state.setdefault("final_logits_bias", torch.zeros(1, cfg.vocab_size))  # transformers' default when absent
    if cfg.tied:
        state["lm_head.weight"] = shared  # transformers ignores a stored copy of a tied head
    model = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{src}: weights do not match a BART model of this config: {e}") from e
    return model, cfg


def _model_config(hf: dict[str, Any], src: Path) -> EncoderDecoderConfig:
    """Our config for an HF BART config, refusing features our BART does not implement (rather than
    importing a model that silently computes something else)."""
    heads, d_model = hf["encoder_attention_heads"], hf["d_model"]
    unsupported = {
        "model_type": (hf.get("model_type") != "bart", hf.get("model_type")),
        "architectures": (HF_CLASS not in hf.get("architectures", [HF_CLASS]), hf.get("architectures")),
        "scale_embedding": (bool(hf.get("scale_embedding")), hf.get("scale_embedding")),
        "activation_function": (hf.get("activation_function", "gelu") != "gelu", hf.get("activation_function")),
        # Keys of transformers 3's BartConfig for mBART-style pre-LN stacks and sinusoidal positions.
        "normalize_before": (bool(hf.get("normalize_before")), hf.get("normalize_before")),
        "add_final_layer_norm": (bool(hf.get("add_final_layer_norm")), hf.get("add_final_layer_norm")),
        "static_position_embeddings": (bool(hf.get("static_position_embeddings")),
                                       hf.get("static_position_embeddings")),
        "decoder_attention_heads": (hf["decoder_attention_heads"] != heads, hf["decoder_attention_heads"]),
        "decoder_ffn_dim": (hf["decoder_ffn_dim"] != hf["encoder_ffn_dim"], hf["decoder_ffn_dim"]),
    }
    for key, (bad, value) in unsupported.items():
        if bad:
            raise ValueError(f"{src}/config.json: {key}={value!r} is not supported by lmforge's BART "
                             "(post-LN bart, exact GELU, unscaled embeddings, one head count and MLP width)")
    if d_model % heads:
        raise ValueError(f"{src}/config.json: d_model {d_model} is not a multiple of {heads} heads")
    return EncoderDecoderConfig(
        arch="encoder_decoder",
        variant="bart",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        d_model=d_model,
        n_layers=hf["encoder_layers"],
        n_decoder_layers=hf["decoder_layers"],
        n_heads=heads,
        d_ff=hf["encoder_ffn_dim"],
        norm_eps=HF_LAYERNORM_EPS,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=float(hf.get("init_std", 0.02)),
    )
