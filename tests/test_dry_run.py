"""P6 and the reference recipes: `lmforge train --dry-run` prints the run's size, budget, memory and
time without training or writing a checkpoint, and its estimates agree with what training does."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.models import build_model
from lmforge.objectives import ObjectiveContext, build_objective
from lmforge.objectives.base import masked_nll
from lmforge.recipe import load_config
from lmforge.train.dry_run import lr_curve, plan_batches
from lmforge.train.memory_estimate import memory_estimate
from lmforge.train.optim import build_optimizer
from lmforge.train.probe import RandomTokens, default_special_tokens
from lmforge.train.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PNG = b"\x89PNG\r\n\x1a\n"


def dry_run_cli(capsys, *args: str) -> str:
    assert main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out


def params_printed(text: str) -> int:
    return int(re.search(r"^parameters\s+([\d,]+)", text, re.M).group(1).replace(",", ""))


@pytest.mark.parametrize(("recipe", "params", "probe"), [
    ("gpt3-125m", 125e6, "1"),  # the CPU probe: one layer of the real widths, scaled by FLOPs
    ("llama-1b", 1.1e9, "0"),  # no probe here: its one layer runs ~4 s a step on one core
    ("bert-base", 110e6, "0"),
    ("t5-base", 248e6, "0"),
])
def test_reference_recipe_dry_runs_on_cpu(recipe: str, params: float, probe: str, tmp_path: Path, capsys):
    out = tmp_path / recipe
    text = dry_run_cli(capsys, "train", "--config", str(RECIPES / f"{recipe}.yaml"), f"out_dir={out}",
                       "--probe-steps", probe, "train.device=cpu")
    assert abs(params_printed(text) / params - 1) < 0.03, text
    for line in ("weights", "gradients", "optimizer state", "activations", "selective AC", "full AC", "logits",
                 "total"):
        assert re.search(rf"^\s+{line}\s+[\d.,]+ GiB", text, re.M), (line, text)
    assert re.search(r"^time\s+.*per full step", text, re.M) if probe != "0" else "not estimated" in text
    assert (out / "dry_run" / "schedule.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in out.iterdir()) == ["dry_run"]  # no checkpoints, config or metrics
    assert sorted(p.name for p in (out / "dry_run").iterdir()) == ["report.json", "schedule.png"]


def test_gpt3_recipe_is_the_published_setting(capsys, tmp_path: Path):
    cfg = load_config(RECIPES / "gpt3-125m.yaml", [f"out_dir={tmp_path}"])
    tc = cfg.train
    assert tc.grad_accum * tc.batch_size * tc.seq_len == 2**19  # 0.5M tokens
    assert abs(tc.schedule.warmup_steps * 2**19 / 375e6 - 1) < 0.01
    plan = plan_batches(cfg)
    assert abs(plan.total_tokens / 300e9 - 1) < 0.001
    assert plan.ramp[0] * tc.batch_size * tc.seq_len == 32768 and len(plan.ramp) > 0


@pytest.mark.parametrize(("recipe", "rows", "steps", "warmup", "tokens"), [
    ("bert-base", 256, 1_000_000, 5000, None),  # BERT's batch of 256 x 512 and its 1M steps
    ("t5-base", 128, None, 2000, 2**35),  # T5's batch of 128 x 512 inputs and its 2^35 tokens
])
def test_bert_and_t5_recipes_are_the_published_sizes_with_the_seeds_settings(
        recipe: str, rows: int, steps: int | None, warmup: int, tokens: int | None, tmp_path: Path):
    cfg = load_config(RECIPES / f"{recipe}.yaml", [f"out_dir={tmp_path}"])
    tc, plan = cfg.train, plan_batches(cfg)
    assert tc.grad_accum * tc.batch_size == rows and tc.seq_len == 512
    assert tc.schedule.warmup_steps == warmup and 0.001 <= warmup / tc.max_steps <= 0.005
    assert (tc.optimizer.name, tc.optimizer.beta2, tc.optimizer.weight_decay, tc.grad_clip) == ("adamw", 0.95, 0.1, 1.0)
    assert tc.schedule.min_lr_ratio == 0.1 and plan.ramp[0] * tc.batch_size * tc.seq_len == 16384
    assert tc.max_steps == steps if steps else plan.total_tokens == tokens


def test_the_probe_times_an_objective_that_reads_token_strings(capsys, tmp_path: Path):
    """MLM with next-sentence prediction finds sentence ends in token strings: the probe gives it a
    stand-in vocabulary (no tokenizer is trained before a dry run), so BERT gets a time estimate."""
    text = dry_run_cli(capsys, "train", "--config", str(RECIPES / "bert.yaml"), f"out_dir={tmp_path}",
                       "--probe-steps", "1", "train.device=cpu")
    assert re.search(r"^time\s+[\d.,]+ \w+ per full step", text, re.M), text


def test_run_dry_run_probes_the_real_model(capsys, tmp_path: Path):
    """The demo's model is small: a CPU probes the real model and micro-batch; no stage has run."""
    text = dry_run_cli(capsys, "run", f"out_dir={tmp_path}", "--probe-steps", "1", "train.device=cpu")
    assert "from tokenizer.vocab_size" in text and "the real model and micro-batch" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dry_run"]


def test_plan_and_lr_curve_replay_the_trainer(tmp_path: Path):
    """What the dry run draws (tokens and LR per step through a batch ramp) is what training does."""
    vocab = 97
    cfg = load_config(None, [
        f"out_dir={tmp_path}", f"model.vocab_size={vocab}", "model.d_model=16", "model.n_layers=1",
        "model.n_heads=2", "model.max_seq_len=16", "train.seq_len=8", "train.batch_size=2", "train.batch_tokens=96",
        "train.batch_ramp.start_tokens=16", "train.batch_ramp.ramp_tokens=300", "train.max_steps=14",
        "train.schedule.warmup_steps=3", "train.checkpoint_every=100", "train.device=cpu",
    ])
    objective = build_objective(cfg.objective, ObjectiveContext(default_special_tokens(vocab), vocab, 0))
    trainer = Trainer(cfg, build_model(cfg.model), RandomTokens(9, 2, vocab, 0), objective, tmp_path / "ckpt",
                      tmp_path / "m.jsonl", progress=False)
    records = [trainer.train_step() for _ in range(cfg.train.max_steps)]
    plan = plan_batches(cfg)
    steps = np.arange(cfg.train.max_steps)
    tokens = np.diff([0] + [r["tokens"] for r in records])
    assert len(plan.ramp) > 2 and tokens.tolist() == (plan.micro_at(steps) * 16).tolist()
    assert plan.total_tokens == records[-1]["tokens"]
    assert np.allclose(lr_curve(cfg, plan, steps), [r["lr"] for r in records])


def saved_activation_bytes(model: torch.nn.Module, precision: str, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, parameters left out, each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x[:, :-1])
        masked_nll(logits, x[:, 1:], torch.ones(x.shape[0], x.shape[1] - 1))
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_formula_matches_what_autograd_saves(tmp_path: Path, precision: str):
    """One more layer adds what the per-layer formula says (within 10%), at both precisions."""
    def cfg(layers: int):
        return load_config(None, [f"out_dir={tmp_path}", "model.vocab_size=512", "model.d_model=64",
                                  f"model.n_layers={layers}", "model.n_heads=4", "model.n_kv_heads=2",
                                  "train.seq_len=64", "train.batch_size=2", f"train.precision={precision}"])

    x = torch.randint(0, 512, (2, 65))
    saved = [saved_activation_bytes(build_model(cfg(n).model), precision, x) for n in (1, 2)]
    one_layer = build_model(cfg(2).model).layers[0]
    weight_copies = 2 * sum(p.numel() for p in one_layer.parameters() if p.dim() == 2) if precision == "bf16" else 0
    measured = saved[1] - saved[0] - weight_copies  # autocast's bf16 weight copies are counted apart
    estimate = memory_estimate(cfg(2), build_model(cfg(2).model, init=False), 512)["per_layer"]
    assert abs(measured / estimate - 1) < 0.10, (measured, estimate)


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "muon"])
def test_optimizer_state_estimate_matches_torch(tmp_path: Path, name: str):
    from lmforge.train.memory_estimate import optimizer_state_bytes

    cfg = load_config(None, [f"out_dir={tmp_path}", "model.vocab_size=97", "model.d_model=32", "model.n_layers=2",
                             "model.n_heads=2", f"train.optimizer.name={name}"])
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.train.optimizer)
    model(torch.randint(0, 97, (2, 8))).float().mean().backward()
    opt.step()
    parts = getattr(opt, "parts", [opt])
    real = sum(v.numel() * v.element_size() for part in parts for state in part.state.values()
               for key, v in state.items() if torch.is_tensor(v) and key != "step")
    assert optimizer_state_bytes(model, cfg.train.optimizer)[0] == real


def test_dry_run_follows_activation_checkpointing(capsys, tmp_path: Path):
    """The configured mode picks the total, and the probe trains the model wrapped as training wraps it."""
    import json

    text = dry_run_cli(capsys, "train", f"out_dir={tmp_path}", "--probe-steps", "1", "train.device=cpu",
                       "train.activation_checkpointing=selective", "model.d_model=64", "model.n_layers=6")
    assert "with train.activation_checkpointing=selective" in text and "per full step" in text
    memory = json.loads((tmp_path / "dry_run" / "report.json").read_text())["memory"]
    assert memory["total"] == memory["totals"]["selective"]
    assert memory["activations"]["full"] < memory["activations"]["selective"] < memory["activations"]["none"]
