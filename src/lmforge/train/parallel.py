"""S2: scale-out on PyTorch's own distributed stack, applied to a plain model from outside.

`torchrun --nproc-per-node N -m lmforge train ...` starts N processes; `setup` joins them (gloo on
CPU, NCCL on CUDA) and `parallelize` wraps the model the way `train.parallel.mode` says:
- `ddp`: DistributedDataParallel, every rank a full replica, gradients all-reduced;
- `fsdp`: FSDP2 `fully_shard` per block and at the root (parameters, gradients and optimizer state
  sharded; `cpu_offload` moves them to the CPU with `CPUOffloadPolicy`);
- `tp`: DTensor tensor parallelism for the decoder (Megatron's split: q/k/v and gate/up column-wise,
  o and down row-wise, so each block needs one all-reduce per sub-layer); every rank sees the same
  batch;
- `pp`: two-stage pipeline over micro-batches (`torch.distributed.pipelining`, GPipe schedule):
  rank 0 holds the embedding and the first half of the blocks, rank 1 the rest and the head.
Data-parallel ranks (ddp, fsdp) take disjoint rows of each global batch; tp and pp ranks share
theirs. For fsdp and tp the model arrives on the meta device and each rank materialises and
initialises its own pieces afterwards (model_setup.build_parallel_model; `models.init` draws them as the
unsplit model would); ddp and pp get a model built whole from the same seed. Either way 1 and N
ranks start from identical weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Rank among the processes that read different rows (tp and pp ranks share rows)."""
        return self.rank if self.mode in ("ddp", "fsdp") else 0

    @property
    def data_world(self) -> int:
        return self.world if self.mode in ("ddp", "fsdp") else 1

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sum of `values` over every rank (one collective for the list)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(mode: str, device: torch.device) -> Dist:
    """Join the job torchrun started (RANK / WORLD_SIZE / LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device)
    if mode == "none":
        raise ConfigError(f"train.parallel.mode: started with {world} processes but mode is 'none'; "
                          "choose ddp, fsdp, tp or pp")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if mode == "pp" and world != 2:
        raise ConfigError(f"train.parallel.mode: pp runs 2 stages, one per process; got {world} processes")
    return Dist(rank, world, local, mode, device)


def parallelize(model: nn.Module, d: Dist, cpu_offload: bool = False, activation_checkpointing: str = "none",
                compile_blocks: bool = False) -> nn.Module:
    """Wrap `model` for this job, in torchtitan's order: tensor parallel, activation checkpointing,
    compile, then the data-parallel wrapper. fsdp and tp take it on the meta device (to be
    materialised and initialised after); ddp needs it initialised, identical on every rank."""
    from lmforge.train import memory

    if d.world > 1 and d.mode == "tp":
        model = _tensor_parallel(model, d)
    model = memory.checkpoint_activations(model, activation_checkpointing)
    if compile_blocks:
        model = memory.compile_blocks(model)
    if d.world == 1:
        return model
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if d.mode == "fsdp":
        return _fsdp(model, d, cpu_offload)
    return model  # tp: done above; pp: the stage is cut by PipelineRunner


def _fsdp(model: nn.Module, d: Dist, cpu_offload: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    # Pinned host memory speeds copies to a GPU; a CPU-only job has nothing to pin for.
    policy = {"offload_policy": CPUOffloadPolicy(pin_memory=d.device.type == "cuda")} if cpu_offload else {}
    from lmforge.train.memory import blocks

    for _, _, block in blocks(model):  # each block its own unit: gathered just before it runs
        fully_shard(block, mesh=mesh, **policy)
    fully_shard(model, mesh=mesh, **policy)
    return model


def _tensor_parallel(model: nn.Module, d: Dist) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if getattr(getattr(model, "cfg", None), "family", "") != "decoder":
        raise ConfigError("train.parallel.mode: tp is implemented for the decoder family")
    cfg = model.cfg
    kv = cfg.n_kv_heads or cfg.n_heads
    if cfg.n_heads % d.world or kv % d.world or cfg.resolved_d_ff() % d.world:
        raise ConfigError(f"train.parallel.mode: tp over {d.world} ranks needs n_heads ({cfg.n_heads}), n_kv_heads "
                          f"({kv}) and d_ff ({cfg.resolved_d_ff()}) divisible by {d.world}")
    mesh = init_device_mesh(d.device.type, (d.world,))
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        # Each rank now computes its own heads: the attention reshapes by the local head count.
        block.self_attn.n_heads //= d.world
        block.self_attn.n_kv_heads //= d.world
    return model


@contextmanager
def no_sync(model: nn.Module, last: bool) -> Iterator[None]:
    """Gradient accumulation without a collective on every micro-batch: DDP's no_sync, FSDP2's
    requires-gradient-sync switch; only the last micro-batch of a step reduces."""
    if last:
        yield
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with nullcontext():
            yield


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float, across: Dist | None = None) -> float:
    """Global L2 norm of the gradients of plain and DTensor parameters alike (sharded pieces summed
    over their mesh, replicated ones counted once; with `across`, plain gradients summed over every
    rank too: pipeline stages hold different parameters), clipped to `max_norm` as torch does."""
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params if p.grad is not None]
    plain: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            local = g.to_local().double().pow(2).sum().cpu()
            if any(p.is_shard() for p in g.placements):
                local = local.to(g.to_local().device)
                dist.all_reduce(local, group=g.device_mesh.get_group())
                local = local.cpu()
            total += local
        else:
            plain.setdefault(g.device, []).append(g)
    # Plain gradients: fp64 norms of all of a device's tensors in one multi-tensor launch, read
    # once. A launch and a read per parameter left a GPU idle (~100 syncs a step at 125M).
    for same_device in plain.values():
        total += torch.stack(torch._foreach_norm(same_device, 2.0, dtype=torch.float64)).square().sum().cpu()
    if across is not None:
        total = torch.tensor(across.all_reduce([float(total)])[0], dtype=torch.float64)
    norm = math.sqrt(float(total))
    scale = max_norm / (norm + 1e-6)  # torch's clip_grad_norm_ rule
    if max_norm > 0 and scale < 1.0:
        for same_device in plain.values():
            torch._foreach_mul_(same_device, scale)
        for g in grads:
            if isinstance(g, DTensor):
                g.mul_(scale)
    return norm
