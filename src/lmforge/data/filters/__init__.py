"""Document filters: rules registered by name and built from recipe entries.

A recipe entry is `{name: <rule>, sources: [..] or skip_sources: [..] (optional), <rule options>}`; `build_filter` turns
it into a pipeline step and names the exact recipe key (`data.filters[i].<key>`) on any error.
"""

from __future__ import annotations

from typing import Any

# Imported to register their rules.
from lmforge.data.filters import c4, fineweb, gopher, langid, learned, pii, seeds_rules  # noqa: F401
from lmforge.data.filters.base import FILTERS, Filter, FilterStep, OptionError, Rewriter, Transform
from lmforge.errors import ConfigError

__all__ = ["FILTERS", "Filter", "FilterStep", "Rewriter", "Transform", "build_filter"]


def build_filter(spec: dict[str, Any] | str, index: int) -> FilterStep:
    where = f"data.filters[{index}]"
    if isinstance(spec, str):  # a bare name takes the rule's defaults
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping like {{name: min_words}}, got {spec!r}")
    options = dict(spec)
    name = options.pop("name", None)
    if not isinstance(name, str) or name not in FILTERS:
        raise ConfigError(f"{where}.name: unknown filter {name!r}; known: {', '.join(FILTERS.names())}")
    sources = _labels(options.pop("sources", None), f"{where}.sources")
    skip_sources = _labels(options.pop("skip_sources", None), f"{where}.skip_sources") or []
    try:
        rule = FILTERS.build(name, where=where, **options)
    except OptionError as e:
        raise ConfigError(f"{where}.{e}") from e
    except ValueError as e:  # unknown option: Registry.build already names where and key
        raise ConfigError(str(e)) from e
    return FilterStep(rule, sources, skip_sources=skip_sources)


def _labels(value: Any, key: str) -> list[str] | None:
    if isinstance(value, str):
        value = [value]
    if value is not None and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        raise ConfigError(f"{key}: expected a list of source labels, got {value!r}")
    return value
