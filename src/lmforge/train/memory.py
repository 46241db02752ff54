"""S3: activation checkpointing and compilation, applied to a plain model's blocks from outside (as
torchtitan does: tensor parallel, then activation checkpointing, then compile, then FSDP).

- `full`: every block keeps only its input and recomputes everything else in the backward pass
  (activation memory ~ one block's worth plus one tensor per block; ~33% more compute).
- `selective`: op-level selective checkpointing: the outputs of matmuls and attention are kept,
  the cheap element-wise ops (norms, activations, residual adds) are recomputed; most of the memory
  saving of `full` at a fraction of its recompute (Korthikanti et al. 2022).
`torch.distributed`'s checkpoint wrapper keeps the parameter names of the unwrapped model in
state dicts, so checkpoints and exports do not see it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

_SAVE = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
}


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def blocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, block) of every repeated block of any family."""
    out = []
    for holder in (model, getattr(model, "encoder", None), getattr(model, "decoder", None)):
        if isinstance(holder, nn.Module):
            for name in ("layers", "encoder_layers", "decoder_layers"):
                stack = getattr(holder, name, None)
                if isinstance(stack, nn.ModuleList):
                    out += [(stack, str(i), block) for i, block in enumerate(stack)]
    return out


def checkpoint_activations(model: nn.Module, mode: str) -> nn.Module:
    """Wrap every block for `mode` in none | full | selective."""
    if mode == "none":
        return model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    extra = {"context_fn": partial(create_selective_checkpoint_contexts, _policy)} if mode == "selective" else {}
    for parent, name, block in blocks(model):
        setattr(parent, name, checkpoint_wrapper(block, preserve_rng_state=False, **extra))
    return model


def compile_blocks(model: nn.Module) -> nn.Module:
    """torch.compile each block (the repeated unit: one compilation serves them all)."""
    for _, _, block in blocks(model):
        block.compile()
    return model
