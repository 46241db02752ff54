"""lmforge: raw text to a pretrained, evaluated, exported language model."""

__version__ = "0.1.0"
