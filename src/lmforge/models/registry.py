"""The architecture registry: each family registers its nn.Module together with its config class."""

from __future__ import annotations

from lmforge.config import ModelConfig
from lmforge.registry import Registry

ARCHITECTURES = Registry("architecture", config_base=ModelConfig)
