"""E7: export the T5 variant to, and import it from, transformers' T5ForConditionalGeneration.

Weights move by renaming (`hf_t5_name`): our stacks keep the relative bias as a module of their own,
transformers keeps it in each stack's first block. Tying changes two things in T5 at once, the shared
output matrix and the d_model^-0.5 rescaling of the decoder output; transformers 4 reads both from
`tie_word_embeddings`, transformers 5 writes `scale_decoder_outputs` and ties only when the checkpoint
has no separate `lm_head`. Exports satisfy both readings; imports accept either.
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
from lmforge.export import EXPORTERS, Exporter
from lmforge.export.hf import (
    export_tokenizer,
    generation_config,
    read_weights,
    verify_seq2seq_export,
    write_tokenizer_files,
)
from lmforge.io_utils import atomic_path, atomic_write_json
from lmforge.models.encoder_decoder import EncoderDecoderConfig
from lmforge.models.t5 import T5Model

_ATTENTION = {"self_attn": "SelfAttention", "cross_attn": "EncDecAttention"}
_PROJ = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
# Stored by some checkpoints, ignored by transformers: copies of `shared`, and a bias nothing reads.
_IGNORED_HF_KEYS = frozenset({"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"})
# The tanh GELU under its transformers names; "gated-gelu" itself means gelu_new.
_TANH_GELU = frozenset({"gelu", "gelu_new", "gelu_pytorch_tanh"})


def t5_refusal(cfg: ModelConfig, objective: ObjectiveConfig | None = None) -> str | None:
    """T5ForConditionalGeneration computes every option of the t5 variant; only BART is not T5."""
    assert isinstance(cfg, EncoderDecoderConfig)
    return None if cfg.variant == "t5" else f"model.variant={cfg.variant!r} is not T5"


def hf_t5_name(name: str) -> str:
    """transformers' name of one of our T5 parameters."""
    if name in ("shared.weight", "lm_head.weight"):
        return name
    stack, rest = name.split(".", 1)
    if rest == "final_norm.weight":
        return f"{stack}.final_layer_norm.weight"
    if rest == "relative_bias.relative_attention_bias.weight":
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    _, i, part, leaf = rest.split(".", 3)  # layers.<i>.<part>.<leaf>
    mlp = 2 if stack == "decoder" else 1  # the decoder's block has cross-attention as sublayer 1
    sublayer = {"self_attn_norm": 0, "self_attn": 0, "cross_attn_norm": 1, "cross_attn": 1,
                "mlp_norm": mlp, "mlp": mlp}[part]
    if part.endswith("_norm"):
        return f"{stack}.block.{i}.layer.{sublayer}.layer_norm.{leaf}"
    if part == "mlp":
        return f"{stack}.block.{i}.layer.{sublayer}.DenseReluDense.{leaf}"
    proj, tail = leaf.split(".", 1)
    return f"{stack}.block.{i}.layer.{sublayer}.{_ATTENTION[part]}.{_PROJ[proj]}.{tail}"


def hf_t5_config(cfg: EncoderDecoderConfig, ids: dict[str, int]) -> Any:
    return transformers.T5Config(
        architectures=["T5ForConditionalGeneration"],
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.head_dim,
        d_ff=cfg.ff_dim,
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=0.0,  # lmforge trains without dropout (as T5 v1.1 pretrained)
        layer_norm_epsilon=cfg.eps,
        initializer_factor=1.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=cfg.tied,
        **ids,
    )


def export_hf_t5(
    model: nn.Module,
    cfg: EncoderDecoderConfig,
    tokenizer_path: Path,
    out_dir: Path,
    generate: GenerateConfig | None = None,
) -> Path:
    """Write a T5ForConditionalGeneration directory (config, safetensors, tokenizer, generation config)
    atomically to out_dir. The decoder starts from the pad token, as in T5 and in lmforge's objectives."""
    why = t5_refusal(cfg)
    if why:
        raise ValueError(f"cannot export to T5ForConditionalGeneration: {why}")
    tokenizer_path, special = export_tokenizer(tokenizer_path)
    pad_id = special.require("pad", "the T5 export (its decoder start token)")
    ids = {"decoder_start_token_id": pad_id, "eos_token_id": special.eos, "pad_token_id": pad_id}
    weights = {
        hf_t5_name(name): t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
        if not (cfg.tied and name == "lm_head.weight")  # transformers re-ties it from `shared`
    }
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        hf_t5_config(cfg, ids).save_pretrained(tmp)
        # transformers 5 saves tie_word_embeddings=true whatever the model; transformers 4 would tie and
        # rescale an untied model by it, so the file says what the model is.
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        atomic_write_json(tmp / "config.json", {**config, "tie_word_embeddings": cfg.tied})
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer_files(tmp, tokenizer_path, special, cfg.max_seq_len)
        generation_config(ids, generate).save_pretrained(tmp)
    return out_dir


def verify_t5(model: nn.Module, out_dir: Path, seed: int = 0, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Random encoder and decoder ids through both models; see `verify_t5_export`."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=g)
    decoder_input_ids = torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=g)
    return verify_t5_export(model, out_dir, input_ids, decoder_input_ids, tokenizer)


def verify_t5_export(
    model: nn.Module,
    out_dir: Path,
    input_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """The T5 export against `model` on the given ids (see hf.verify_seq2seq_export)."""
    return verify_seq2seq_export(
        transformers.T5ForConditionalGeneration, model, out_dir, input_ids, decoder_input_ids, tokenizer
    )


def import_hf_t5(src: Path) -> tuple[T5Model, EncoderDecoderConfig]:
    """Load a T5ForConditionalGeneration directory (T5 v1.1 layout, safetensors) as our T5 in fp32,
    refusing what lmforge's T5 does not compute (rather than importing a different model)."""
    src = Path(src)
    hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    _check_supported(hf, src)
    weights = {k: v for k, v in read_weights(src).items() if k not in _IGNORED_HF_KEYS}
    tied = _output_layer(hf, weights, src)
    cfg = EncoderDecoderConfig(
        arch="encoder_decoder",
        variant="t5",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("n_positions") or 512,  # T5 has no position limit; 512 is its pretraining length
        d_model=hf["d_model"],
        n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        n_heads=hf["num_heads"],
        d_kv=hf["d_kv"],
        d_ff=hf["d_ff"],
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        tie_embeddings=tied,
    )
    cfg.validate("model")
    model = T5Model(cfg)
    ours = {hf_t5_name(name): name for name in model.state_dict() if not (tied and name == "lm_head.weight")}
    unknown, missing = sorted(set(weights) - set(ours)), sorted(set(ours) - set(weights))
    if unknown or missing:
        raise ValueError(f"{src}: weights do not match a T5 v1.1 model of this config: "
                         f"unexpected {unknown[:5]}, missing {missing[:5]}")
    state = {ours[k]: v for k, v in weights.items()}
    if tied:
        state["lm_head.weight"] = state["shared.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{src}: weights do not match a T5 v1.1 model of this config: {e}") from e
    return model, cfg


def _check_supported(hf: dict[str, Any], src: Path) -> None:
    """A T5 with v1.1's gated tanh-GELU MLP; the original T5's ReLU MLP is another model."""
    if hf.get("model_type") != "t5":
        raise ValueError(f"{src}/config.json: model_type={hf.get('model_type')!r} is not 't5'")
    proj = hf.get("feed_forward_proj", "relu")
    gated, act = proj.startswith("gated-"), proj.split("-")[-1]
    if not gated:
        raise ValueError(f"{src}/config.json: feed_forward_proj={proj!r} (is_gated_act False, T5 v1.0's "
                         f"ungated MLP) is not supported: lmforge's T5 is v1.1 (feed_forward_proj 'gated-gelu')")
    if act not in _TANH_GELU:
        raise ValueError(f"{src}/config.json: feed_forward_proj={proj!r} is not supported: lmforge's T5 "
                         f"gates with the tanh GELU ('gated-gelu')")


def _output_layer(hf: dict[str, Any], weights: dict[str, torch.Tensor], src: Path) -> bool:
    """Whether the checkpoint computes tied logits (`shared` as output matrix, decoder output rescaled):
    True; or an output matrix of its own without rescaling: False, with `lm_head.weight` set in
    `weights`. Tied but unscaled (what transformers 5 builds for tie_word_embeddings=False when nothing
    is stored to untie it) imports exactly as untied with a copy of `shared`."""
    head = weights.get("lm_head.weight")
    if "scale_decoder_outputs" in hf:  # transformers 5: ties whenever no different lm_head is stored
        scaled = bool(hf["scale_decoder_outputs"])
        tied = head is None or torch.equal(head, weights["shared.weight"])
    else:  # transformers 4: one flag ties and rescales; a stored lm_head is ignored when tied
        tied = scaled = bool(hf.get("tie_word_embeddings", True))
    if scaled and not tied:
        raise ValueError(f"{src}: scale_decoder_outputs with an lm_head separate from the embeddings is not "
                         f"supported: lmforge's T5 rescales decoder outputs only when the embeddings are tied")
    if scaled:
        weights.pop("lm_head.weight", None)
        return True
    if head is None and "scale_decoder_outputs" not in hf:
        raise ValueError(f"{src}: tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    weights["lm_head.weight"] = (head if head is not None else weights["shared.weight"]).clone()
    return False


def encoder_decoder_exporter(cfg: ModelConfig) -> Exporter:
    assert isinstance(cfg, EncoderDecoderConfig)
    if cfg.variant == "bart":
        from lmforge.export.bart import bart_exporter

        return bart_exporter()
    return Exporter("T5ForConditionalGeneration", export_hf_t5, verify_t5, t5_refusal)


EXPORTERS["encoder_decoder"] = encoder_decoder_exporter
