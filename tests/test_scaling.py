"""Scaling laws: the fit recovers a known law, too few runs are refused, the frontier's closed form is
the true minimum, finished runs are read back, and one tiny sweep runs end to end through the runner."""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import ConfigError, save_config
from lmforge.models import build_model, count_params
from lmforge.recipe import load_config
from lmforge.scaling import add_cli_options, cli_main, parse_count, parse_sizes, plan_runs, read_run, scaling_law
from lmforge.scaling_fit import ScalingFit, ScalingPoint, bootstrap_fits, fit_scaling_law, predict

TRUE = {"E": 1.7, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.28}


def law(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def synthetic(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 sizes x 4 budgets over 3 decades each, the loss off the law by `noise` (relative, lognormal)."""
    n, d = np.meshgrid(np.geomspace(1e5, 1e8, 4), np.geomspace(1e7, 1e10, 4), indexing="ij")
    n, d = n.ravel(), d.ravel()
    return n, d, law(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))


# ---------------------------------------------------------------------------- the fit


def test_a_noiseless_law_is_recovered_exactly() -> None:
    fit = fit_scaling_law(*synthetic(0.0))
    for key, value in TRUE.items():
        assert getattr(fit, key) == pytest.approx(value, rel=1e-3), key


@pytest.mark.parametrize("seed", [0, 1])
def test_exponents_are_recovered_from_noisy_losses_and_the_fit_is_deterministic(seed: int) -> None:
    data = synthetic(0.005, seed)
    fit = fit_scaling_law(*data)
    assert abs(fit.alpha - TRUE["alpha"]) < 0.05 and abs(fit.beta - TRUE["beta"]) < 0.05
    assert abs(fit.E - TRUE["E"]) < 0.3
    assert fit_scaling_law(*data) == fit


def points_of(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> list[ScalingPoint]:
    return [ScalingPoint(str(i), int(a), int(b), float(c)) for i, (a, b, c) in enumerate(zip(n, d, loss, strict=True))]


def test_a_prediction_carries_a_bootstrap_interval_that_widens_with_extrapolation() -> None:
    n, d, loss = synthetic(0.005)
    fit = fit_scaling_law(n, d, loss)
    boots = bootstrap_fits(points_of(n, d, loss), fit, n_boot=20, seed=0)
    assert len(boots) == 20 and len({b.alpha for b in boots}) > 1  # resamples differ
    near, far = predict(fit, boots, 1e8, 1e10), predict(fit, boots, 1e10, 1e12)
    for p in (near, far):
        low, high = p["interval"]
        assert low < p["loss"] < high
    assert np.diff(far["interval"]) > 2 * np.diff(near["interval"]) and far["compute"] == pytest.approx(6e22)
    # Without noise every resample fits the law itself: the interval closes on the true loss.
    n, d, loss = synthetic(0.0)
    exact = fit_scaling_law(n, d, loss)
    p = predict(exact, bootstrap_fits(points_of(n, d, loss), exact, n_boot=5), 1e10, 1e12)
    assert p["interval"] == pytest.approx([law(1e10, 1e12)] * 2, rel=1e-3)


def test_fewer_runs_than_the_fit_needs_are_refused_saying_how_many() -> None:
    n, d, loss = synthetic(0.0)
    with pytest.raises(ValueError, match="5 parameters .* needs at least 6 finished runs; got 5"):
        fit_scaling_law(n[:5], d[:5], loss[:5])
    with pytest.raises(ValueError, match="at least 2 model sizes and 2 token budgets; got 1 size"):
        fit_scaling_law([1e6] * 8, d[:8], loss[:8])
    cfg = load_config(None, [])
    with pytest.raises(ConfigError, match=r"needs at least 6 runs .* 2 size\(s\) x 2 budget\(s\) make 4"):
        plan_runs(cfg, parse_sizes("32:1,64:2", cfg.model), [1e5, 2e5], {})


def test_the_closed_form_frontier_is_the_brute_force_minimum() -> None:
    fit = ScalingFit(**TRUE, objective=0.0, n_runs=16)
    n_grid = np.geomspace(1e3, 1e13, 400_001)
    for compute in (1e15, 1e18, 1e21):
        n_opt, d_opt, l_opt = fit.compute_optimal(compute)
        losses = fit.loss(n_grid, compute / (6 * n_grid))
        assert n_opt == pytest.approx(n_grid[np.argmin(losses)], rel=1e-3)
        assert l_opt == pytest.approx(losses.min(), rel=1e-9) and 6 * n_opt * d_opt == pytest.approx(compute)
    with pytest.raises(ValueError, match="exponents must be > 0"):
        ScalingFit(1.0, 1.0, 1.0, -0.1, 0.3, 0.0, 6).compute_optimal(1e18)


# ---------------------------------------------------------------------------- sizes and budgets


def test_counts_and_sizes_parse_and_bad_ones_name_the_flag() -> None:
    assert [parse_count(t) for t in ("300k", "1.5M", "2e9", "7B", "12")] == [3e5, 1.5e6, 2e9, 7e9, 12]
    with pytest.raises(ConfigError, match="--tokens: expected a positive number"):
        parse_count("lots", "--tokens")
    model = load_config(None, []).model
    shapes = parse_sizes("64:2,96:3:1,1M", model)
    assert [(s.d_model, s.n_layers, s.n_heads) for s in shapes[:2]] == [(64, 2, 2), (96, 3, 1)]
    big = build_model(dataclasses.replace(shapes[2], vocab_size=300), init=False)
    assert 0.8e6 < count_params(big, non_embedding=True) < 1.25e6  # a parameter target lands near it
    with pytest.raises(ConfigError, match="--sizes: expected d_model:n_layers"):
        parse_sizes("64x2", model)
    with pytest.raises(ConfigError, match="--sizes: expected d_model:n_layers"):
        parse_sizes("64:2:0", model)


def test_each_run_trains_its_own_budget_with_the_schedule_ending_there() -> None:
    cfg = load_config(None, [])
    defaults = {"train.seq_len": 32, "train.batch_size": 4, "train.schedule.warmup_steps": 10}
    runs = plan_runs(cfg, parse_sizes("32:1,64:2,96:3", cfg.model), [1280, 12800], defaults)
    assert [r.name for r in runs[:2]] == ["d32-l1-h1-t1.28k", "d32-l1-h1-t12.8k"] and len(runs) == 6
    assert [r.overrides["train.max_steps"] for r in runs[:2]] == [10, 100]  # budget / (32 x 4) tokens per step
    assert [r.overrides["train.schedule.warmup_steps"] for r in runs[:2]] == [2, 10]  # never most of a short run
    assert runs[5].overrides["model.d_model"] == 96 and runs[5].overrides["train.checkpoint_every"] == 100


# ---------------------------------------------------------------------------- finished runs


def fake_run(root: Path, name: str, d_model: int, n_layers: int, tokens: int, loss: float) -> Path:
    """A run directory as train and eval leave it: config.yaml, metrics.jsonl, eval.json."""
    run = root / name
    cfg = load_config(None, [f"out_dir={run}", f"model.d_model={d_model}", f"model.n_layers={n_layers}",
                             "model.n_heads=2", "model.vocab_size=500"])
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    records = [{"step": s, "loss": 9.0, "tokens": tokens * s // 4} for s in (1, 2, 3, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "tok')
    (run / "eval.json").write_text(json.dumps({"loss": loss, "sources": {}}))
    return run


def test_finished_runs_are_read_from_their_metrics_eval_and_config(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "r0", 64, 2, 40_000, 4.25)
    point = read_run(run)
    model = build_model(load_config(run / "config.yaml").model, init=False)
    assert point.params == count_params(model, non_embedding=True) < count_params(model)
    assert (point.tokens, point.loss, point.name) == (40_000, 4.25, "r0")  # the last whole record's tokens
    (run / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="no training records"):
        read_run(run)


def non_embedding(d_model: int, n_layers: int) -> int:
    """Counted with another vocabulary than fake_run's: the count must not depend on it."""
    cfg = load_config(None, [f"model.d_model={d_model}", f"model.n_layers={n_layers}", "model.n_heads=2",
                             "model.vocab_size=9"])
    return count_params(build_model(cfg.model, init=False), non_embedding=True)


def test_a_fit_from_finished_runs_writes_its_json_and_plot(tmp_path: Path) -> None:
    sweep = tmp_path / "old" / "sweep"
    for d_model, n_layers in ((32, 1), (64, 2), (128, 3)):
        for tokens in (10**6, 10**7, 10**8):
            n = non_embedding(d_model, n_layers)
            fake_run(sweep, f"d{d_model}-t{tokens}", d_model, n_layers, tokens, float(law(n, tokens)))
    (sweep / "failed-run").mkdir()  # no eval.json: not a finished run
    cfg = load_config(None, [f"out_dir={tmp_path / 'new'}"])
    result = scaling_law(cfg, runs_from=[tmp_path / "old"], predict_at=(1e7, 1e9), n_boot=10)
    assert len(result["runs"]) == 9
    assert abs(result["fit"]["alpha"] - TRUE["alpha"]) < 0.05 and abs(result["fit"]["beta"] - TRUE["beta"]) < 0.05
    assert result["prediction"]["loss"] == pytest.approx(law(1e7, 1e9), rel=0.02)
    out = tmp_path / "new" / "scaling"
    saved = json.loads((out / "scaling.json").read_text())
    assert saved["fit"] == result["fit"] and len(saved["frontier"]) == 25
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="no finished run"):
        scaling_law(cfg, runs_from=[tmp_path / "new"])
    with pytest.raises(ConfigError, match="--runs-from reads finished runs"):
        scaling_law(cfg, sizes="32:1,64:2", runs_from=[tmp_path / "old"])


# ---------------------------------------------------------------------------- end to end

TINY = ["tokenizer.vocab_size=400", "data.builtin.max_prose_bytes=150000", "data.builtin.max_code_bytes=150000",
        "data.val_fraction=0.05", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4",
        "train.log_every=5", "eval.max_tokens=256", "eval.generate.max_new_tokens=2"]


def cli(argv: list[str]) -> int:
    """What `lmforge scaling` does with its arguments, through the same pair of functions cli.py calls."""
    sp = argparse.ArgumentParser()
    add_cli_options(sp)
    sp.add_argument("overrides", nargs="*")
    args = sp.parse_args(argv)
    return cli_main(args, load_config(None, args.overrides), False)


def test_a_tiny_sweep_on_the_builtin_corpus_fits_and_predicts(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["--sizes", "16:1:2,32:1", "--tokens", "640,1280,1920", "--predict", "1M:10M", "--bootstrap", "5",
            f"out_dir={out}", *TINY]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "scaling" / "scaling.json").read_text())
    assert [r["name"] for r in res["runs"]] == [f"d{d}-l1-h{h}-t{t}" for d, h in ((16, 2), (32, 1))
                                                 for t in ("640", "1.28k", "1.92k")]  # by size, then tokens
    assert [r["tokens"] for r in res["runs"]] == [640, 1280, 1920] * 2  # 5, 10, 15 steps of 4 x 32 tokens
    assert all(r["loss"] > 0 for r in res["runs"]) and res["runs"][0]["params"] < res["runs"][3]["params"]
    assert res["prediction"]["params"] == 10**6 and "prediction: N 1M, D 10M" in printed
    assert (out / "scaling" / "scaling.png").is_file()
    recipe = load_config(out / "sweep" / "d32-l1-h1-t1.92k" / "recipe.yaml")
    assert recipe.train.max_steps == 15 and recipe.train.batch_size == 4  # the command line won over the defaults

    # Again, reading the finished runs instead of training: the same points, so the same fit.
    assert cli(["--runs-from", str(out / "sweep"), "--predict", "1M:10M", "--bootstrap", "5", f"out_dir={out}"]) == 0
    again = json.loads((out / "scaling" / "scaling.json").read_text())
    assert again["runs"] == res["runs"] and again["fit"] == res["fit"]
