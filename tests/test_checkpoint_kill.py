"""P5: a kill during a save never corrupts the previous checkpoint; leftovers of killed saves are
swept; a truncated or corrupt checkpoint falls back to the previous one; another model's shape is
refused; a training process SIGKILLed at random points resumes on the same loss curve (slow).

Child processes run this file as a script (see the bottom), with one thread, so that parent and
children compute the same floats.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import make_trainer, tiny_cfg

from lmforge.models import build_model
from lmforge.train import checkpoint
from lmforge.train.checkpoint import (
    CheckpointMismatch,
    CorruptCheckpoint,
    find_latest,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    sweep_stale,
)
from lmforge.train.metrics import MetricsLog
from lmforge.train.optim import build_optimizer

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
DEAD_PID = 99_999_999  # above any pid_max: never a live process


@pytest.fixture(autouse=True)
def one_thread():
    """Match the children (OMP_NUM_THREADS=1): thread counts change float reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE), *args], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def curve(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


# ---------------------------------------------------------------------------- a kill inside the save


@pytest.mark.parametrize("where", [  # a child process per case (~3 s): two in the quick suite
    "optimizer", "pointer", *(pytest.param(w, marks=pytest.mark.slow) for w in ("model", "state")),
])
def test_kill_inside_a_save_leaves_the_previous_checkpoint_and_resume_uses_it(tmp_path: Path, where: str):
    cfg = tiny_cfg(tmp_path)  # 8 steps, checkpoints at 3 and 6: the save at 6 is killed
    whole = make_trainer(cfg, tmp_path / "whole", init_seed=0).fit()

    proc = child("kill-in-save", str(tmp_path / "run"), where)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = tmp_path / "run" / "ckpt"
    leftovers = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("."))
    if where == "pointer":  # step_6 landed whole, but `latest` (the commit point) still names step_3
        assert leftovers and leftovers[0].startswith(".latest.") and (ckpt / "step_00000006").is_dir()
    else:
        assert leftovers and all(n.startswith(".step_00000006.tmp") for n in leftovers)
    assert find_latest(ckpt).name == "step_00000003"

    resumed = make_trainer(cfg, tmp_path / "run", init_seed=99)  # a fresh process: only a real resume matches
    result = resumed.fit()
    assert result.resumed_from == 3 and not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # swept
    assert result.losses == {s: whole.losses[s] for s in range(4, 9)}


def test_sweep_restores_a_checkpoint_whose_overwrite_was_killed_between_the_renames(tmp_path: Path):
    model = build_model(tiny_cfg(tmp_path).model)
    save_checkpoint(tmp_path, 3, model, None, {"n": 1})
    # What io_utils.atomic_path leaves if killed between its two renames while replacing step_3: the old
    # directory moved aside, the new one not yet in place.
    os.replace(tmp_path / "step_00000003", tmp_path / f".step_00000003.old{DEAD_PID}")
    (tmp_path / f".step_00000003.tmp{DEAD_PID}").mkdir()
    (tmp_path / f".step_00000004.tmp{os.getppid()}").mkdir()  # a live process's save in flight: left alone
    (tmp_path / ".latest.abcd1234.tmp").write_text("step_0000")
    done = sweep_stale(tmp_path)
    assert done == ["removed .latest.abcd1234.tmp", f"restored step_00000003 from .step_00000003.old{DEAD_PID}",
                    f"removed .step_00000003.tmp{DEAD_PID}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".step_00000004.tmp{os.getppid()}", "latest",
                                                          "step_00000003"]
    assert checkpoint.read_state(find_latest(tmp_path))["n"] == 1


# ---------------------------------------------------------------------------- corrupt and foreign checkpoints


def saved_twice(tmp_path: Path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.train.optimizer)
    model(torch.randint(0, 97, (2, 8))).float().mean().backward()
    opt.step()
    save_checkpoint(tmp_path, 3, model, opt, {"n": 3})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path, 6, model, opt, {"n": 6})
    return cfg, model, opt


@pytest.mark.parametrize("damage", ["truncate-model", "truncate-optimizer", "garble-header", "garble-state",
                                    "delete-rng", "dangling-pointer"])
def test_a_corrupt_latest_falls_back_to_the_previous_checkpoint_naming_it(tmp_path: Path, damage: str, caplog):
    cfg, _, _ = saved_twice(tmp_path)
    bad = tmp_path / "step_00000006"
    if damage.startswith("truncate"):
        path = bad / f"{damage.removeprefix('truncate-')}.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garble-header":
        (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    elif damage == "garble-state":
        (bad / "state.json").write_text('{"step": 6, "tok')
    elif damage == "delete-rng":
        (bad / "rng.safetensors").unlink()
    else:
        (tmp_path / "latest").write_text("step_00000009\n")  # names a checkpoint that is not there
    torch.manual_seed(1)
    model = build_model(cfg.model)
    with caplog.at_level(logging.WARNING, logger="lmforge.train.checkpoint"):
        path, state = load_latest(tmp_path, model, build_optimizer(model, cfg.train.optimizer))
    if damage == "dangling-pointer":  # the newest whole one before what `latest` names
        assert path.name == "step_00000006" and state["n"] == 6 and "step_00000009 is not a complete" in caplog.text
    else:
        assert path.name == "step_00000003" and state["n"] == 3 and f"{bad}/" in caplog.text
    assert "falling back to the previous checkpoint" in caplog.text


def test_all_checkpoints_corrupt_is_an_error_listing_them(tmp_path: Path):
    cfg, model, opt = saved_twice(tmp_path)
    for step in (3, 6):
        (tmp_path / f"step_{step:08d}" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CorruptCheckpoint, match=r"no loadable checkpoint: .*step_00000006.*step_00000003"):
        load_latest(tmp_path, model, opt)


def test_a_checkpoint_of_another_shape_is_refused_naming_the_tensors(tmp_path: Path):
    saved_twice(tmp_path)
    other = build_model(tiny_cfg(tmp_path, "model.d_model=48").model)
    with pytest.raises(CheckpointMismatch, match=r"another shape: embed_tokens.weight \[97, 32\] in the checkpoint, "
                                                 r"\[97, 48\] in the model"):
        load_latest(tmp_path, other)  # refused at once: an older checkpoint would not fit either
    deeper = build_model(tiny_cfg(tmp_path, "model.n_layers=3").model)
    with pytest.raises(CheckpointMismatch, match=r"missing \['layers\.2\."):
        load_checkpoint(tmp_path / "step_00000006", deeper)


# ---------------------------------------------------------------------------- SIGKILL at random points (slow)

SLOW_STEPS = 60


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_on_the_same_curve(tmp_path: Path):
    """`python -m lmforge train` on a tiny run, SIGKILLed 3 times at seeded random points, then run
    to the end: its per-step losses equal an uninterrupted run's exactly (CPU, one thread)."""
    from lmforge import stages
    from lmforge.recipe import load_config

    keys = ["data.builtin.max_prose_bytes=60000", "data.builtin.max_code_bytes=60000", "tokenizer.vocab_size=512",
            "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64", "train.seq_len=32",
            "train.batch_size=8", "train.grad_accum=2", f"train.max_steps={SLOW_STEPS}",
            "train.schedule.warmup_steps=5", "train.checkpoint_every=3", "train.device=cpu"]
    prep = load_config(None, [f"out_dir={tmp_path / 'ref'}", *keys])
    for stage in (stages.stage_data, stages.stage_tokenizer, stages.stage_tokenize):
        stage(prep, progress=False)
    for part in ("data", "tokenizer", "tokens"):
        shutil.copytree(tmp_path / "ref" / part, tmp_path / "run" / part)
    command = [sys.executable, "-m", "lmforge", "train", "-q", *keys]

    def train(out: Path) -> subprocess.Popen:
        return subprocess.Popen([*command, f"out_dir={out}"], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    assert train(tmp_path / "ref").wait(timeout=300) == 0
    rng = random.Random(20240)
    metrics = tmp_path / "run" / "metrics.jsonl"
    for low, high in ((4, 18), (22, 36), (40, 54)):
        target, proc = rng.randint(low, high), train(tmp_path / "run")
        while proc.poll() is None and max((r["step"] for r in MetricsLog(metrics).read()), default=0) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))  # between step boundaries: in a step, a metrics append or a save
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert train(tmp_path / "run").wait(timeout=300) == 0
    assert curve(metrics) == curve(tmp_path / "ref" / "metrics.jsonl")
    assert [s for s, _ in curve(metrics)] == list(range(1, SLOW_STEPS + 1))


# ---------------------------------------------------------------------------- the child


def _kill_in_save(run: Path, where: str) -> None:
    """Train the 8-step tiny run and SIGKILL this process inside its second save (step 6), at `where`."""
    saves = {"n": 0}

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def half(path: Path) -> None:  # a file cut off mid-write, as a kill leaves it
        Path(path).write_bytes(b"\x00" * 1000)
        die()

    real_model, real_file, real_json, real_text = (checkpoint.save_model, checkpoint.save_file,
                                                   checkpoint.atomic_write_json, checkpoint.atomic_write_text)

    def save_model(model, filename, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2 and where == "model":
            half(filename)
        return real_model(model, filename, *a, **k)

    def save_file(tensors, filename, *a, **k):
        if saves["n"] == 2 and where == "optimizer" and filename.endswith("optimizer.safetensors"):
            half(filename)
        return real_file(tensors, filename, *a, **k)

    def atomic_write_json(path, obj):
        if saves["n"] == 2 and where == "state":
            die()
        return real_json(path, obj)

    def atomic_write_text(path, text):
        if saves["n"] == 2 and where == "pointer":
            from lmforge.io_utils import AtomicFile

            AtomicFile(path).file.write(text[:3].encode())  # the pointer's temp file, half written
            die()
        return real_text(path, text)

    checkpoint.save_model, checkpoint.save_file = save_model, save_file
    checkpoint.atomic_write_json, checkpoint.atomic_write_text = atomic_write_json, atomic_write_text
    make_trainer(tiny_cfg(run), run, init_seed=0).fit()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "kill-in-save":
        _kill_in_save(Path(sys.argv[2]), sys.argv[3])
    sys.exit(3)  # the kill did not happen
