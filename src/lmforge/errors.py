"""Errors every layer raises; here so the config layer and the registries import nothing of each other."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the dotted key."""
