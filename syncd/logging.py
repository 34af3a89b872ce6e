"""structlog, configured once: console on a TTY, JSON otherwise, secrets redacted.

Event names are stable snake_case (``invoice_created``, ``webhook_rejected``); context
is bound with contextvars. Redaction works two ways: a value under a key that names a
credential (``token``, ``secret``, ``password``, ``authorization``, ``api_key`` ...) is
replaced, and every configured secret value is replaced wherever it appears in a
string (an exception message, a URL).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "***"
SENSITIVE_KEY = re.compile(r"(token|secret|password|passwd|authorization|api[_-]?key|cookie|signature)", re.I)

_secrets: set[str] = set()


def register_secrets(values: Iterable[str]) -> None:
    """Add values that must never appear in a log line (short values are ignored)."""
    _secrets.update(v for v in values if len(v) >= 6)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: REDACTED if SENSITIVE_KEY.search(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: blank credential-named keys and known secret values."""
    for key in list(event_dict):
        if SENSITIVE_KEY.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and the standard library's logging once for the process.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        json: force JSON (``True``) or console (``False``); default: JSON unless stderr is a TTY.
    """
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # Look stderr up per logger: a test runner may swap it between commands.
        logger_factory=lambda *_args: structlog.PrintLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    for noisy in ("httpx", "httpcore", "apscheduler", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
