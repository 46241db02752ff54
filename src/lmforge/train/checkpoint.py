"""Checkpoints: one directory per save, written under a temp name and renamed, then `latest` updated.

Tensors go to safetensors (never pickle), everything else to JSON, so a checkpoint from an
untrusted source cannot execute code when loaded.

A kill at any point of a save leaves the previous checkpoint whole: the new one is built in
`.step_N.tmp<pid>` and renamed into place, and `latest` is replaced by a rename. What a killed save
leaves behind is swept by `sweep_stale` when the next run starts. Loading checks each file against
its safetensors header (a truncated file is refused) and falls back to the previous checkpoint,
naming the bad one; a checkpoint of another model shape is refused, naming the tensors that differ.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmforge.io_utils import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

LATEST = "latest"
_STEP = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)$")  # io_utils.atomic_path's names


class CheckpointMismatch(ValueError):
    """The checkpoint is whole but was saved from a model of another shape: an older one would not fit either."""


class CorruptCheckpoint(ValueError):
    """A file is missing, truncated or unreadable, or the weights are not finite."""


class NonFiniteWeights(ValueError):
    """Refused to save weights that hold NaN or Inf."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
    keep: int = 2, keep_every: int = 0, protect: int | None = None,
) -> Path:
    """Write model, optimizer, RNG and JSON `state`; point `latest` at it; prune (see `prune`)."""
    root = Path(root)
    bad = nonfinite_tensors(model)
    if bad:  # a rollback must always find finite weights; such a save would be the one it restores
        raise NonFiniteWeights(f"not saving step {step}: non-finite values in {', '.join(bad[:8])}")
    final = root / step_dir_name(step)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_model(_unwrap(model), str(tmp / "model.safetensors"))
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer.state_dict())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state = {**state, "optimizer": meta}
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "state.json", {**state, "step": step})  # last: its presence marks a whole dir
    atomic_write_text(root / LATEST, final.name + "\n")
    prune(root, step, keep, keep_every, protect)
    return final


def nonfinite_tensors(model: nn.Module) -> list[str]:
    return [n for n, t in _unwrap(model).state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint directory in `root`, oldest first (whole or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)


def candidates(root: Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one `latest` names, then the older ones, newest
    first. Without a readable pointer (a kill before the first one was written), all, newest first."""
    root = Path(root)
    ckpts = list_checkpoints(root)
    m = _STEP.match(_read_pointer(root / LATEST))
    if m:
        bound = int(m.group(1))  # later steps are leftovers of an earlier, longer run (see prune)
        return [root / m.group(0)] + [p for s, p in reversed(ckpts) if s < bound]
    return [p for _, p in reversed(ckpts)]


def _read_pointer(pointer: Path) -> str:
    try:
        return pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def find_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names or, if its state.json does not read (warned), the newest older one
    whose does; None without any."""
    for path in candidates(root):
        try:
            read_state(path)
            return path
        except (OSError, ValueError) as e:
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, e)
    return None


def load_latest(
    root: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint that is whole (see `load_first`); None when there is none at all."""
    paths = candidates(root)
    return load_first(paths, model, optimizer) if paths else None


def load_first(
    paths: list[Path], model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[Path, dict[str, Any]]:
    """Load the first of `paths` that is whole, warning about each corrupt one before it. A shape
    mismatch is raised at once; if every one is corrupt, CorruptCheckpoint lists them all."""
    errors = []
    for path in paths:
        try:
            return path, load_checkpoint(path, model, optimizer)
        except CorruptCheckpoint as e:
            log.warning("%s; falling back to the previous checkpoint", e)
            errors.append(str(e))
    raise CorruptCheckpoint("no loadable checkpoint: " + "; ".join(errors))


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CorruptCheckpoint(f"{ckpt} is not a complete checkpoint (no state.json)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{ckpt}/state.json is corrupt: {e}") from e


def load_weights(ckpt: Path, model: nn.Module) -> None:
    """Load model.safetensors into `model` in place, after checking the file is whole and fits it
    (a DCP checkpoint is read and consolidated into the plain model)."""
    if (Path(ckpt) / "dcp").is_dir():
        from lmforge.train.dist_checkpoint import load_distributed

        load_distributed(ckpt, model, None, restore_rng=False)
        return
    path = Path(ckpt) / "model.safetensors"
    header = safetensors_header(path)
    _check_shapes(ckpt, header, model)
    try:
        missing, unexpected = load_model(_unwrap(model), str(path), strict=False)
    except SafetensorError as e:
        raise CorruptCheckpoint(f"{path} is corrupt: {e}") from e
    if missing or unexpected:
        raise CheckpointMismatch(f"{ckpt}: weights do not match the model (missing {sorted(missing)}, "
                                 f"unexpected {sorted(unexpected)})")
    bad = nonfinite_tensors(model)
    if bad:
        raise CorruptCheckpoint(f"{path} holds non-finite weights ({', '.join(bad[:8])})")


def load_checkpoint(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True
) -> dict[str, Any]:
    """Load weights (and optimizer/RNG) in place; return the JSON state. Every file's length is
    checked against its header first, so a truncated file is found before anything is loaded."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    if state.get("format") == "dcp":  # written by a multi-process job (or checkpoint_format=dcp)
        from lmforge.train.dist_checkpoint import load_distributed

        load_distributed(ckpt, model, optimizer, restore_rng)
        return state
    names = ["model"] + ["optimizer"] * (optimizer is not None) + ["rng"] * restore_rng
    for name in names:
        safetensors_header(ckpt / f"{name}.safetensors")
    load_weights(ckpt, model)
    if optimizer is not None:
        tensors = _load_file(ckpt / "optimizer.safetensors")
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if restore_rng:
        rng = _load_file(ckpt / "rng.safetensors")
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
    return state


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking the file is exactly as long as it says
    (a save killed mid-write, or a copy cut short, leaves a shorter file)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise CorruptCheckpoint(f"{path} is missing") from e
    except (struct.error, ValueError, MemoryError, OverflowError) as e:
        raise CorruptCheckpoint(f"{path} is corrupt: unreadable header ({e})") from e
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    want = 8 + n + max(ends, default=0)
    if size != want:
        raise CorruptCheckpoint(f"{path} is truncated or corrupt: {size:,} bytes, its header says {want:,}")
    return header


def sweep_stale(root: Path) -> list[str]:
    """Remove what killed saves left in `root`: `.step_N.tmp<pid>` (a half-written checkpoint) and
    `.latest.*.tmp` (a half-written pointer). A `.step_N.old<pid>` is the previous copy of a checkpoint
    being overwritten: it is put back if the new one never landed. Entries of a live process other
    than this one are left alone; this runs at start, before this process saves anything, and one
    process writes a checkpoint directory at a time. Returns what it did, one line per entry."""
    root = Path(root)
    done = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        m = _LEFTOVER.match(p.name)
        if m and not _alive_other(int(m.group("pid"))):
            target = root / m.group("name")
            if m.group("kind") == "old" and not target.exists():
                os.replace(p, target)
                done.append(f"restored {target.name} from {p.name}")
                continue
            _remove(p)
            done.append(f"removed {p.name}")
        elif p.name.startswith(f".{LATEST}.") and p.name.endswith(".tmp"):
            _remove(p)
            done.append(f"removed {p.name}")
    for line in done:
        log.warning("checkpoint sweep in %s: %s", root, line)
    return done


def _alive_other(pid: int) -> bool:
    if pid == os.getpid():  # a pid reused since the kill: this process has no save in progress yet
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CorruptCheckpoint(f"{path} is corrupt: {e}") from e


def _check_shapes(ckpt: Path, header: dict[str, Any], model: nn.Module) -> None:
    want = {n: list(t.shape) for n, t in _unwrap(model).state_dict().items()}
    diff = [f"{n} {v['shape']} in the checkpoint, {want[n]} in the model"
            for n, v in header.items() if n in want and list(v["shape"]) != want[n]]
    if diff:
        raise CheckpointMismatch(f"{ckpt} is from a model of another shape: {'; '.join(diff)}")


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


def prune(root: Path, current: int, keep: int, keep_every: int = 0, protect: int | None = None) -> None:
    """Keep, of the checkpoints up to `current`: the newest `keep`, every step divisible by
    `keep_every`, and with `protect` the newest at or before that step and every one after it.
    A spike at step s rolls back to the newest checkpoint at or before s - rewind_steps; with
    protect = current + 1 - rewind_steps, whichever one a later spike picks is still there, where
    keep-N alone could have left only checkpoints too near the spike.
    Later steps are leftovers of an earlier, longer run in the same directory (train.resume=false),
    or of the trajectory a rollback abandoned: they would outrank `current`, so they go."""
    steps = [s for s, _ in list_checkpoints(root)]
    done = [s for s in steps if s <= current]
    kept = set(done[-keep:]) if keep > 0 else {current}
    if keep_every > 0:
        kept |= {s for s in done if s % keep_every == 0}
    if protect is not None:
        anchor = max((s for s in done if s <= protect), default=min(done, default=current))
        kept |= {s for s in done if s >= anchor}
    for s in steps:
        if s not in kept:
            shutil.rmtree(Path(root) / step_dir_name(s), ignore_errors=True)
