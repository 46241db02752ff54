"""E7: export the encoder to Hugging Face BERT (BertForPreTraining with an NSP head, else
BertForMaskedLM) and import either back, each checked by reloading.

Module names differ from transformers' (attention uses lmforge's q/k/v/o projections), so weights
move through one name table; the MLM decoder is the word embedding matrix on both sides.
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

from lmforge.config import ModelConfig, ObjectiveConfig
from lmforge.export import EXPORTERS, Exporter
from lmforge.export.hf import export_tokenizer, read_weights, tokenizer_check, write_tokenizer_files
from lmforge.io_utils import atomic_path
from lmforge.models import build_model
from lmforge.models.encoder import EncoderConfig
from lmforge.objectives.base import AttentionLayout

# Our module path -> transformers' (parameter names .weight/.bias follow unchanged).
_TOP = {
    "word_embeddings": "bert.embeddings.word_embeddings",
    "position_embeddings": "bert.embeddings.position_embeddings",
    "token_type_embeddings": "bert.embeddings.token_type_embeddings",
    "embedding_norm": "bert.embeddings.LayerNorm",
    "pooler": "bert.pooler.dense",
    "mlm_transform": "cls.predictions.transform.dense",
    "mlm_norm": "cls.predictions.transform.LayerNorm",
    "nsp": "cls.seq_relationship",
}
_LAYER = {
    "attention.q_proj": "attention.self.query",
    "attention.k_proj": "attention.self.key",
    "attention.v_proj": "attention.self.value",
    "attention.o_proj": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
# Stored by some checkpoints but derived by transformers: the tied decoder (word embeddings and
# cls.predictions.bias) and the position-id buffer of older versions.
_DERIVED_HF_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "bert.embeddings.position_ids")


def hf_name(name: str) -> str:
    """transformers' name of one of our parameters."""
    if name == "mlm_bias":
        return "cls.predictions.bias"
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, inner = module.split(".", 2)
        return f"bert.encoder.layer.{index}.{_LAYER[inner]}.{param}"
    return f"{_TOP[module]}.{param}"


def hf_class_name(cfg: EncoderConfig) -> str:
    return "BertForPreTraining" if cfg.nsp_head else "BertForMaskedLM"


def bert_refusal(cfg: ModelConfig, objective: ObjectiveConfig | None = None) -> str | None:
    """None: every EncoderConfig is a BERT (learned absolute positions, erf GELU, post-LN, tied
    decoder), and only encoder objectives (MLM, with or without NSP) can have trained it."""
    return None


def export_hf_bert(model: nn.Module, cfg: EncoderConfig, tokenizer_path: Path, out_dir: Path,
                   generate: Any = None) -> Path:
    """Write a BertForPreTraining (nsp_head) or BertForMaskedLM directory (config, safetensors,
    tokenizer) atomically to out_dir. `generate` is unused: fill-mask has no sampling settings."""
    if cfg.arch != "encoder":
        raise ValueError(f"only the 'encoder' architecture exports to BERT, got model.arch={cfg.arch!r}")
    tokenizer_path, special = export_tokenizer(tokenizer_path)
    hf_config = transformers.BertConfig(
        architectures=[hf_class_name(cfg)],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.resolved_d_ff(),
        hidden_act="gelu",
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.norm_eps,
        pad_token_id=special.pad if special.pad is not None else 0,
        tie_word_embeddings=True,
    )
    weights = {hf_name(n): t.detach().to("cpu").contiguous() for n, t in model.state_dict().items()}
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        hf_config.save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer_files(tmp, tokenizer_path, special, cfg.max_seq_len)
    return out_dir


def verify_bert(model: nn.Module, out_dir: Path, seed: int = 0, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Reload the export with transformers (fp32, eager) and compare MLM (and NSP) logits on random
    sentence pairs, one row padded (compared at real tokens only: what padding queries compute is
    unused and differs by design), plus the tokenizer."""
    cfg: EncoderConfig = model.cfg
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    hf_cls = getattr(transformers, hf_class_name(cfg))
    hf_model = hf_cls.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True,
                                      attn_implementation="eager").to(device).eval()
    ids, types, real = random_pairs(cfg, seed, device)
    with torch.no_grad():
        ours = model(ids, AttentionLayout(causal=False, segment_ids=real.long()), token_type_ids=types)
        theirs = hf_model(input_ids=ids, attention_mask=real.long(), token_type_ids=types)
    ours_mlm = ours["logits"] if cfg.nsp_head else ours
    theirs_mlm = theirs.prediction_logits if cfg.nsp_head else theirs.logits
    diff = (ours_mlm - theirs_mlm).abs()[real].max().item()
    report = {"mlm_max_abs_diff": diff}
    if cfg.nsp_head:
        report["nsp_max_abs_diff"] = (ours["nsp_logits"] - theirs.seq_relationship_logits).abs().max().item()
        diff = max(diff, report["nsp_max_abs_diff"])
    return {**tokenizer_check(out_dir, diff, tokenizer), **report}


def random_pairs(cfg: EncoderConfig, seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """ids, token types (A = 0, B = 1 from the middle on) and real-token flags [2, T]; the second
    row ends in padding."""
    g = torch.Generator().manual_seed(seed)
    T = min(64, cfg.max_seq_len)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, T - T // 4 :] = False
    types = (torch.arange(T) >= T // 2) & real & (cfg.type_vocab_size > 1)
    return ids.to(device), types.long().to(device), real.to(device)


def import_hf_bert(src: Path) -> tuple[nn.Module, EncoderConfig]:
    """Load a BertForMaskedLM or BertForPreTraining directory (safetensors) as our encoder in fp32.
    The NSP head comes along when the weights hold one (pooler and seq_relationship)."""
    src = Path(src)
    hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    weights = {k: v for k, v in read_weights(src).items() if k not in _DERIVED_HF_KEYS}
    has_nsp = {"bert.pooler.dense.weight", "cls.seq_relationship.weight"} <= weights.keys()
    cfg = _encoder_config(hf, src, has_nsp)
    model = build_model(cfg)
    names = {hf_name(n): n for n in model.state_dict()}
    missing = sorted(set(names) - weights.keys())
    # A pooler without its NSP classifier feeds nothing we compute (BertForMaskedLM never loads it).
    unexpected = sorted(k for k in weights.keys() - names.keys() if has_nsp or not k.startswith("bert.pooler."))
    if missing or unexpected:
        raise ValueError(f"{src}: weights do not match a BERT of this config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict({names[k]: weights[k].float() for k in names}, strict=True)
    return model, cfg


def _encoder_config(hf: dict[str, Any], src: Path, nsp_head: bool) -> EncoderConfig:
    """Our config for an HF BERT config, refusing what our encoder does not compute (rather than
    importing a model that silently computes something else)."""
    archs = hf.get("architectures") or []
    position = hf.get("position_embedding_type", "absolute")
    unsupported = {
        "model_type": (hf.get("model_type") != "bert", hf.get("model_type")),
        "architectures": (not set(archs) <= {"BertForMaskedLM", "BertForPreTraining"}, archs),
        "hidden_act": (hf.get("hidden_act", "gelu") != "gelu", hf.get("hidden_act")),
        "position_embedding_type": (position not in (None, "absolute"), position),
        "is_decoder": (bool(hf.get("is_decoder")), hf.get("is_decoder")),
        "add_cross_attention": (bool(hf.get("add_cross_attention")), hf.get("add_cross_attention")),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True) is False, hf.get("tie_word_embeddings")),
    }
    for key, (bad, value) in unsupported.items():
        if bad:
            raise ValueError(f"{src}/config.json: {key}={value!r} is not supported by lmforge's encoder "
                             "(BertForMaskedLM / BertForPreTraining with absolute positions, gelu, tied decoder)")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hidden % heads:
        raise ValueError(f"{src}/config.json: hidden_size {hidden} is not a multiple of {heads} heads")
    return EncoderConfig(
        arch="encoder",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 512),
        d_model=hidden,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        d_ff=hf["intermediate_size"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        init_std=float(hf.get("initializer_range", 0.02)),
        nsp_head=nsp_head,
    )


EXPORTERS["encoder"] = lambda cfg: Exporter(hf_class_name(cfg), export_hf_bert, verify_bert, bert_refusal)
