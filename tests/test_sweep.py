"""The sweep runner: shared inputs linked, finished runs read back, failures reported, configs checked."""

import json
from pathlib import Path
from typing import Any

import pytest

from lmforge.config import ConfigError, RunConfig
from lmforge.recipe import load_config
from lmforge.sweep import SweepRun, run_sweep


def fake_runner(cfg: RunConfig, progress: bool) -> dict[str, Any]:
    """Stands in for train + eval: writes an eval.json whose loss is a function of the config, and
    counts its calls in a file (so spawned workers count too). log_every 7 fails."""
    if cfg.train.log_every == 7:
        raise RuntimeError("loss is nan at step 7")
    with (cfg.out.parent / "calls.txt").open("a") as f:
        f.write(cfg.out.name + "\n")
    loss = 5.0 - cfg.train.max_steps / 100
    (cfg.out / "eval.json").write_text(json.dumps({"loss": loss, "sources": {"a": {"loss": loss}}}))
    return {"train": {"steps": cfg.train.max_steps, "tokens_seen": 64 * cfg.train.max_steps}}


@pytest.fixture
def base(tmp_path: Path) -> RunConfig:
    """A base out_dir with stand-ins for the shared stages' outputs (the runner here never reads them)."""
    out = tmp_path / "base"
    for part in ("data", "tokenizer", "tokens"):
        (out / part).mkdir(parents=True)
    for split in ("train", "val"):
        (out / "tokens" / f"{split}.json").write_text(json.dumps({"split": split}))
    return load_config(None, [f"out_dir={out}"])


def calls(base: RunConfig) -> list[str]:
    path = base.out / "sweep" / "calls.txt"
    return path.read_text().split() if path.exists() else []


RUNS = [SweepRun("s30", {"train.max_steps": 30}), SweepRun("s40", {"train.max_steps": 40, "train.grad_clip": 0.5})]


def test_runs_collect_results_in_order_with_shared_inputs_linked(base: RunConfig) -> None:
    results = run_sweep(base, RUNS, progress=False, runner=fake_runner)
    assert [r.name for r in results] == ["s30", "s40"] and all(r.status == "done" for r in results)
    assert [r.eval["loss"] for r in results] == pytest.approx([4.7, 4.6])
    assert results[1].train == {"steps": 40, "tokens_seen": 2560}
    run_dir = base.out / "sweep" / "s40"
    for part in ("data", "tokenizer", "tokens"):  # relative links to the base's, not copies
        assert (run_dir / part).is_symlink() and (run_dir / part).resolve() == (base.out / part).resolve()
        assert not Path((run_dir / part).readlink()).is_absolute()
    recipe = load_config(run_dir / "recipe.yaml")  # the run's full config, reproducible on its own
    assert recipe.train.grad_clip == 0.5 and recipe.out == run_dir


def test_finished_runs_are_read_back_and_a_changed_run_is_redone_from_scratch(base: RunConfig) -> None:
    run_sweep(base, RUNS, progress=False, runner=fake_runner)
    again = run_sweep(base, RUNS, progress=False, runner=fake_runner)
    assert [r.status for r in again] == ["cached", "cached"] and calls(base) == ["s30", "s40"]
    assert again[1].eval["loss"] == pytest.approx(4.6) and again[1].train["steps"] == 40
    stale = base.out / "sweep" / "s40" / "checkpoints" / "step_00000040"
    stale.mkdir(parents=True)  # left by the old config: must not be resumed by the new one
    changed = run_sweep(base, [RUNS[0], SweepRun("s40", {"train.max_steps": 50})], progress=False, runner=fake_runner)
    assert [r.status for r in changed] == ["cached", "done"] and calls(base)[-1] == "s40"
    assert changed[1].eval["loss"] == pytest.approx(4.5) and not stale.exists()


def test_new_token_sets_invalidate_finished_runs(base: RunConfig) -> None:
    run_sweep(base, RUNS[:1], progress=False, runner=fake_runner)
    (base.out / "tokens" / "val.json").write_text(json.dumps({"split": "val", "retokenized": True}))
    assert run_sweep(base, RUNS[:1], progress=False, runner=fake_runner)[0].status == "done"


def test_a_failing_run_is_reported_and_the_sweep_goes_on(base: RunConfig) -> None:
    runs = [SweepRun("bad", {"train.log_every": 7}), *RUNS]
    results = run_sweep(base, runs, progress=False, runner=fake_runner)
    assert [r.status for r in results] == ["failed", "done", "done"]
    assert results[0].error == "RuntimeError: loss is nan at step 7" and not results[0].ok
    state = json.loads((base.out / "sweep" / "bad" / "run.json").read_text())
    assert state["status"] == "failed" and "Traceback" in state["traceback"]
    # A failed run is tried again next time; the finished ones are not.
    again = run_sweep(base, runs, progress=False, runner=fake_runner)
    assert [r.status for r in again] == ["failed", "cached", "cached"]


def test_bad_overrides_and_names_fail_before_any_run(base: RunConfig) -> None:
    with pytest.raises(ConfigError, match="sweep run 'typo': train.max_stepz: unknown key"):
        run_sweep(base, [RUNS[0], SweepRun("typo", {"train.max_stepz": 5})], progress=False, runner=fake_runner)
    with pytest.raises(ConfigError, match="must be unique"):
        run_sweep(base, [RUNS[0], RUNS[0]], progress=False, runner=fake_runner)
    with pytest.raises(ConfigError, match="plain file name"):
        run_sweep(base, [SweepRun("../escape", {})], progress=False, runner=fake_runner)
    assert calls(base) == []


def test_real_directories_in_place_of_the_links_are_refused(base: RunConfig) -> None:
    (base.out / "sweep" / "s30" / "tokens").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="real tokens/"):
        run_sweep(base, RUNS[:1], progress=False, runner=fake_runner)


def test_worker_processes_give_the_same_results(base: RunConfig) -> None:
    runs = [*RUNS, SweepRun("bad", {"train.log_every": 7})]
    results = run_sweep(base, runs, workers=2, progress=False, runner=fake_runner)
    assert [r.status for r in results] == ["done", "done", "failed"]
    assert [r.eval.get("loss") for r in results] == [4.7, 4.6, None] and sorted(calls(base)) == ["s30", "s40"]
