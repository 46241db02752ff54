"""E2: zero-shot multiple-choice and cloze tasks, scored by log-likelihood as lm-evaluation-harness does.

A task is a JSONL file, one item a line: `{"id", "context", "choices": [...], "gold": k}`. Each choice is
appended to the context as given (so choices usually start with a space) and scored by the
log-likelihood of its tokens given the context:

- `acc`: the item is right when the gold choice has the highest summed log-likelihood;
- `acc_norm`: the same after dividing each choice's log-likelihood by its length in characters;
- stderr: lm-eval's `mean_stderr`, the sample standard deviation (n-1) over sqrt(n), which for a 0/1
  score is sqrt(p(1-p)/(n-1)).

Tokenization follows lm-eval: the context's trailing whitespace moves to the front of the choice, then
`context` and `context + choice` are encoded and the choice's tokens are the tail of the second.
Every family scores the same (context, choice) pairs its own way: a decoder by next-token
log-likelihood after EOS + context; an encoder-decoder by the decoder's target log-likelihood with the
context (+ EOS) in the encoder; an MLM encoder by pseudo-log-likelihood (Salazar et al. 2020: each choice
token masked in turn, log-probabilities summed). Bad records are skipped and listed, never fatal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.objectives.base import AttentionLayout, model_logits
from lmforge.tokenizer.special_tokens import SpecialTokens

FAMILIES = ("decoder", "encoder", "encoder_decoder")


@dataclass(frozen=True)
class TaskItem:
    id: str
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class _Row:
    """One model input and the log-probabilities read from it: `targets[i]` at logit row `positions[i]`,
    added to request `request` (one (item, choice) pair; an MLM pair spreads over several rows)."""

    inputs: list[int]
    targets: list[int]
    positions: list[int]
    request: int
    decoder: list[int] | None = None  # encoder-decoder: the decoder's input ids


# ---------------------------------------------------------------------------- loading


def load_tasks(path: str | Path) -> tuple[list[TaskItem], list[str]]:
    """The valid items of a task file and one `file:line: reason` per skipped record."""
    path = Path(path)
    items: list[TaskItem] = []
    problems: list[str] = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            item = _parse(raw)
            if isinstance(item, str):
                problems.append(f"{path}:{line_no}: {item}")
            else:
                items.append(item)
    return items, problems


def _parse(raw: bytes) -> TaskItem | str:
    """The item on one line, or why it cannot be one."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not a JSON line ({e})"
    if not isinstance(rec, dict):
        return "not a JSON object"
    missing = [k for k in ("id", "context", "choices", "gold") if k not in rec]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    context, choices, gold = rec["context"], rec["choices"], rec["gold"]
    if not isinstance(context, str):
        return "context is not a string"
    if not isinstance(choices, list) or not choices:
        return "choices is not a non-empty list"
    if not all(isinstance(c, str) and c for c in choices):
        return "every choice must be a non-empty string"  # acc_norm divides by a choice's length
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        return f"gold {gold!r} is not an index into {len(choices)} choices"
    return TaskItem(str(rec["id"]), context, tuple(choices), gold)


# ---------------------------------------------------------------------------- scoring


def encode_pair(tokenizer: Tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids) as lm-eval splits them: trailing context whitespace joins the choice,
    and the choice's ids are what encoding `context + choice` adds after the context's ids."""
    stripped = context.rstrip()
    choice = context[len(stripped):] + choice
    ctx = tokenizer.encode(stripped, add_special_tokens=False).ids
    whole = tokenizer.encode(stripped + choice, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def choice_logliks(
    model: nn.Module,
    tokenizer: Tokenizer,
    special: SpecialTokens,
    items: Sequence[TaskItem],
    family: str,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> list[list[float]]:
    """Log-likelihood of every choice of every item, [item][choice]. `model` must be on `device`."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = [encode_pair(tokenizer, item.context, choice) for item in items for choice in item.choices]
    rows = _ROW_BUILDERS[family](pairs, special, model.cfg.max_seq_len)
    totals = _score_rows(model, rows, len(pairs), family, device, batch_size)
    out, start = [], 0
    for item in items:
        out.append(totals[start:start + len(item.choices)])
        start += len(item.choices)
    return out


def _decoder_rows(pairs: list[tuple[list[int], list[int]]], special: SpecialTokens, max_len: int) -> list[_Row]:
    """EOS + context + choice, cut from the left to max_len + 1 tokens (lm-eval's window): training put
    EOS before every document, so it marks the context as a document start."""
    rows = []
    for n, (ctx, cont) in enumerate(pairs):
        seq = ([special.eos] + ctx + cont)[-(max_len + 1):]
        k = min(len(cont), len(seq) - 1)
        rows.append(_Row(seq[:-1], seq[len(seq) - k:], list(range(len(seq) - 1 - k, len(seq) - 1)), n))
    return rows


def _seq2seq_rows(pairs: list[tuple[list[int], list[int]]], special: SpecialTokens, max_len: int) -> list[_Row]:
    """Context + EOS into the encoder (its left cut), the choice as the decoder's target after the start
    token (pad), as lmforge's encoder-decoder objectives and generation do."""
    start = special.require("pad", "zero-shot scoring of an encoder-decoder (the decoder start token)")
    rows = []
    for n, (ctx, cont) in enumerate(pairs):
        source = ctx[max(0, len(ctx) - (max_len - 1)):] + [special.eos]
        target = cont[:max_len]
        rows.append(_Row(source, target, list(range(len(target))), n, decoder=[start] + target[:-1]))
    return rows


def _mlm_rows(pairs: list[tuple[list[int], list[int]]], special: SpecialTokens, max_len: int) -> list[_Row]:
    """[CLS] context choice [SEP] (the MLM objective's layout) once per choice token, that token masked."""
    cls, sep = special.require("cls", "MLM zero-shot scoring"), special.require("sep", "MLM zero-shot scoring")
    mask = special.require("mask", "MLM zero-shot scoring")
    rows = []
    for n, (ctx, cont) in enumerate(pairs):
        cont = cont[max(0, len(cont) - (max_len - 2)):]
        ctx = ctx[max(0, len(ctx) - (max_len - 2 - len(cont))):]
        seq = [cls] + ctx + cont + [sep]
        for p in range(1 + len(ctx), 1 + len(ctx) + len(cont)):
            rows.append(_Row(seq[:p] + [mask] + seq[p + 1:], [seq[p]], [p], n))
    return rows


_ROW_BUILDERS: dict[str, Callable[..., list[_Row]]] = {
    "decoder": _decoder_rows,
    "encoder_decoder": _seq2seq_rows,
    "encoder": _mlm_rows,
}


def _score_rows(model: nn.Module, rows: list[_Row], n_requests: int, family: str, device: str | torch.device,
                batch_size: int) -> list[float]:
    """Summed target log-probabilities per request, one forward per batch. Rows are sorted longest first
    so a batch pads little; every row's sum is its own, so order and batching change nothing else."""
    totals = torch.zeros(n_requests, dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i].inputs) + len(rows[i].decoder or ())))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[start:start + batch_size]]
            logits = _forward(model, batch, family, device)
            _add_scores(totals, logits, batch)
    finally:
        model.train(was_training)
    return totals.tolist()


def _padded(seqs: list[list[int]], device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad value 0: never read) and the 1/0 segment ids marking real tokens."""
    width = max(1, *(len(s) for s in seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    real = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    return ids.to(device), real.to(device)


def _forward(model: nn.Module, batch: list[_Row], family: str, device: str | torch.device) -> torch.Tensor:
    """Logits [B, T, V] of a batch. A causal decoder needs no padding mask: right padding comes after
    every position read. Bidirectional stacks get segment ids so real tokens never attend to padding."""
    ids, real = _padded([r.inputs for r in batch], device)
    if family == "decoder":
        return model_logits(model(ids))
    layout = AttentionLayout(causal=False, segment_ids=real)
    if family == "encoder":
        return model_logits(model(ids, layout))
    decoder_ids, _ = _padded([r.decoder or [] for r in batch], device)
    return model_logits(model(ids, layout, decoder_input_ids=decoder_ids))


def _add_scores(totals: torch.Tensor, logits: torch.Tensor, batch: list[_Row]) -> None:
    """log_softmax only at the positions read: a [B, T, V] fp32 copy would dwarf the model's activations."""
    rows = [b for b, r in enumerate(batch) for _ in r.positions]
    if not rows:
        return
    positions = [p for r in batch for p in r.positions]
    targets = torch.tensor([t for r in batch for t in r.targets], device=logits.device)
    logp = logits[rows, positions].float().log_softmax(-1).gather(1, targets[:, None])[:, 0]
    requests = torch.tensor([r.request for r in batch for _ in r.positions])
    totals.index_add_(0, requests, logp.double().cpu())


# ---------------------------------------------------------------------------- metrics


def mean_stderr(p: float, n: int) -> float | None:
    """lm-eval's stderr of a mean of 0/1 scores: sqrt(p(1-p)/(n-1)); None below two items."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def _argmax(values: Sequence[float]) -> int:
    """First index of the largest value, as numpy's argmax breaks ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_choices(items: Sequence[TaskItem], logliks: Sequence[Sequence[float]]) -> dict[str, Any]:
    """acc, acc_norm and their stderrs over items, from each choice's log-likelihood."""
    n = len(items)
    hits = [_argmax(ll) == item.gold for item, ll in zip(items, logliks, strict=True)]
    norm_hits = [
        _argmax([v / len(c) for v, c in zip(ll, item.choices, strict=True)]) == item.gold
        for item, ll in zip(items, logliks, strict=True)
    ]
    acc = sum(hits) / n if n else None
    acc_norm = sum(norm_hits) / n if n else None
    return {
        "acc": acc,
        "acc_stderr": mean_stderr(acc, n) if acc is not None else None,
        "acc_norm": acc_norm,
        "acc_norm_stderr": mean_stderr(acc_norm, n) if acc_norm is not None else None,
        "n": n,
    }


def task_names(paths: Iterable[str | Path]) -> dict[str, Path]:
    """name -> path of each task: the file name without .jsonl, or the full path when two names clash."""
    out: dict[str, Path] = {}
    for path in map(Path, paths):
        name = path.name.removesuffix(".jsonl")
        out[str(path) if name in out else name] = path
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Tokenizer,
    special: SpecialTokens,
    paths: list[str],
    family: str,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Per task (keyed by file name; the full path when two names clash): acc, acc_stderr, acc_norm,
    acc_norm_stderr, n (items scored), skipped (bad records) and problems (`file:line: reason` each).
    `model` must be on `device`; `family` is its `cfg.family`."""
    results: dict[str, dict[str, Any]] = {}
    for name, path in task_names(paths).items():
        items, problems = load_tasks(path)
        logliks = choice_logliks(model, tokenizer, special, items, family, device, batch_size)
        results[name] = {**score_choices(items, logliks), "skipped": len(problems), "problems": problems}
    return results
