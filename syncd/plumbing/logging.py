"""structlog, configured once for every logger of the process, secrets redacted.

syncd's own lines (structlog) and every standard-library logger (uvicorn, SQLAlchemy,
APScheduler, httpx, httpcore, alembic ...) end in one root handler whose
``structlog.stdlib.ProcessorFormatter`` runs the same processors on both: level, logger
name, UTC timestamp, exception text, redaction, then one renderer — JSON lines by default
under ``syncd run`` and whenever stderr is not a TTY, the console renderer otherwise
(https://www.structlog.org/en/stable/standard-library.html, "Rendering using structlog-based
formatters within logging").

Event names are stable snake_case (``invoice_created``, ``webhook_rejected``); context
is bound with contextvars. Redaction works three ways:

* a value under a key that names a credential (``token``, ``secret``, ``password``,
  ``authorization``, ``api_key`` ...) is replaced;
* every configured secret (:func:`register_secrets`) and every token fetched at run time
  (:func:`redact_value`) is replaced wherever it appears in a string (an exception
  message, a URL, a library's debug line);
* credentials in well-known textual shapes are replaced even before anyone registered
  them: ``Bearer …`` / ``Basic …`` (RFC 6750 section 2.1, RFC 7617) and ``access_token=…``
  / ``"refresh_token": "…"`` (an OAuth 2.0 token response, RFC 6749 section 5.1).
"""

from __future__ import annotations

import enum
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "***"
SENSITIVE_KEY = re.compile(r"(token|secret|password|passwd|authorization|api[_-]?key|cookie|signature)", re.I)
# Values shorter than this are not registered: "abc" would blank every word containing it.
MIN_SECRET_CHARS = 6
# Tokens fetched at run time are kept for scrubbing; the oldest are forgotten past this
# many. A forgotten one is useless by then: a Xero access token lives 30 minutes and a
# refresh token is single-use, so 64 covers many hours of rotations per connection while
# keeping the pattern every log string is matched against small.
MAX_FETCHED = 64
# A credential after an auth scheme (RFC 6750 b64token / RFC 7617 token68 alphabet).
_SCHEME = re.compile(r"\b(Bearer|Basic)(\s+)[A-Za-z0-9._~+/\-]+=*", re.I)
# An OAuth token-response or form field: access_token=..., "refresh_token": "...".
_TOKEN_FIELD = re.compile(
    r"""(["']?\b(?:access_token|refresh_token|id_token|client_secret|password)\b["']?\s*[:=]\s*["']?)[^"'&\s,;}]+""",
    re.I,
)
HANDLER_NAME = "syncd"

_configured: set[str] = set()
_fetched: dict[str, None] = {}  # insertion-ordered: the oldest is forgotten first
_pattern: re.Pattern[str] | None = None


class LogFormat(enum.StrEnum):
    """How log lines are rendered (``syncd run --log-format``)."""

    json = "json"
    console = "console"


def register_secrets(values: Iterable[str]) -> None:
    """Add configured values that must never appear in a log line (short values are ignored)."""
    _configured.update(v for v in values if len(v) >= MIN_SECRET_CHARS)
    _compile()


def redact_value(*secrets: str) -> None:
    """Never log these values from now on: call it with every token obtained at run time.

    An OAuth access or refresh token is not in the config, so :func:`register_secrets`
    cannot know it; the code that fetches, refreshes or loads a token hands it here the
    moment it has it (``redact_value(tokens["access_token"], tokens.get("refresh_token", ""))``).
    Values under :data:`MIN_SECRET_CHARS` characters are ignored.
    """
    for secret in secrets:
        if len(secret) >= MIN_SECRET_CHARS and secret not in _configured:
            _fetched.pop(secret, None)  # re-registered: now the newest
            _fetched[secret] = None
    while len(_fetched) > MAX_FETCHED:
        del _fetched[next(iter(_fetched))]
    _compile()


def _compile() -> None:
    """One alternation of every known secret, longest first (a secret containing another wins)."""
    global _pattern
    values = sorted(_configured | _fetched.keys(), key=len, reverse=True)
    _pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None


def scrub(text: str) -> str:
    """``text`` with every known secret and every recognisable credential replaced."""
    if _pattern is not None:
        text = _pattern.sub(REDACTED, text)
    text = _SCHEME.sub(rf"\1\2{REDACTED}", text)
    return _TOKEN_FIELD.sub(rf"\1{REDACTED}", text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
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


def drop_color_message(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop uvicorn's ``color_message`` extra (the message again, with ANSI codes)."""
    event_dict.pop("color_message", None)
    return event_dict


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record arrives (a test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and the standard library's logging for the process (again replaces).

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``; at ``debug`` the chatty
            libraries (httpx, httpcore, APScheduler, alembic) log at debug too, else
            they log warnings only.
        json: force JSON (``True``) or console (``False``); default: JSON unless stderr is a TTY.
    """
    as_json = (not sys.stderr.isatty()) if json is None else json
    # Exceptions are rendered to text before redaction, so the console shows that text
    # as is (a rich traceback would print frame locals, secrets included, unredacted).
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    number = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # Records from other libraries: their `extra=` fields are kept (and redacted by key).
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), drop_color_message],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler = _StderrHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != HANDLER_NAME] + [handler]
    root.setLevel(number)
    for noisy in ("httpx", "httpcore", "apscheduler", "alembic"):
        logging.getLogger(noisy).setLevel(logging.NOTSET if number <= logging.DEBUG else logging.WARNING)
