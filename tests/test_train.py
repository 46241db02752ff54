"""Trainer and checkpoints: resume after an interruption continues the same loss curve."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import ConfigError
from lmforge.models import build_model
from lmforge.objectives import ObjectiveContext, build_objective
from lmforge.objectives.base import AttentionLayout
from lmforge.recipe import load_config
from lmforge.tokenizer.special_tokens import SpecialTokens
from lmforge.tokens.loader import Batch
from lmforge.train.checkpoint import find_latest, load_checkpoint, save_checkpoint
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import NonFiniteLoss, Trainer

VOCAB = 97


class CountingLoader:
    """A stateful loader over a periodic (so learnable) token stream; its state is one integer."""

    def __init__(self, window: int, batch: int, seed: int = 0):
        motif = np.random.default_rng(seed).integers(0, VOCAB, size=37)
        self.stream = np.tile(motif, 50_000 // len(motif))
        self.window, self.batch, self.cursor = window, batch, 0

    def next_batch(self):
        rows, ids = [], []
        for _ in range(self.batch):
            ids.append(self.cursor)
            start = (self.cursor * (self.window - 1)) % (len(self.stream) - self.window)
            rows.append(self.stream[start : start + self.window])
            self.cursor += 1
        tokens = np.stack(rows).astype(np.int64)
        return Batch(tokens, np.zeros_like(tokens), np.array(ids, dtype=np.int64))

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def tiny_cfg(tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [
            f"out_dir={tmp_path}",
            f"model.vocab_size={VOCAB}",
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.max_seq_len=32",
            "train.seq_len=16",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.max_steps=8",
            "train.schedule.warmup_steps=2",
            "train.checkpoint_every=3",
            "train.optimizer.lr=1e-2",
            *overrides,
        ],
    )


def make_trainer(cfg, run_dir: Path, init_seed: int) -> Trainer:
    torch.manual_seed(init_seed)
    model = build_model(cfg.model)
    objective = build_objective(cfg.objective, ObjectiveContext(SpecialTokens(eos=0), VOCAB, cfg.seed))
    loader = CountingLoader(objective.window(cfg.train.seq_len), cfg.train.batch_size)
    return Trainer(cfg, model, loader, objective, run_dir / "ckpt", run_dir / "metrics.jsonl", progress=False)


def test_resume_equals_uninterrupted(tmp_path: Path):
    cfg = tiny_cfg(tmp_path)
    full = make_trainer(cfg, tmp_path / "a", init_seed=0).fit()
    assert full.final_step == 8 and len(full.losses) == 8

    first = make_trainer(cfg, tmp_path / "b", init_seed=0).fit(stop_after=5)  # "crash" after step 5
    assert first.final_step == 5
    # A fresh process: different init, so only a real resume can reproduce the curve.
    second = make_trainer(cfg, tmp_path / "b", init_seed=99).fit()
    assert second.resumed_from == 3  # the last checkpoint before the crash
    assert sorted(second.losses) == [4, 5, 6, 7, 8]
    for step, loss in second.losses.items():
        assert loss == full.losses[step], f"step {step}: {loss} != {full.losses[step]}"

    # The metrics log has no duplicated steps after the replay and matches the uninterrupted run.
    logged = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert [r["loss"] for r in logged] == [full.losses[s] for s in range(1, 9)]


def test_loss_decreases_and_grad_accum_counts_tokens(tmp_path: Path):
    cfg = tiny_cfg(tmp_path, "train.max_steps=30", "train.checkpoint_every=100")
    result = make_trainer(cfg, tmp_path, init_seed=0).fit()
    assert result.tokens_seen == 30 * 2 * 4 * 16
    assert np.mean([result.losses[s] for s in range(26, 31)]) < result.losses[1] - 0.05


def test_non_finite_loss_is_reported(tmp_path: Path):
    cfg = tiny_cfg(tmp_path)
    trainer = make_trainer(cfg, tmp_path, init_seed=0)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="at step 1"):
        trainer.fit()


def test_checkpoint_roundtrip_and_pruning(tmp_path: Path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.train.optimizer)
    x = torch.randint(0, VOCAB, (2, 8))
    model(x).float().mean().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {"loader": {"cursor": step}}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    latest = find_latest(tmp_path)
    assert latest is not None and latest.name == "step_00000003"

    torch.manual_seed(1)
    other = build_model(cfg.model)
    other_opt = build_optimizer(other, cfg.train.optimizer)
    state = load_checkpoint(latest, other, other_opt)
    assert state["step"] == 3 and state["loader"] == {"cursor": 3}
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), other_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid, entry in sa["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, sb["state"][pid][name])


def test_failed_save_leaves_previous_latest(tmp_path: Path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg.model)
    save_checkpoint(tmp_path, 1, model, None, {})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lmforge.train.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, None, {})
    assert find_latest(tmp_path).name == "step_00000001"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "00000002" in p.name] == []


def test_fresh_run_in_an_old_directory_keeps_its_own_checkpoint(tmp_path: Path):
    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg.model)
    for step in (200, 250):  # an earlier, longer run left these behind
        save_checkpoint(tmp_path, step, model, None, {})
    save_checkpoint(tmp_path, 100, model, None, {}, keep=2)
    assert find_latest(tmp_path).name == "step_00000100"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000100"]


def test_torn_metrics_line_does_not_block_resume(tmp_path: Path):
    from lmforge.train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0})
    with log.path.open("a") as f:
        f.write('{"step": 4, "lo')  # the process died mid-append
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]


def test_padding_is_counted_for_the_utilisation_and_survives_resume(tmp_path: Path):
    cfg = tiny_cfg(tmp_path)

    def padded(trainer: Trainer) -> Trainer:
        inner = trainer.objective

        def objective(batch):  # the last 3 positions of every row become padding (segment 0)
            ex = inner(batch)
            segments = torch.ones_like(ex.input_ids)
            segments[:, -3:] = 0
            ex.layout = AttentionLayout(causal=True, segment_ids=segments)
            return ex

        objective.window = inner.window
        trainer.objective = objective
        return trainer

    full = padded(make_trainer(cfg, tmp_path / "a", init_seed=0))
    full.fit()
    assert full.pad_tokens == 8 * 2 * 4 * 3 and full.tokens_seen == 8 * 2 * 4 * 16
    padded(make_trainer(cfg, tmp_path / "b", init_seed=0)).fit(stop_after=5)
    resumed = padded(make_trainer(cfg, tmp_path / "b", init_seed=0))
    resumed.fit()
    assert resumed.pad_tokens == full.pad_tokens


def test_batch_in_tokens_sets_accumulation_and_the_ramp_grows_it_in_tokens(tmp_path: Path):
    cfg = tiny_cfg(tmp_path, "train.batch_tokens=512", "train.max_steps=12", "train.checkpoint_every=100")
    assert cfg.train.grad_accum == 512 // (4 * 16) == 8
    with pytest.raises(ConfigError, match=r"train.batch_tokens: 500 is not a multiple of .* = 4 x 16 = 64"):
        tiny_cfg(tmp_path, "train.batch_tokens=500")
    ramped = tiny_cfg(tmp_path, "train.batch_tokens=512", "train.batch_ramp.start_tokens=64",
                      "train.batch_ramp.ramp_tokens=2048", "train.max_steps=12", "train.checkpoint_every=100")
    trainer = make_trainer(ramped, tmp_path / "r", init_seed=0)
    sizes = []
    for _ in range(12):
        sizes.append(trainer.micro_batches())
        trainer.train_step()
    assert sizes[0] == 1 and sizes == sorted(sizes) and sizes[-1] == 8  # grows to the full batch, never back
    assert trainer.tokens_seen == sum(sizes) * 4 * 16
    # The schedule runs on rows: a ramped run reaches a given LR later in steps, at the same tokens.
    assert trainer.rows_seen == sum(sizes) * 4


def test_loss_per_source_is_logged_and_averages_to_the_loss(tmp_path: Path):
    from lmforge.tokens.loader import PackedLoader
    from lmforge.tokens.shard_writer import ShardWriter
    from lmforge.tokens.shards import TokenDataset

    rng = np.random.default_rng(0)
    sets = {}
    for name, period in (("easy", 5), ("hard", 61)):  # a short cycle is learnt faster than a long one
        with ShardWriter(tmp_path / name, name, "0" * 64, VOCAB) as w:
            motif = rng.integers(1, VOCAB, period)
            for _ in range(40):
                w.add(np.tile(motif, 200 // period), source=name, n_bytes=200)
        sets[name] = TokenDataset(tmp_path / name, name)
    cfg = tiny_cfg(tmp_path, "train.max_steps=30", "train.checkpoint_every=100")
    trainer = make_trainer(cfg, tmp_path / "run", init_seed=0)
    trainer.loader = PackedLoader(sets, 17, 4, seed=0, weights={"easy": 0.5, "hard": 0.5})
    records = [trainer.train_step() for _ in range(30)]
    last = records[-1]
    assert set(last) >= {"loss/easy", "loss/hard"}
    # Equal weights and full rows: each source has half the targets, so the loss is their mean.
    assert last["loss"] == pytest.approx((last["loss/easy"] + last["loss/hard"]) / 2, rel=1e-4)
    assert last["loss/easy"] < last["loss/hard"]
