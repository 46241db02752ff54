"""Name -> class registries, one per family (filters, architectures, objectives, ...)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from lmforge.config import ConfigError


class Registry:
    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, key: str = "") -> Callable[..., Any]:
        """The entry called `name`; `key` is the config key that chose it, named in the error."""
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            loc = f"{key}: " if key else ""
            raise ConfigError(f"{loc}unknown {self.family} {name!r}; known: {known}")
        return self._items[name]

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
