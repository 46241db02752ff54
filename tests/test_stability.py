"""P4: NaN/Inf guard, loss-spike detection and rollback (PaLM §5.1), fault injection, keep-every-K."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import VOCAB, CountingLoader, tiny_cfg

from lmforge.config import ConfigError, StabilityConfig
from lmforge.models import build_model
from lmforge.objectives import ObjectiveContext, build_objective
from lmforge.tokenizer.special_tokens import SpecialTokens
from lmforge.train.checkpoint import NonFiniteWeights, find_latest, read_state, save_checkpoint
from lmforge.train.stability import detect, id_ranges, injection, rollback_order, zscore
from lmforge.train.trainer import NonFiniteLoss, Trainer, TrainingDiverged

# Small-run scale: judge z-scores after 8 good steps, rewind 4 steps, skip 3 global batches.
STEPS = 32
STABLE = [f"train.max_steps={STEPS}", "train.checkpoint_every=4", "train.stability.window=20",
          "train.stability.min_steps=8", "train.stability.rewind_steps=4", "train.stability.skip_batches=3"]
# Final loss (mean of the last 4 steps) of a recovered run vs the uninterrupted one, in nats. The
# recovered run makes as many updates, on other batches of the same stream; at step 32 the loss is
# about 0.6 and the 10 runs measured differ from it by at most 0.015.
TOLERANCE = 0.05


def trainer_for(tmp: Path, *overrides: str, seed: int = 0) -> Trainer:
    """test_train.make_trainer with the seed varying the init and the loader's token stream."""
    cfg = tiny_cfg(tmp, *STABLE, f"seed={seed}", *overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    objective = build_objective(cfg.objective, ObjectiveContext(SpecialTokens(eos=0), VOCAB, cfg.seed))
    loader = CountingLoader(objective.window(cfg.train.seq_len), cfg.train.batch_size, seed=seed)
    return Trainer(cfg, model, loader, objective, tmp / "ckpt", tmp / "metrics.jsonl", progress=False)


def records(tmp: Path) -> tuple[list[dict], list[dict]]:
    """(per-step records, rollback events) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if r.get("event") == "rollback"]


def final_loss(losses: dict[int, float]) -> float:
    return float(np.mean([losses[s] for s in range(STEPS - 3, STEPS + 1)]))


# ---------------------------------------------------------------------------- the pure functions


def test_detect_judges_non_finite_values_always_and_z_scores_after_min_steps():
    cfg = StabilityConfig(window=10, min_steps=5, z_threshold=6.0, grad_z_threshold=6.0, min_rel_std=0.02)
    calm = [(3.0 + 0.01 * (i % 3), 1.0 + 0.05 * (i % 2)) for i in range(10)]
    assert detect([], math.nan, 1.0, cfg) == "loss is nan"
    assert detect([], 2.0, math.inf, cfg) == "gradient norm is inf"  # a finite loss with Inf gradients
    assert detect(calm[:4], 300.0, 1.0, cfg) is None  # too few good steps to judge a z-score
    assert "loss 300 is" in detect(calm, 300.0, 1.0, cfg)
    assert "gradient norm 50 is" in detect(calm, 3.0, 50.0, cfg)
    assert detect(calm, 3.1, 1.1, cfg) is None
    assert detect(calm, 1.0, 1.0, cfg) is None  # one-sided: a drop in loss is no spike
    off = StabilityConfig(window=10, min_steps=5, grad_z_threshold=0.0)
    assert detect(calm, 3.0, 50.0, off) is None
    # On a plateau the std floor (2% of the mean) keeps a wiggle from scoring as a spike.
    flat = [(2.0, 1.0)] * 10
    assert zscore(2.01, [2.0] * 10, 0.02) == pytest.approx(0.25)
    assert detect(flat, 2.01, 1.0, cfg) is None and detect(flat, 2.5, 1.0, cfg) is not None
    # Only the last `window` steps count: an old, noisy stretch does not hide a spike now.
    noisy = [(10.0 * (i % 2), 1.0) for i in range(20)]
    assert detect(noisy + calm, 3.5, 1.0, cfg) is not None


def test_rollback_order_prefers_the_newest_checkpoint_at_least_rewind_steps_back():
    assert rollback_order([4, 8, 12, 16], spike_step=17, rewind_steps=4) == [12, 8, 4, 16]
    assert rollback_order([4, 8, 12, 16], spike_step=17, rewind_steps=0) == [16, 12, 8, 4]
    assert rollback_order([12, 16], spike_step=17, rewind_steps=10) == [12, 16]  # none that far: the oldest
    assert rollback_order([16, 20], spike_step=16, rewind_steps=0) == []  # none before the spike


def test_injections_fire_once_and_ids_are_logged_as_runs():
    cfg = tiny_cfg(Path("."), "train.fault_injection.spike_at=[5]", "train.fault_injection.nan_at=[7]").train
    fired: set[str] = set()
    assert injection(cfg.fault_injection, 4, fired) == (1.0, None)
    assert injection(cfg.fault_injection, 5, fired) == (1e4, "spike@5")
    factor, name = injection(cfg.fault_injection, 7, fired)
    assert math.isnan(factor) and name == "nan@7"
    assert injection(cfg.fault_injection, 7, {"nan@7"}) == (1.0, None)
    assert id_ranges([7, 3, 4, 5, 9, 10, 4]) == [[3, 5], [7, 7], [9, 10]] and id_ranges([]) == []


def test_config_is_checked():
    for bad, key in [("train.stability.window=1", "train.stability.window"),
                     ("train.stability.min_steps=60", "train.stability.min_steps"),
                     ("train.stability.z_threshold=0", "train.stability.z_threshold"),
                     ("train.fault_injection.nan_at=[0]", "train.fault_injection.nan_at"),
                     ("train.keep_every=-1", "train.keep_every"),
                     ("train.stability.skip_batchs=3", "train.stability.skip_batchs: unknown key")]:
        with pytest.raises(ConfigError, match=key):
            tiny_cfg(Path("."), bad)


# ---------------------------------------------------------------------------- the guard


@pytest.mark.parametrize("extra", [["train.stability.enabled=false"], [], ["train.grad_clip=0"]])
def test_finite_loss_with_nan_gradients_never_steps(tmp_path: Path, extra: list[str]):
    trainer = trainer_for(tmp_path, *extra)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    first = next(trainer.model.parameters())
    first.register_hook(lambda g: g * math.nan)  # the loss stays finite; one gradient is NaN
    with pytest.raises(NonFiniteLoss, match="gradient norm is nan at step 1"):
        trainer.fit()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} was updated"
    assert find_latest(tmp_path / "ckpt") is None  # and nothing was saved


def test_non_finite_weights_are_never_saved(tmp_path: Path):
    trainer = trainer_for(tmp_path)
    save_checkpoint(tmp_path, 1, trainer.model, None, {})
    with torch.no_grad():
        trainer.model.get_parameter(next(n for n, _ in trainer.model.named_parameters())).view(-1)[0] = math.inf
    with pytest.raises(NonFiniteWeights, match="not saving step 2: non-finite values in"):
        save_checkpoint(tmp_path, 2, trainer.model, None, {})
    assert find_latest(tmp_path).name == "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_a_nan_before_any_checkpoint_and_too_many_spikes_give_up_clearly(tmp_path: Path):
    early = trainer_for(tmp_path / "a", "train.fault_injection.nan_at=[2]")
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2, and there is no checkpoint before it"):
        early.fit()
    many = trainer_for(tmp_path / "b", "train.fault_injection.nan_at=[10,11,12]", "train.stability.max_rollbacks=2")
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 12: gave up after 2 rollbacks"):
        many.fit()
    assert read_state(find_latest(tmp_path / "b" / "ckpt"))["stability"]["pending"] == 2
    # Rollbacks the run got past (a checkpoint after the spike) do not count towards the bound.
    spread = trainer_for(tmp_path / "c", "train.fault_injection.nan_at=[10,20,30]", "train.stability.max_rollbacks=2")
    assert spread.fit().final_step == STEPS
    assert read_state(find_latest(tmp_path / "c" / "ckpt"))["stability"]["rollbacks"] == 3


# ---------------------------------------------------------------------------- rollback


CASES = [  # (seed, spike step, NaN step): 10 runs, the spike first or the NaN first, early and late
    (0, 12, 20), (0, 23, 14), (1, 10, 27), (1, 18, 11), (2, 15, 24),
    (2, 29, 13), (3, 11, 17), (3, 21, 30), (4, 13, 26), (4, 25, 16),
]


def test_ten_runs_recover_from_a_spike_and_a_nan(tmp_path: Path):
    baselines = {seed: trainer_for(tmp_path / f"base{seed}", seed=seed).fit() for seed in {c[0] for c in CASES}}
    assert all(not records(tmp_path / f"base{s}")[1] for s in baselines)  # no false alarm without faults
    recovered = 0
    for seed, spike, nan in CASES:
        run = tmp_path / f"run{seed}_{spike}_{nan}"
        trainer = trainer_for(run, f"train.fault_injection.spike_at=[{spike}]",
                              f"train.fault_injection.nan_at=[{nan}]", seed=seed)
        result = trainer.fit()
        steps, events = records(run)
        assert result.final_step == STEPS and all(math.isfinite(v) for v in result.losses.values())
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # the abandoned steps are dropped
        assert [e["spike_step"] for e in events] == sorted([spike, nan])
        reasons = {e["spike_step"]: e["reason"] for e in events}
        assert "standard deviations above the mean" in reasons[spike] and reasons[nan] == "loss is nan"
        for e in events:
            restored = int(e["restored"].removeprefix("step_"))
            assert restored == e["step"] and restored <= e["spike_step"] - 4  # rewind_steps back
            assert e["skipped_loader_batches"] >= 3 * 2  # skip_batches x grad_accum loader batches, at least
            n_ids = sum(b - a + 1 for a, b in e["skipped_sample_ids"])
            assert n_ids == e["skipped_loader_batches"] * 4 and e["skipped_doc_ids"]  # 4 rows per loader batch
        state = read_state(find_latest(run / "ckpt"))["stability"]
        assert state["rollbacks"] == 2 and state["fired"] == sorted([f"spike@{spike}", f"nan@{nan}"])
        gap = abs(final_loss(result.losses) - final_loss(baselines[seed].losses))
        assert gap < TOLERANCE, f"seed {seed}: recovered final loss is {gap:.3f} from the uninterrupted run"
        recovered += 1
    assert recovered == 10


def test_skipped_batches_are_never_trained_on_and_a_second_rollback_skips_further(tmp_path: Path):
    # Two spikes close together roll back to the same checkpoint; the second must skip past
    # everything the first one drew, or the run would retrain on the batches around the spike.
    trainer = trainer_for(tmp_path, "train.fault_injection.spike_at=[13,14]")
    seen: list[int] = []
    inner = trainer.objective

    def objective(batch):
        seen.extend(batch.sample_ids.tolist())
        return inner(batch)

    objective.window = inner.window
    trainer.objective = objective
    trainer.fit()
    _, (first, second) = records(tmp_path)
    assert first["restored"] == second["restored"] == "step_00000008"
    assert second["skipped_sample_ids"][0][1] > first["skipped_sample_ids"][0][1]
    skipped = {i for e in (first, second) for a, b in e["skipped_sample_ids"] for i in range(a, b + 1)}
    # Trained on since the last rollback: steps 9..32 from the final loader position back.
    trained_after = set(seen[-(STEPS - 8) * 2 * 4:])
    assert not skipped & trained_after


def test_a_resume_after_a_rollback_neither_refires_nor_replays(tmp_path: Path):
    spiky = ["train.fault_injection.spike_at=[14]", "train.fault_injection.nan_at=[22]"]
    whole = trainer_for(tmp_path / "a", *spiky).fit()
    first = trainer_for(tmp_path / "b", *spiky).fit(stop_after=18)  # killed after the first rollback
    assert len(records(tmp_path / "b")[1]) == 1 and first.final_step == 18
    again = trainer_for(tmp_path / "b", *spiky, seed=0)
    resumed = again.fit()
    assert resumed.resumed_from == 16
    assert resumed.losses == {s: whole.losses[s] for s in range(17, STEPS + 1)}  # the same curve, exactly
    curve = lambda run: [(r["step"], r["loss"]) for r in records(run)[0]]  # noqa: E731
    events = lambda run: [json.dumps(e, sort_keys=True) for e in records(run)[1]]  # noqa: E731 (NaN != NaN)
    assert curve(tmp_path / "b") == curve(tmp_path / "a") and events(tmp_path / "b") == events(tmp_path / "a")


# ---------------------------------------------------------------------------- what is kept


def test_keep_last_n_plus_every_k_plus_the_rollback_anchor(tmp_path: Path):
    trainer = trainer_for(tmp_path, "train.max_steps=40", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                          "train.keep_every=10", "train.stability.rewind_steps=7")
    trainer.fit()
    kept = sorted(int(p.name.removeprefix("step_")) for p in (tmp_path / "ckpt").glob("step_*"))
    # Newest two (38, 40); multiples of 10 (10, 20, 30, 40); what a spike at 41.. may roll back to: the
    # newest at or before 41 - 7 = 34, and all after it (keep-2 alone would have deleted 34 and 36).
    assert kept == [10, 20, 30, 34, 36, 38, 40]
