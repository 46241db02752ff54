"""The dry run's memory estimate (train/dry_run.py).

Memory, per process (one device, no sharding), in bytes, with N parameters, L layers, micro-batch b
rows of s tokens, width h, key/value width h_kv, MLP width f, vocabulary V, activation bytes p (2 for
bf16 autocast, 4 for fp32) and r = 4 (the residual stream stays fp32 under autocast, as do norms):
- weights 4N and gradients 4N (fp32 master weights), plus under bf16 autocast 2N for the bf16 weight
  copies autocast caches for the step;
- optimizer state: AdamW/Adam 8N (two fp32 moments); SGD 4N (momentum; 0 without); Adafactor
  4(r + c) per r x c matrix (factored second moment, no first moment) and 4n per vector; Muon 4N
  on hidden matrices (momentum) plus AdamW's 8N on the rest;
- activations kept for backward, per layer: s·b·(4r·h + p·(c·h + 2h + 2h_kv + 4f)): each RMSNorm's
  input and normalised value (fp32), the matmul inputs (c copies of the normed input: c = 5 under
  bf16 autocast, which casts it once for each of q, k, v, gate and up; c = 2 in fp32, one per block),
  q and the attention output (h each), k and v (h_kv each; fused attention keeps no s x s scores),
  and SwiGLU's gate, up, silu(gate) and product (f each). This is Korthikanti et al. 2022's count
  (eq. 1, s·b·h·(34 + 5a·s/h) bytes for GPT at 16 bits) redone for this block (no dropout masks, no
  score term, a gated MLP, an fp32 residual stream), checked against the tensors autograd saves
  (tests/test_dry_run.py);
- with activation checkpointing (train.activation_checkpointing, lmforge.train.memory): `full`
  keeps L·s·b·r·h, the layer inputs (Korthikanti's 2sbhL, at fp32); `selective` keeps the inputs and
  the matmul and attention outputs, L·s·b·(r·h + p·(4h + 2h_kv + 2f)) (q, k, v, attention, o, gate,
  up, down); both plus one layer's activations, rebuilt during its backward;
- logits: s·b·V·(p + 4 + 8): the logits, their fp32 log-softmax, and two fp32 gradients of that
  size at the start of backward (often the largest single term at large vocabularies).
Other families are estimated with the decoder's formula and their own widths (labelled approximate).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import RunConfig


def optimizer_state_bytes(model: nn.Module, opt: Any) -> tuple[int, str]:
    """(bytes of fp32 optimizer state, the formula), for the optimizers lmforge registers."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    name = opt.name
    if name in ("adamw", "adam"):
        return 8 * n, f"{name}: two fp32 moments, 8 B x N"
    if name == "sgd":
        return (4 * n, "sgd: fp32 momentum, 4 B x N") if opt.momentum > 0 else (0, "sgd without momentum: none")
    if name == "adafactor":
        total = sum(4 * (math.prod(p.shape[:-2]) * (p.shape[-2] + p.shape[-1]) if p.dim() >= 2 else p.numel())
                    for p in params)
        return total, "adafactor: factored second moment, 4 B x (rows + cols) per matrix, 4 B x n per vector"
    if name == "muon":
        from lmforge.train.optim import _muon_split

        hidden, rest = _muon_split(model)
        n_hidden, n_rest = sum(p.numel() for p in hidden), sum(p.numel() for p in rest)
        return 4 * n_hidden + 8 * n_rest, (f"muon: momentum 4 B x {n_hidden:,} hidden-matrix params + "
                                           f"AdamW moments 8 B x {n_rest:,} others")
    return 8 * n, f"{name}: not modelled, assumed AdamW's 8 B x N"


def _widths(model_cfg: Any) -> tuple[int, int, int, int, bool]:
    """(layers, h, h_kv, f, exact): the decoder's own widths, or the nearest for other families."""
    h = model_cfg.d_model
    heads = model_cfg.n_heads
    kv = getattr(model_cfg, "n_kv_heads", 0) or heads
    layers = model_cfg.n_layers
    if model_cfg.family == "encoder_decoder":
        layers += getattr(model_cfg, "n_decoder_layers", 0) or model_cfg.n_layers
    d_ff = getattr(model_cfg, "d_ff", 0) or 4 * h
    f = model_cfg.resolved_d_ff() if hasattr(model_cfg, "resolved_d_ff") else d_ff
    return layers, h, h * kv // heads, f, model_cfg.family == "decoder"


def memory_estimate(cfg: RunConfig, model: nn.Module, vocab: int) -> dict[str, Any]:
    """Bytes per process (this module's docstring for every formula)."""
    n = sum(p.numel() for p in model.parameters())
    s, b = cfg.train.seq_len, cfg.train.batch_size
    p = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    r = 4
    layers, h, h_kv, f, exact = _widths(cfg.model)
    c = 5 if p == 2 else 2
    per_layer = s * b * (4 * r * h + p * (c * h + 2 * h + 2 * h_kv + 4 * f))
    logits = s * b * vocab * (p + 4 + 8)
    opt_bytes, opt_formula = optimizer_state_bytes(model, cfg.train.optimizer)
    copies = 2 * n if p == 2 else 0
    states = 4 * n + 4 * n + copies + opt_bytes
    activations = {  # by train.activation_checkpointing; the recomputed layer's activations come back in backward
        "none": layers * per_layer,
        "selective": layers * s * b * (r * h + p * (4 * h + 2 * h_kv + 2 * f)) + per_layer,
        "full": layers * s * b * r * h + per_layer,
    }
    mode = cfg.train.activation_checkpointing
    return {
        "weights": 4 * n, "gradients": 4 * n, "autocast_copies": copies,
        "optimizer_state": opt_bytes, "optimizer_formula": opt_formula, "activations": activations,
        "logits": logits, "per_layer": per_layer, "mode": mode, "total": states + activations[mode] + logits,
        "totals": {m: states + a + logits for m, a in activations.items()}, "exact_family": exact,
        "formula": (f"L x s·b·(4r·h + p·(c·h + 2h + 2h_kv + 4f)) = {layers} x {s}·{b}·(4·{r}·{h} + {p}·({c}·{h} + "
                    f"2·{h} + 2·{h_kv} + 4·{f}))"),
        "formula_selective": (f"L·s·b·(r·h + p·(4h + 2h_kv + 2f)) + one layer = {layers}·{s}·{b}·({r}·{h} + "
                              f"{p}·(4·{h} + 2·{h_kv} + 2·{f})) + {per_layer:,}"),
        "formula_full": f"L·s·b·r·h + one layer = {layers}·{s}·{b}·{r}·{h} + {per_layer:,}",
        "formula_logits": f"s·b·V·(p + 4 + 8) = {s}·{b}·{vocab}·({p} + 12)",
    }


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be allocated without swapping, page cache included
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
