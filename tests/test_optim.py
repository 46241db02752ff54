"""P1: optimizers chosen by name. Adafactor factors its second moments; Muon takes the hidden
matrices and leaves embeddings, head and norms to AdamW; the combined state checkpoints and resumes
exactly; on the built-in corpus Muon beats AdamW in the same steps (slow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lmforge.models import build_model
from lmforge.recipe import load_config
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint
from lmforge.train.optim import Combined, build_optimizer

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def tiny(*overrides: str):
    cfg = load_config(None, ["model.vocab_size=50", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                             "model.tie_embeddings=false", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


def loss_of(model, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def test_adafactor_keeps_factored_second_moments_for_matrices():
    model, cfg = tiny("train.optimizer=adafactor")
    opt = build_optimizer(model, cfg.train.optimizer)
    assert isinstance(opt, torch.optim.Adafactor) and opt.param_groups[0]["d"] == 1.0
    assert opt.param_groups[0]["beta2_decay"] == -0.8 and opt.param_groups[0]["lr"] == 1e-2
    loss_of(model, 0).backward()
    opt.step()
    w = model.layers[0].self_attn.q_proj.weight
    assert opt.state[w]["row_var"].shape == (32, 1) and opt.state[w]["col_var"].shape == (1, 32)
    norm = model.norm.weight
    assert "variance" in opt.state[norm] and "row_var" not in opt.state[norm]


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model, cfg = tiny("train.optimizer=muon")
    opt = build_optimizer(model, cfg.train.optimizer)
    assert isinstance(opt, Combined)
    muon, adamw = opt.parts
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not in_muon & in_adamw and len(in_muon) + len(in_adamw) == len(list(model.parameters()))
    assert id(model.layers[0].mlp.down_proj.weight) in in_muon
    for p in (model.embed_tokens.weight, model.lm_head.weight, model.norm.weight):
        assert id(p) in in_adamw
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert {g["lr"] for g in muon.param_groups} == {2e-2} and {g["lr"] for g in adamw.param_groups} == {3e-3}


@pytest.mark.parametrize("name", ["muon", "adafactor", "adamw"])
def test_optimizer_state_checkpoints_and_resumes_exactly(tmp_path: Path, name: str):
    def fresh():
        model, cfg = tiny(f"train.optimizer={name}")
        return model, build_optimizer(model, cfg.train.optimizer)

    model, opt = fresh()
    for step in range(3):
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(tmp_path, 3, model, opt, {"step": 3})
    reference = []
    for step in range(3, 6):
        loss = loss_of(model, step)
        reference.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()

    model2, opt2 = fresh()
    load_checkpoint(tmp_path / "step_00000003", model2, opt2)
    for step, want in zip(range(3, 6), reference, strict=True):
        loss = loss_of(model2, step)
        assert loss.item() == want
        loss.backward()
        opt2.step()
        opt2.zero_grad()


@pytest.mark.slow
def test_muon_reaches_a_lower_loss_than_adamw_in_the_same_steps(tmp_path: Path):
    from lmforge.stages import stage_data, stage_eval, stage_tokenize, stage_tokenizer, stage_train

    common = ["model.d_model=64", "model.n_layers=2", "train.max_steps=120", "train.seq_len=128",
              "train.batch_size=16", "train.checkpoint_every=1000", "train.schedule.warmup_steps=10",
              "eval.max_tokens=20000", "eval.generate.max_new_tokens=0", "export.format=none"]
    base = load_config(DEMO, [f"out_dir={tmp_path / 'base'}", *common])
    for stage in (stage_data, stage_tokenizer, stage_tokenize):
        stage(base, progress=False)
    losses = {}
    for name in ("adamw", "muon"):
        cfg = load_config(DEMO, [f"out_dir={tmp_path / name}", *common, f"train.optimizer={name}"])
        for part in ("data", "tokenizer", "tokens"):
            shutil.copytree(tmp_path / "base" / part, tmp_path / name / part)
        stage_train(cfg, progress=False)
        losses[name] = stage_eval(cfg, progress=False)["loss"]
    print("validation loss after 120 steps:", losses)
    assert losses["muon"] < losses["adamw"] - 0.05
