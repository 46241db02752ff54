"""Fine-tune a pretrained run with a classification head, score it on a held-out split, save it,
and predict with what was saved.

out_dir holds `model.safetensors` (body and head), the run's tokenizer with its special-token map,
and `finetune.json` (labels, metrics, the model's config), so `predict` needs nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from lmforge.config import ConfigError, RunConfig, to_dict
from lmforge.finetune.data import (
    Label,
    frame_rows,
    label_names,
    pad_rows,
    read_labelled,
    stratified_split,
)
from lmforge.finetune.model import Classifier
from lmforge.io_utils import atomic_path, atomic_write_json, atomic_write_text
from lmforge.tokenizer.special_tokens import SpecialTokens, load_special_tokens, save_special_tokens

META_FILE = "finetune.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def finetune(
    run: RunConfig | str | Path,
    train_jsonl: Path,
    out_dir: Path,
    *,
    label_key: str = "label",
    text_key: str = "text",
    epochs: int = 3,
    lr: float = 3e-4,
    batch_size: int = 16,
    max_len: int = 256,
    holdout: float = 0.2,
    seed: int = 0,
    device: str = "cpu",
    freeze_body: bool = False,
    dropout: float = 0.1,
    weight_decay: float = 0.01,
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune `run` (its config, or its out_dir) on `train_jsonl`, hold out `holdout` of each
    class, and save the result to `out_dir` (replaced whole, atomically). Returns the metrics:
    accuracy, confusion, labels, train_loss (mean per epoch), n_train, n_heldout, out_dir."""
    from lmforge.run_dir import RunPaths, load_trained

    cfg = _run_config(run)
    out_dir = _check_out_dir(Path(out_dir), cfg.out)
    _check_args(epochs, batch_size, max_len)
    texts, labels = read_labelled(Path(train_jsonl), text_key, label_key)
    names = label_names(labels, train_jsonl)
    targets = [names.index(label) for label in labels]
    train_idx, held_idx = stratified_split(targets, holdout, seed)
    body, trained, ckpt = load_trained(cfg)
    tok, special = _tokenizer(RunPaths(cfg.out).tokenizer)
    max_len = min(max_len, trained.model.max_seq_len)  # learned position tables end there
    rows, pad = frame_rows(tok, texts, body.cfg.family, special, max_len), _pad_id(special)
    torch.manual_seed(seed)  # the head's init and dropout
    clf = Classifier(body, len(names), dropout).to(device)
    clf.body.requires_grad_(not freeze_body)
    losses = _train(clf, [rows[i] for i in train_idx], [targets[i] for i in train_idx], pad, epochs=epochs, lr=lr,
                    weight_decay=weight_decay, batch_size=batch_size, seed=seed, progress=progress)
    predicted = predict_indices(clf, [rows[i] for i in held_idx], pad, batch_size)
    metrics = {**score([targets[i] for i in held_idx], predicted, names), "train_loss": losses,
               "n_train": len(train_idx)}
    settings = {"max_len": max_len, "dropout": dropout, "freeze_body": freeze_body, "lr": lr, "epochs": epochs,
                "batch_size": batch_size, "seed": seed}
    meta = {"labels": names, **settings, "source": {"run": str(cfg.out), "checkpoint": str(ckpt)},
            "metrics": metrics, "config": to_dict(trained)}
    _save(out_dir, clf, meta, tok, special)
    return {**metrics, "out_dir": str(out_dir)}


def predict(out_dir: Path, texts: list[str], *, batch_size: int = 32, device: str = "cpu") -> list[Label]:
    """The label of each text, by the classifier `finetune` saved in `out_dir`."""
    clf, meta, tok, special = load_classifier(Path(out_dir), device)
    rows = frame_rows(tok, texts, clf.body.cfg.family, special, meta["max_len"])
    return [meta["labels"][i] for i in predict_indices(clf, rows, _pad_id(special), batch_size)]


def load_classifier(out_dir: Path, device: str = "cpu") -> tuple[Classifier, dict[str, Any], Tokenizer, SpecialTokens]:
    """(classifier in eval mode, finetune.json, tokenizer, special tokens) of a finetune output."""
    from lmforge.models import build_model, materialize
    from lmforge.recipe import config_from_dict

    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: not a `lmforge finetune` output directory")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    body = build_model(config_from_dict(meta["config"]).model, init=False)
    materialize(body, "cpu")  # every value comes from the file: no init to waste
    clf = Classifier(body, len(meta["labels"]), meta["dropout"])
    load_model(clf, str(out_dir / WEIGHTS_FILE), strict=True)
    tok, special = _tokenizer(out_dir / TOKENIZER_FILE)
    return clf.to(device).eval(), meta, tok, special


@torch.no_grad()
def predict_indices(clf: Classifier, rows: list[list[int]], pad: int, batch_size: int) -> list[int]:
    """Argmax class index of each row, in eval mode (no dropout); the mode is restored after."""
    was_training = clf.training
    clf.eval()
    device = clf.head.weight.device
    out: list[int] = []
    for start in range(0, len(rows), batch_size):
        ids, real = pad_rows(rows[start : start + batch_size], pad)
        out += clf(ids.to(device), real.to(device)).argmax(-1).tolist()
    clf.train(was_training)
    return out


def score(targets: list[int], predicted: list[int], names: list[Label]) -> dict[str, Any]:
    """Accuracy and the confusion matrix (rows: true label, columns: predicted) over the held-out rows."""
    matrix = [[0] * len(names) for _ in names]
    for t, p in zip(targets, predicted, strict=True):
        matrix[t][p] += 1
    correct = sum(matrix[i][i] for i in range(len(names)))
    return {"accuracy": correct / max(len(targets), 1), "labels": names,
            "confusion": {"labels": names, "matrix": matrix}, "n_heldout": len(targets)}


def _train(clf: Classifier, rows: list[list[int]], targets: list[int], pad: int, *, epochs: int, lr: float,
           weight_decay: float, batch_size: int, seed: int, progress: bool) -> list[float]:
    """AdamW (the project's: no decay on norms and biases), shuffled batches; mean loss per epoch."""
    from lmforge.train.optim import AdamWConfig, build_optimizer

    optimizer = build_optimizer(clf, AdamWConfig(lr=lr, weight_decay=weight_decay))
    trainable = [p for p in clf.parameters() if p.requires_grad]
    device = clf.head.weight.device
    order_rng = torch.Generator().manual_seed(seed)
    labels = torch.tensor(targets, dtype=torch.long)
    clf.train()
    losses: list[float] = []
    for epoch in range(epochs):
        total = 0.0
        order = torch.randperm(len(rows), generator=order_rng).tolist()
        for start in range(0, len(rows), batch_size):
            batch = order[start : start + batch_size]
            ids, real = pad_rows([rows[i] for i in batch], pad)
            loss = F.cross_entropy(clf(ids.to(device), real.to(device)), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # a small labelled set makes spiky batches
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(rows))
        if progress:
            print(f"finetune: epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    return losses


def _save(out_dir: Path, clf: Classifier, meta: dict[str, Any], tok: Tokenizer, special: SpecialTokens) -> None:
    """Everything into a temporary sibling, renamed into place: no half-written output survives."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_model(clf, str(tmp / WEIGHTS_FILE))
        atomic_write_text(tmp / TOKENIZER_FILE, tok.to_str(pretty=True))
        save_special_tokens(special, tmp / TOKENIZER_FILE)
        atomic_write_json(tmp / META_FILE, meta)


def _run_config(run: RunConfig | str | Path) -> RunConfig:
    if isinstance(run, RunConfig):
        return run
    from lmforge.recipe import load_config

    return load_config(None, [f"out_dir={run}"])


def _check_out_dir(out_dir: Path, run_dir: Path) -> Path:
    """out_dir is replaced whole, so it must be new, empty, or an earlier finetune output."""
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out_dir}: that is the pretrained run itself; choose another directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file():
        raise ConfigError(f"--out {out_dir}: exists and is not a finetune output; it would be replaced")
    return out_dir


def _check_args(epochs: int, batch_size: int, max_len: int) -> None:
    for name, value, least in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("max_len", max_len, 3)):
        if value < least:
            raise ConfigError(f"{name}: must be >= {least} (got {value})")


def _tokenizer(path: Path) -> tuple[Tokenizer, SpecialTokens]:
    from lmforge.tokenizer.train import load_tokenizer

    tok = load_tokenizer(path)
    return tok, load_special_tokens(path, tok)


def _pad_id(special: SpecialTokens) -> int:
    """Padding is masked out of attention and pooling, so any id works; the pad role when it exists."""
    return special.pad if special.pad is not None else special.eos
