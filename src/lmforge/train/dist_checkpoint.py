"""P7: checkpoints with `torch.distributed.checkpoint` (DCP), which any world size and layout reads.

`get_state_dict` gives the model and optimizer state keyed by parameter name, whatever wraps the
model (DDP's `module.` prefix dropped, FSDP2 and TP shards as DTensors), and DCP writes each rank's
pieces with a global index: a 2-rank FSDP checkpoint resumes on 1 rank or on 2 DDP ranks, and
`lmforge eval` / `export` load it into a plain model (DCP needs no process group to read). Tensors
are stored as tensors and the rest as JSON-able metadata: nothing is unpickled from a checkpoint
we did not write (DCP's reader only loads tensors and its own metadata).
Layout: `step_N/dcp/` (DCP files), `step_N/rng_rank{r}.safetensors`, `step_N/state.json` (rank 0,
written last, with `"format": "dcp"`); `latest` is moved by rank 0 after a barrier.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lmforge.io_utils import atomic_write_json, atomic_write_text
from lmforge.train.checkpoint import LATEST, NonFiniteWeights, prune, step_dir_name
from lmforge.train.parallel import Dist

FORMAT = "dcp"


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    return list(getattr(optimizer, "parts", [optimizer]))  # a Combined optimizer (Muon + AdamW) has parts


def _rng() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def save_distributed(root: Path, step: int, model: nn.Module, optimizer: Any, state: dict[str, Any], d: Dist,
                     keep: int = 2, keep_every: int = 0, protect: int | None = None) -> Path:
    """Every rank calls this; returns the checkpoint directory."""
    root = Path(root)
    bad = d.all_reduce([float(_nonfinite(model))])[0]
    if bad:  # as save_checkpoint: a rollback must always find finite weights
        raise NonFiniteWeights(f"not saving step {step}: non-finite values in {int(bad)} parameter shards")
    final, tmp = root / step_dir_name(step), root / f".{step_dir_name(step)}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    model_sd, optim_sd = get_state_dict(model, _optimizers(optimizer))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    save_file(_rng(), str(tmp / f"rng_rank{d.rank}.safetensors"))
    d.barrier()
    if d.is_main:
        atomic_write_json(tmp / "state.json", {**state, "step": step, "format": FORMAT, "world": d.world,
                                               "mode": d.mode})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(root / LATEST, final.name + "\n")
        prune(root, step, keep, keep_every, protect)
    d.barrier()
    return final


def load_distributed(ckpt: Path, model: nn.Module, optimizer: Any | None, restore_rng: bool = True) -> None:
    """Load a DCP checkpoint into `model` (and `optimizer`), resharding to this job's layout; in a
    single process it consolidates into the plain model."""
    optims = _optimizers(optimizer) if optimizer is not None else []
    model_sd, optim_sd = get_state_dict(model, optims)
    target = {"model": model_sd, "optim": optim_sd} if optims else {"model": model_sd}
    single = not (dist.is_available() and dist.is_initialized())  # eval / export consolidating alone
    with warnings.catch_warnings():
        if single:  # torch warns that it assumes one process, which is the intent here
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(target, checkpoint_id=str(Path(ckpt) / "dcp"), no_dist=single)
    set_state_dict(model, optims, model_state_dict=target["model"], optim_state_dict=target.get("optim", {}))
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = Path(ckpt) / f"rng_rank{rank}.safetensors"
    if restore_rng and rng.is_file():  # continue this rank's random stream (a new rank starts its own)
        saved = load_file(str(rng))
        torch.set_rng_state(saved["torch_cpu"])
        if "torch_cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["torch_cuda"])


def _nonfinite(model: nn.Module) -> int:
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(int(not bool(t.isfinite().all())) for t in local if t.is_floating_point())
