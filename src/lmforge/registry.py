"""Name -> factory registries, one per family (filters, architectures, objectives, ...).

A family whose members have their own config dataclass (architectures, objectives) pairs each
factory with that class: registering it also registers the class as a config variant, so the
recipe's `arch:` / `name:` picks the dataclass and each member validates its own options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from lmforge.config import register_variant
from lmforge.errors import ConfigError


class Registry:
    def __init__(self, family: str, config_base: type | None = None):
        self.family = family
        self.config_base = config_base
        self._items: dict[str, Callable[..., Any]] = {}
        self._configs: dict[str, type] = {}

    def register(self, name: str, config: type | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        if (config is None) != (self.config_base is None):
            raise TypeError(f"{self.family} {name!r}: a config class is required exactly when the family has one")

        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._items[name] = obj
            if config is not None:
                assert self.config_base is not None
                register_variant(self.config_base, name, config)
                self._configs[name] = config
            return obj

        return deco

    def get(self, name: str, key: str = "") -> Callable[..., Any]:
        """The entry called `name`; `key` is the config key that chose it, named in the error."""
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            loc = f"{key}: " if key else ""
            raise ConfigError(f"{loc}unknown {self.family} {name!r}; known: {known}")
        return self._items[name]

    def config_class(self, name: str) -> type:
        return self._configs[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def build(self, name: str, where: str = "", name_key: str = "", **kwargs: Any) -> Any:
        """Instantiate `name` with kwargs, naming the bad key (and `where` it came from) on error."""
        obj = self.get(name, name_key)
        params = inspect.signature(obj).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            accepted = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            for key in kwargs:
                if key not in accepted:
                    loc = f"{where}." if where else ""
                    raise ConfigError(
                        f"{loc}{key}: unknown option for {self.family} {name!r}; accepted: {', '.join(accepted)}"
                    )
        return obj(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._items
