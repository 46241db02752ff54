"""Weight initialisation that gives every parallel layout the values one process would draw.

`normal_` on a parameter that parallelism split (a DTensor: an FSDP shard, a tensor-parallel column
or row block) draws the whole parameter from the same generator, in the same order, as the unsplit
model would, and each rank keeps its own piece. So a model built on the meta device, parallelised,
then materialised and initialised (torchtitan's order, which never holds a whole model on one rank)
starts from exactly the weights of a single-process run, with one full parameter in memory at a
time. DTensor's own random ops cannot promise that: off CUDA they draw each shard from the local
generator, so every rank would get the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed: nothing is ever split
    DTensor = None  # type: ignore[assignment,misc]


@torch.no_grad()
def normal_(param: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """`nn.init.normal_`, layout-independent (see the module docstring)."""
    if DTensor is None or not isinstance(param, DTensor):
        return nn.init.normal_(param, mean, std)
    local = param.to_local()
    full = torch.empty(param.shape, dtype=param.dtype, device=local.device).normal_(mean, std)
    # src_data_rank=None: every rank cuts its piece from its own (identical) copy, no communication.
    local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
    return param
