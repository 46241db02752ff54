"""Weight initialisation that gives every device and parallel layout the values one CPU process
would draw.

`normal_` draws each parameter whole from the CPU generator, in the order the family's
`init_weights` visits them, and keeps what this rank holds: the whole tensor, or its piece when
parallelism split it (a DTensor: an FSDP shard, a tensor-parallel column or row block). So a model
built on the meta device, parallelised, then materialised and initialised (torchtitan's order, which
never holds a whole model on one rank) starts from exactly the weights of a single-process run,
on CPU or GPU, with one full parameter in memory at a time. DTensor's own random ops cannot promise
that: off CUDA they draw each shard from the local generator, so every rank would get the same
numbers; and a CUDA generator draws other numbers than the CPU one.
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
    """`nn.init.normal_`, drawn as described in the module docstring."""
    split = DTensor is not None and isinstance(param, DTensor)
    if not split and param.device.type == "cpu":
        return nn.init.normal_(param, mean, std)
    full = torch.empty(param.shape, dtype=param.dtype).normal_(mean, std)  # the CPU generator
    if not split:
        return param.copy_(full)
    local = param.to_local()
    # src_data_rank=None: every rank cuts its piece from its own (identical) copy, no communication.
    piece = distribute_tensor(full.to(local.device), param.device_mesh, param.placements, src_data_rank=None)
    local.copy_(piece.to_local())
    return param
