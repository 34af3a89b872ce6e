"""Shared fixtures: a database URL per backend (SQLite file, fresh PostgreSQL database)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings

PG_ADMIN = os.environ.get("SYNCD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # readline, loaded in the pytest process, exports COLUMNS=80 and LINES=24 to its
    # children, so an xdist worker starts with them set. rich reads them once, when
    # syncd.cli.main creates its consoles at import, and a CLI test's own COLUMNS would be ignored.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

# Property tests share two cores with another worker and other processes: an example
# slowed by the scheduler is not a failure (Hypothesis's default deadline is 200 ms).
settings.register_profile("syncd", deadline=None)
settings.load_profile("syncd")


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file."""
    return f"sqlite:///{tmp_path / 'syncd.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards.

    CI starts PostgreSQL (``.ci/run``), so an unreachable server is a failure there;
    on a laptop without one the test is skipped with the reason.
    """
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN}")
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN}")
    name = f"syncd_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each store test runs on SQLite and on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))
