"""The fault suite's seeds: a few in ``make test``, as many as asked under ``make soak``.

A test that takes a ``seed`` argument runs once per seed: ``CI_SEEDS`` of them by
default (bounded so the suite adds about two minutes to ``make test``; a slow scenario
asks for fewer with ``@pytest.mark.ci_seeds(1)``), or ``SYNCD_SOAK_SEEDS`` of them for
every seeded scenario (``make soak SYNCD_SOAK_SEEDS=200``). Seeds are 1, 2, 3 ...
so a failure names the seed that reproduces it: ``pytest tests/faults -k "seed3"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import pytest
import structlog

from syncd.plumbing import logging as syncd_logging
from syncd.plumbing.settings import Config

CI_SEEDS = 2
SOAK_ENV = "SYNCD_SOAK_SEEDS"
LIBRARY_LOGGERS = ("httpx", "httpcore", "apscheduler", "alembic", "sqlalchemy.engine", "uvicorn.error")


def seed_count() -> int:
    """How many seeds each seeded scenario runs."""
    value = os.environ.get(SOAK_ENV, "")
    if not value:
        return CI_SEEDS
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{SOAK_ENV} must be a whole number of seeds, 1 or more, not {value!r}")
    return int(value)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        count = seed_count()
        marker = metafunc.definition.get_closest_marker("ci_seeds")
        if marker is not None and not os.environ.get(SOAK_ENV):
            count = min(count, int(marker.args[0]))
        seeds = range(1, count + 1)
        metafunc.parametrize("seed", seeds, ids=[f"seed{seed}" for seed in seeds])


@pytest.fixture
def run_logging() -> Iterator[Callable[[Config], None]]:
    """Log as ``syncd run`` would, at DEBUG in JSON (to the captured stderr); restored afterwards.

    Call it with the scenario's config once the stack is up: the config's secrets are
    registered for redaction as ``syncd run`` registers them (``syncd/cli/main.py``).
    """
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    secrets = (set(syncd_logging._configured), dict(syncd_logging._fetched))

    def start(config: Config) -> None:
        syncd_logging.register_secrets(config.secrets())
        syncd_logging.configure("debug", json=True)
        # Only syncd's handler: pytest's own capture would format every DEBUG record again
        # (twice the time for nothing; the scenario reads syncd's output through capsys).
        root.handlers[:] = [h for h in root.handlers if h.get_name() == syncd_logging.HANDLER_NAME]

    try:
        yield start
    finally:
        syncd_logging._configured.clear()
        syncd_logging._configured.update(secrets[0])
        syncd_logging._fetched.clear()
        syncd_logging._fetched.update(secrets[1])
        syncd_logging._compile()
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)
