"""A fastText-style linear text classifier: hashed word and character n-grams, logistic regression.

Quality and toxicity filters need a cheap scorer that runs on every document, and training one
should take seconds on a CPU from a few JSONL files of examples. Features are word unigrams and
bigrams (CJK characters count as words, via `textstats.words`) plus character n-grams of each word,
hashed into a fixed number of buckets (the hashing trick: no vocabulary to build or store). The
model is one weight per bucket and a bias, trained with Adagrad on the logistic loss; given the
same files and seed, training is bit-for-bit repeatable.

A trained model is a directory: `classifier.safetensors` (weights, no pickle) and `classifier.json`
(feature settings, labels, training metrics, and the weights file's sha256 so a mismatched pair is
refused). `score(text)` is the probability that `text` is like the positive examples.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from lmforge.data import textstats
from lmforge.data.files import open_binary
from lmforge.io_utils import atomic_write_bytes, atomic_write_json

FORMAT = "lmforge-linear-classifier"
VERSION = 1
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"

Features = tuple[np.ndarray, np.ndarray]  # (bucket ids int64, values float32), ids unique


@dataclass(frozen=True)
class FeatureConfig:
    buckets: int = 1 << 20
    word_ngrams: int = 2  # 1: unigrams only; 2: unigrams and bigrams
    char_min: int = 3  # character n-grams of "<word>", lengths char_min..char_max; char_max 0: none
    char_max: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.buckets <= 1 << 26:
            raise ValueError(f"buckets must be in 1..2^26, got {self.buckets}")
        if self.word_ngrams not in (1, 2):
            raise ValueError(f"word_ngrams must be 1 or 2, got {self.word_ngrams}")
        if self.char_max and not 1 <= self.char_min <= self.char_max:
            raise ValueError(f"need 1 <= char_min <= char_max (or char_max 0), got {self.char_min}..{self.char_max}")


def _bucket(key: str, buckets: int) -> int:
    # crc32, not hash(): Python salts str hashes per process, and a saved model must score the same
    # text the same way in every process.
    return zlib.crc32(key.encode("utf-8")) % buckets


@lru_cache(maxsize=1 << 16)
def _word_buckets(word: str, cfg: FeatureConfig) -> tuple[int, ...]:
    """The word's own bucket and its character n-gram buckets; cached, since words repeat (Zipf)."""
    out = [_bucket("w" + word, cfg.buckets)]
    if cfg.char_max and len(word) > 1:  # a single character (every CJK word) has no inner n-grams
        padded = f"<{word}>"
        for n in range(cfg.char_min, min(cfg.char_max, len(padded)) + 1):
            out.extend(_bucket("c" + padded[i : i + n], cfg.buckets) for i in range(len(padded) - n + 1))
    return tuple(out)


def featurize(text: str, cfg: FeatureConfig) -> Features:
    """Sparse features of `text`: log(1 + count) per bucket, scaled to unit L2 norm so long and short
    documents take steps of the same size in training and give logits on the same scale."""
    words = textstats.words(text.lower())
    ids: list[int] = []
    for w in words:
        ids.extend(_word_buckets(w, cfg))
    if cfg.word_ngrams == 2:
        ids.extend(_bucket(f"b{a} {b}", cfg.buckets) for a, b in zip(words, words[1:], strict=False))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    buckets, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    values = np.log1p(counts.astype(np.float32))
    return buckets, values / np.float32(np.linalg.norm(values))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass
class LinearClassifier:
    weights: np.ndarray  # float32 [buckets]
    bias: float
    features: FeatureConfig
    labels: tuple[str, str] = ("negative", "positive")
    info: dict[str, Any] | None = None  # training settings and metrics, kept in classifier.json

    def logit(self, feats: Features) -> float:
        ids, values = feats
        return float(self.weights[ids] @ values) + self.bias

    def score(self, text: str) -> float:
        """Probability that `text` belongs to the positive class."""
        return _sigmoid(self.logit(featurize(text, self.features)))

    def save(self, out_dir: Path) -> None:
        """Weights first, then the JSON that names their hash: a reader never pairs a new JSON with
        old weights, and an interrupted save leaves files that `load_classifier` refuses."""
        out_dir = Path(out_dir)
        blob = save_tensors({"weights": self.weights, "bias": np.array([self.bias], np.float64)})
        atomic_write_bytes(out_dir / WEIGHTS_FILE, blob)
        meta = {"format": FORMAT, "version": VERSION, "labels": list(self.labels),
                "features": asdict(self.features), "weights_sha256": hashlib.sha256(blob).hexdigest(),
                **(self.info or {})}
        atomic_write_json(out_dir / CONFIG_FILE, meta)


def load_classifier(model_dir: Path) -> LinearClassifier:
    """Load a directory written by `train_classifier` / `LinearClassifier.save`."""
    model_dir = Path(model_dir)
    cfg_path, w_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: train one with `lmforge train-classifier`")
    meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{cfg_path}: not a {FORMAT} v{VERSION} model (format={meta.get('format')!r}, "
                         f"version={meta.get('version')!r})")
    blob = w_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise ValueError(f"{w_path} does not match {cfg_path} (sha256 differs): a partial or mixed save")
    tensors = load_tensors(blob)
    features = FeatureConfig(**meta["features"])
    if tensors["weights"].shape != (features.buckets,):
        raise ValueError(f"{w_path}: weights shape {tensors['weights'].shape} != ({features.buckets},)")
    info = {k: v for k, v in meta.items() if k not in ("format", "version", "labels", "features", "weights_sha256")}
    return LinearClassifier(tensors["weights"], float(tensors["bias"][0]), features, tuple(meta["labels"]), info)


# ---------------------------------------------------------------------------- training


def read_examples(path: Path, text_key: str = "text") -> Iterator[str]:
    """The `text_key` strings of a JSONL file (.gz/.zst too); bad lines raise naming file and line."""
    with open_binary(Path(path)) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            text = rec.get(text_key) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string {text_key!r} field")
            yield text


def _load_set(paths: Sequence[Path], text_key: str, cfg: FeatureConfig) -> list[Features]:
    return [featurize(t, cfg) for p in paths for t in read_examples(p, text_key)]


def _fit(data: list[Features], y: np.ndarray, weight: np.ndarray, buckets: int, *, epochs: int, lr: float,
         seed: int) -> tuple[np.ndarray, float]:
    """Adagrad on the weighted logistic loss, one example at a time in a seeded order. Adagrad's
    per-bucket step sizes let rare n-grams (most of them) learn fast while frequent ones settle."""
    w = np.zeros(buckets, np.float64)
    g2 = np.zeros(buckets, np.float64)
    b, b2 = 0.0, 0.0
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for i in rng.permutation(len(data)):
            ids, values = data[i]
            g = (_sigmoid(float(w[ids] @ values) + b) - y[i]) * weight[i]
            grad = g * values
            g2[ids] += grad * grad
            w[ids] -= lr * grad / (np.sqrt(g2[ids]) + 1e-12)
            b2 += g * g
            b -= lr * g / (math.sqrt(b2) + 1e-12)
    return w.astype(np.float32), b


def _metrics(model: LinearClassifier, data: list[Features], y: np.ndarray) -> dict[str, float]:
    if not data:
        return {"n": 0}
    p = np.array([_sigmoid(model.logit(f)) for f in data])
    eps = 1e-7
    loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
    return {"n": len(data), "accuracy": float(np.mean((p >= 0.5) == (y == 1))), "log_loss": float(loss)}


def train_classifier(
    positive: Sequence[Path],
    negative: Sequence[Path],
    out_dir: Path,
    *,
    text_key: str = "text",
    epochs: int = 5,
    lr: float = 0.5,
    buckets: int = 1 << 20,
    word_ngrams: int = 2,
    char_ngrams: tuple[int, int] = (3, 5),
    holdout: float = 0.1,
    balance: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Train on JSONL examples (`text_key` per line), hold out `holdout` of them (seeded) for the
    reported accuracy, save to `out_dir`, and return the metrics. `balance` weights each class by
    its inverse frequency, so a classifier trained on 1 positive per 10 negatives still centres
    its 0.5 threshold between the classes. `char_ngrams` (0, 0) turns character n-grams off."""
    if epochs < 1 or lr <= 0 or not 0 <= holdout < 1:
        raise ValueError(f"need epochs >= 1, lr > 0, 0 <= holdout < 1; got {epochs}, {lr}, {holdout}")
    start = time.perf_counter()
    cfg = FeatureConfig(buckets, word_ngrams, char_ngrams[0], char_ngrams[1])
    pos, neg = _load_set(positive, text_key, cfg), _load_set(negative, text_key, cfg)
    if not pos or not neg:
        raise ValueError(f"need examples of both classes; got {len(pos)} positive, {len(neg)} negative")
    data = pos + neg
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.random.default_rng(seed).permutation(len(data))
    val_idx, train_idx = np.split(order, [int(round(holdout * len(data)))])
    train, val = [data[i] for i in train_idx], [data[i] for i in val_idx]
    class_weight = np.array([len(data) / (2 * len(neg)), len(data) / (2 * len(pos))]) if balance else np.ones(2)
    weights, bias = _fit(train, y[train_idx], class_weight[y[train_idx].astype(int)], buckets,
                         epochs=epochs, lr=lr, seed=seed)
    model = LinearClassifier(weights, bias, cfg)
    metrics = {"positive": len(pos), "negative": len(neg), "train": _metrics(model, train, y[train_idx]),
               "heldout": _metrics(model, val, y[val_idx]), "seconds": round(time.perf_counter() - start, 3)}
    settings = {"positive_files": [str(p) for p in positive], "negative_files": [str(p) for p in negative],
                "text_key": text_key, "epochs": epochs, "lr": lr, "holdout": holdout, "balance": balance, "seed": seed}
    model.info = {"training": settings, "metrics": metrics}
    model.save(out_dir)
    return metrics
