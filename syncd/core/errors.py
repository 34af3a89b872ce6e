"""The syncd error tree, grouped by what the caller must do.

::

    SyncdError                      root; never raised itself
    ├── ConfigError                 fix the config file or environment, then restart
    ├── MappingError                fix the mapping file (or the record); the record is dead-lettered
    ├── RecordError                 this one record cannot be processed; dead-letter it, go on
    │   └── ValidationFailed        pre-flight check of a draft failed; nothing was created
    ├── AuthError                   credentials are wrong or expired; refresh or ask an admin
    ├── RetriableError              try the same call again later (429, 5xx, network)
    │   └── RateLimited             the vendor said 429; ``retry_after_s`` says when
    ├── NotFound                    the vendor has no such object (404)
    ├── FatalError                  stop this connection; a person must look (bad request, 4xx)
    ├── LeaseLost                   another worker took this record over; drop it, send nothing more
    └── Stopping                    the process is stopping: hand the record back, make no further call

Messages say what happened, where (file and key, record id, field) and what to do.
They never contain a secret: credentials are held as ``SecretStr`` and never formatted.
"""

from __future__ import annotations


class SyncdError(Exception):
    """Root of every error syncd raises on purpose.

    Args:
        message: what happened, where, and what to do.
        place: the file/key/field the problem is at (``mappings/x.toml:12 [client].name``).
    """

    def __init__(self, message: str, *, place: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.place = place

    def __str__(self) -> str:
        return f"{self.place}: {self.message}" if self.place else self.message


class ConfigError(SyncdError):
    """The configuration is invalid; fix the named file and key, then restart.

    Attributes:
        problems: every problem found, each already naming its file and key.
    """

    def __init__(self, message: str, *, place: str | None = None, problems: list[str] | None = None) -> None:
        super().__init__(message, place=place)
        self.problems = problems or [str(self)]


class MappingError(SyncdError):
    """A mapping file is invalid, or a record does not fit it.

    At load time ``problems`` lists every error at once; at run time the record is
    dead-lettered with this message and can be replayed once fixed.
    """

    def __init__(self, message: str, *, place: str | None = None, problems: list[str] | None = None) -> None:
        super().__init__(message, place=place)
        self.problems = problems or [str(self)]


class RecordError(SyncdError):
    """One record cannot be processed; it is dead-lettered and the rest keep flowing."""


class ValidationFailed(RecordError):
    """A draft failed its pre-flight checks; no effect of it was started."""


class AuthError(SyncdError):
    """Credentials were rejected (401/403) or cannot be refreshed."""


class RetriableError(SyncdError):
    """A transient failure (network, 5xx, 429): the same call may succeed later.

    Attributes:
        retry_after_s: seconds the vendor asked us to wait, when it said so.
    """

    def __init__(self, message: str, *, place: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message, place=place)
        self.retry_after_s = retry_after_s


class RateLimited(RetriableError):
    """The vendor answered 429 Too Many Requests."""


class NotFound(SyncdError):
    """The vendor has no object at that id (404)."""


class FatalError(SyncdError):
    """A request the vendor will never accept as sent (400, 405, 422 ...); a person must look."""


class LeaseLost(SyncdError):
    """This worker's claim on a record was taken over by another worker (syncd/plumbing/leases.py).

    The worker stops at once: it sends no further vendor call for the record, does not
    retry it and does not settle it; the worker that holds the claim now does.
    """


class Stopping(SyncdError):
    """The process is stopping: no vendor call is started after the one in flight (syncd/plumbing/leases.py).

    The worker hands the record back to the queue with its attempt counted (calls of it
    may have reached the vendor: the next attempt looks up before creating).
    """
