"""E6: fine-tuning a pretrained run with a classification head on labelled JSONL.

[CLS] pooling for encoders, last-token pooling for decoders, the mean of the encoder's states for
encoder-decoders; accuracy and a confusion matrix on a stratified held-out split.
"""

from __future__ import annotations

from lmforge.finetune.cli import add_cli_parser, cli_main, report
from lmforge.finetune.data import LabelledDataError, read_labelled
from lmforge.finetune.fit import finetune, load_classifier, predict
from lmforge.finetune.model import POOLING, Classifier, pool

__all__ = [
    "POOLING", "Classifier", "LabelledDataError", "add_cli_parser", "cli_main", "finetune", "load_classifier",
    "pool", "predict", "read_labelled", "report",
]
