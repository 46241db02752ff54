"""Checkpoints: one directory per save, written under a temp name and renamed, then `latest` updated.

Tensors go to safetensors (never pickle), everything else to JSON, so a checkpoint from an
untrusted source cannot execute code when loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmforge.io_utils import atomic_path, atomic_write_json, atomic_write_text

LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write model, optimizer, RNG and JSON `state`; point `latest` at it; keep the newest `keep`."""
    root = Path(root)
    final = root / step_dir_name(step)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_model(_unwrap(model), str(tmp / "model.safetensors"))
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer.state_dict())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state = {**state, "optimizer": meta}
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "state.json", {**state, "step": step})
    atomic_write_text(root / LATEST, final.name + "\n")
    _prune(root, step, keep)
    return final


def find_latest(root: Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "state.json").read_text(encoding="utf-8"))


def load_weights(ckpt: Path, model: nn.Module) -> None:
    missing, unexpected = load_model(_unwrap(model), str(Path(ckpt) / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def load_checkpoint(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True
) -> dict[str, Any]:
    """Load weights (and optimizer/RNG) in place; return the JSON state."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    load_weights(ckpt, model)
    if optimizer is not None:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if restore_rng:
        rng = load_file(str(ckpt / "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
    return state


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _prune(root: Path, current: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `current`. Later steps are leftovers of an earlier,
    longer run in the same directory (e.g. train.resume=false): they would outrank `current`."""
    steps = sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*") if p.is_dir())
    older = [s for s in steps if s <= current][:-keep]
    stale = [s for s in steps if s > current]
    for s in older + stale:
        shutil.rmtree(root / step_dir_name(s), ignore_errors=True)
