"""Mixture search: candidate generation, scoring, and one tiny search end to end through the CLI."""

import json
import random
from pathlib import Path

import pytest
import yaml

from lmforge.cli import fragment_overrides, main
from lmforge.config import ConfigError
from lmforge.mixture_search import (
    candidate_name,
    grid_candidates,
    make_candidates,
    parse_mixtures,
    random_candidates,
    score,
)
from lmforge.recipe import load_config

SOURCES = ["code", "prose"]


# ---------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("sources,step,count", [(SOURCES, 0.25, 5), (["a", "b", "c"], 0.5, 6),
                                                (["a", "b", "c"], 0.1, 66)])
def test_grid_sums_to_one_and_covers_every_corner(sources: list[str], step: float, count: int) -> None:
    grid = grid_candidates(sources, step)
    assert len(grid) == count and len({candidate_name(w) for w in grid}) == count
    for w in grid:
        assert sorted(w) == sorted(sources) and sum(w.values()) == pytest.approx(1)
        assert all(round(v / step, 6).is_integer() for v in w.values())
    for s in sources:  # each source alone
        assert {t: float(t == s) for t in sources} in grid
    assert {"code": 0.5, "prose": 0.5} in grid_candidates(SOURCES, 0.5)


@pytest.mark.parametrize("step", [0.3, 0, -0.5, 1.5])
def test_a_grid_step_that_does_not_divide_one_is_refused(step: float) -> None:
    with pytest.raises(ConfigError, match="--grid-step: must divide 1"):
        grid_candidates(SOURCES, step)


def test_random_candidates_are_reproducible_by_seed_and_on_the_simplex() -> None:
    a, b = random_candidates(["a", "b", "c"], 8, seed=3), random_candidates(["a", "b", "c"], 8, seed=3)
    assert a == b and a != random_candidates(["a", "b", "c"], 8, seed=4)
    assert all(sum(w.values()) == pytest.approx(1, abs=1e-9) and min(w.values()) >= 0 for w in a)
    assert len({candidate_name(w) for w in a}) == 8


def test_explicit_mixtures_are_checked_normalised_and_deduplicated(tmp_path: Path) -> None:
    got = make_candidates(SOURCES, mixtures='[{"prose": 0.7, "code": 0.3}, {"prose": 7, "code": 3}, {"prose": 1}]')
    assert got == [{"code": 0.3, "prose": 0.7}, {"code": 0.0, "prose": 1.0}]
    path = tmp_path / "m.yaml"
    path.write_text("mixtures:\n  - {code: 1}\n  - {code: 1, prose: 1}\n")
    assert parse_mixtures(str(path), SOURCES) == [{"code": 1.0, "prose": 0.0}, {"code": 0.5, "prose": 0.5}]


@pytest.mark.parametrize("spec,message", [
    ('[{"prose": 0.5, "web": 0.5}]', r"--mixtures\[0\]: unknown source 'web'; the train token sets have: code, prose"),
    ('[{"prose": 1}, {"code": -1}]', r"--mixtures\[1\].code: must be a number >= 0"),
    ('[{"prose": 0}]', r"--mixtures\[0\]: every weight is 0"),
    ('{"prose": 1}', "expected a non-empty list"),
    ("[", "neither a file nor valid JSON/YAML"),
])
def test_bad_explicit_mixtures_name_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_mixtures(spec, SOURCES)


def test_only_one_candidate_mode_at_a_time() -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        make_candidates(SOURCES, grid_step=0.5, n=3)
    assert len(make_candidates(SOURCES)) == 3  # default: the grid on step 0.5


def test_score_is_the_unweighted_mean_of_source_losses_or_the_target() -> None:
    ev = {"loss": 3.9, "sources": {"code": {"loss": 3.0}, "prose": {"loss": 5.0}}}
    assert score(ev, None) == 4.0 and score(ev, "prose") == 5.0


def test_a_fragment_merges_over_the_recipe(tmp_path: Path) -> None:
    recipe, fragment = tmp_path / "r.yaml", tmp_path / "best_mixture.yaml"
    recipe.write_text("train: {max_steps: 70}\ntokens: {mixture: {weights: {prose: 1.0}, max_epochs: 2}}\n")
    fragment.write_text("tokens:\n  mixture:\n    weights: {code: 0.25, prose: 0.75}\n")
    cfg = load_config(recipe, [*fragment_overrides([str(fragment)]), "train.grad_clip=0.5"])
    assert cfg.tokens.mixture.weights == {"code": 0.25, "prose": 0.75}
    assert cfg.tokens.mixture.max_epochs == 2 and cfg.train.max_steps == 70 and cfg.train.grad_clip == 0.5
    with pytest.raises(ConfigError, match="not a readable YAML file"):
        fragment_overrides([str(tmp_path / "missing.yaml")])


def test_the_python_api_calls_the_search_and_refuses_a_curriculum() -> None:
    import lmforge

    assert lmforge.mixture_search.grid_candidates is grid_candidates  # the module, callable as the function
    cfg = load_config(None, ["tokens.curriculum=[{tokens: 0, mixture: {weights: {prose: 1}}}]"])
    with pytest.raises(ConfigError, match="tokens.curriculum: mixture-search sets tokens.mixture"):
        lmforge.mixture_search(cfg, grid_step=0.5)


# ---------------------------------------------------------------------------- end to end

WORDS = ["the", "be", "to", "of", "and", "that", "have", "with", "a", "river", "stone", "light", "house", "water",
         "garden", "morning", "evening", "letter", "window", "story", "city", "mountain", "forest", "quiet"]
NAMES = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "index", "items", "result"]


def write_corpus(root: Path, n_docs: int = 60) -> Path:
    """Two small JSONL sources, labelled by file stem: English-like prose and Python-like code."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    with (root / "prose.jsonl").open("w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60)) + "."}) + "\n")
    with (root / "code.jsonl").open("w") as f:
        for _ in range(n_docs):
            lines = [f"def {rng.choice(NAMES)}_{i}({rng.choice(NAMES)}):\n    return {rng.choice(NAMES)} + {i}\n"
                     for i in range(rng.randint(4, 8))]
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    return root


TINY = ["tokenizer.vocab_size=400", "data.val_fraction=0.2", "model.d_model=32", "model.n_layers=1",
        "model.n_heads=2", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.max_steps=20",
        "train.checkpoint_every=20", "eval.max_tokens=512", "eval.generate.max_new_tokens=4"]
MIXTURES = '[{"prose": 0.8, "code": 0.2}, {"prose": 0.5, "code": 0.5}, {"prose": 0.2, "code": 0.8}]'


def test_a_tiny_search_writes_results_plot_and_the_argmin_as_a_fragment(tmp_path: Path, capsys) -> None:
    corpus, out = write_corpus(tmp_path / "corpus"), tmp_path / "run"
    args = ["mixture-search", "--quiet", "--mixtures", MIXTURES, f"data.inputs={corpus}", f"out_dir={out}", *TINY]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    res = json.loads((out / "mixture_search" / "results.json").read_text())
    rows = res["candidates"]
    assert res["sources"] == res["val_sources"] == SOURCES and len(rows) == 3
    assert all(r["status"] == "done" and set(r["source_losses"]) == set(SOURCES) for r in rows)
    for r in rows:  # the default score: the unweighted mean of the per-source losses
        assert r["score"] == pytest.approx(sum(r["source_losses"].values()) / 2)
    best = min(rows, key=lambda r: r["score"])
    assert res["best"]["name"] == best["name"] and f"{best['name']} *" in printed
    assert "model.d_model" not in res["proxy"]  # keys given on the command line win over the proxy defaults
    assert (out / "mixture_search" / "loss_per_source.png").read_bytes()[:4] == b"\x89PNG"
    fragment = yaml.safe_load((out / "mixture_search" / "best_mixture.yaml").read_text())
    assert fragment == {"tokens": {"mixture": {"weights": best["weights"]}}}
    proxy = load_config(out / "sweep" / best["name"] / "recipe.yaml")
    assert proxy.tokens.mixture.weights == best["weights"] and proxy.train.max_steps == 20 and proxy.model.d_model == 32

    # Again with another score: the shared stages and every proxy are reused, not retrained.
    assert main([*args[:4], "--target", "code", *args[4:]]) == 0
    again = json.loads((out / "mixture_search" / "results.json").read_text())
    assert [r["status"] for r in again["candidates"]] == ["cached"] * 3
    assert again["best"]["name"] == min(rows, key=lambda r: r["source_losses"]["code"])["name"]
    assert again["score"] == "validation loss of code"
    assert main([*args, "--target", "web"]) == 2
    assert "--target: no validation source 'web'; there are: code, prose" in capsys.readouterr().err
