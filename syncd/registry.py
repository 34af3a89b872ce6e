"""Connector lookup through the entry-point group ``syncd.connectors``.

Built-in connectors register exactly like third-party ones (see ``pyproject.toml``).
Entry points are loaded lazily, one at a time, and checked to be a
:class:`~syncd.interfaces.ConnectorSpec`.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from syncd.errors import ConfigError
from syncd.interfaces import ConnectorSpec

GROUP = "syncd.connectors"


def available() -> list[str]:
    """Names of every installed connector."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


@cache
def load(name: str) -> ConnectorSpec:
    """The connector registered as ``name``.

    Raises:
        ConfigError: no such connector (the message lists those installed), or the
            entry point is not a ``ConnectorSpec``.
    """
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        raise ConfigError(f"unknown connector {name!r}; installed: {', '.join(available()) or 'none'}")
    try:
        spec = found[0].load()
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"connector {name!r} failed to load from {found[0].value!r}: {exc}") from exc
    if not isinstance(spec, ConnectorSpec):
        raise ConfigError(f"entry point {found[0].value!r} for connector {name!r} is not a ConnectorSpec")
    return spec
