"""Logs never carry a secret, and every library's lines come out in one format.

Credential-named keys, configured secrets, tokens fetched at run time and credentials in
well-known shapes (``Bearer …``, ``access_token=…``) are redacted, in syncd's own lines and
in those of uvicorn, SQLAlchemy, httpx and every other standard-library logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.daemon import Daemon
from syncd.plumbing import logging as syncd_logging
from syncd.plumbing.serving import free_port, serve
from syncd.plumbing.settings import load_config
from tests.harness import SYNCD_URL, seed_deal, write_config
from tests.servers import invoke

LOGGERS = ("httpx", "httpcore", "apscheduler", "alembic", "sqlalchemy.engine", "tests.wire", "uvicorn.error")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test configures logging its own way; the next one finds it as it was."""
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    secrets = (set(syncd_logging._configured), dict(syncd_logging._fetched))
    try:
        yield
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


def json_lines(err: str) -> list[dict[str, Any]]:
    """Every captured line, each of which must be one JSON object."""
    return [json.loads(line) for line in err.strip().splitlines()]


def test_secrets_are_redacted_from_json_logs(capsys: pytest.CaptureFixture[str]) -> None:
    """A token under a sensitive key, or inside a message, never reaches the log line."""
    syncd_logging.register_secrets(["pat-na1-0000-super-secret"])
    syncd_logging.configure("info", json=True)
    log = structlog.get_logger("test")
    log.info(
        "http_failed", token="abc", error="401 for Bearer pat-na1-0000-super-secret", headers={"Authorization": "x"}
    )
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "http_failed"
    assert line["token"] == "***"
    assert "super-secret" not in line["error"]
    assert line["headers"] == {"Authorization": "***"}


def test_a_fetched_token_is_redacted_from_every_logger(capsys: pytest.CaptureFixture[str]) -> None:
    """A token handed to redact_value disappears from syncd's lines, library lines and exception text."""
    token = "xero-access-4f1c9e0b7a2d"
    syncd_logging.configure("info", json=True)
    syncd_logging.redact_value(token)
    structlog.get_logger("syncd.test").info("token_used", detail=f"got {token} from the endpoint")
    logging.getLogger("httpx").warning("GET https://api.example/x?t=%s", token)
    try:
        raise ValueError(f"refused {token}")
    except ValueError:
        logging.getLogger("apscheduler").exception("job failed")
    err = capsys.readouterr().err
    assert token not in err
    lines = json_lines(err)
    assert [line["logger"] for line in lines] == ["syncd.test", "httpx", "apscheduler"]
    assert lines[0]["detail"] == "got *** from the endpoint"
    assert lines[1]["event"] == "GET https://api.example/x?t=***"
    assert "refused ***" in lines[2]["exception"]


async def test_every_token_through_the_token_store_is_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tokens saved to or loaded from the encrypted store are scrubbed from logs from then on (both connectors use it)."""
    from cryptography.fernet import Fernet

    from syncd.store.db import DbTokenStore, Store

    store = Store.open(f"sqlite:///{tmp_path / 'syncd.db'}")
    key = Fernet.generate_key().decode()
    try:
        await store.migrate()
        await DbTokenStore(store, "xero", key).save({"access_token": "acc-7d1f03b9e2c4", "refresh_token": "ref-55aa01"})
        syncd_logging._fetched.clear()
        syncd_logging._compile()
        assert await DbTokenStore(store, "xero", key).load()  # as a restarted replica reads them
    finally:
        await store.close()
    syncd_logging.configure("info", json=True)
    structlog.get_logger("syncd.test").info("oops", detail="acc-7d1f03b9e2c4 and ref-55aa01")
    (line,) = json_lines(capsys.readouterr().err)
    assert line["detail"] == "*** and ***"


def test_credentials_in_known_shapes_are_redacted_unregistered(capsys: pytest.CaptureFixture[str]) -> None:
    """Bearer/Basic credentials and OAuth token fields are blanked even if nobody registered them."""
    syncd_logging.configure("info", json=True)
    logging.getLogger("tests.wire").warning(
        "headers {'authorization': 'Bearer eyJhbGciOi.J9abc-_'} proxy Basic dXNlcjpwYXNz== "
        'body {"access_token": "at-123456789", "refresh_token":"rt-987654321"} form client_secret=cs-1234567&x=1'
    )
    (line,) = json_lines(capsys.readouterr().err)
    event = line["event"]
    for leaked in ("eyJhbGciOi", "dXNlcjpwYXNz", "at-123456789", "rt-987654321", "cs-1234567"):
        assert leaked not in event
    assert "'Bearer ***'" in event
    assert "Basic ***" in event
    assert '"access_token": "***"' in event
    assert "client_secret=***&x=1" in event


def test_short_values_are_not_registered() -> None:
    """A value under six characters would blank ordinary words, so it is ignored."""
    syncd_logging.redact_value("abc", "")
    assert syncd_logging.scrub("abcdef") == "abcdef"


def test_fetched_tokens_are_remembered_up_to_a_bound() -> None:
    """The newest MAX_FETCHED tokens are scrubbed; the oldest are forgotten, configured secrets never."""
    syncd_logging.register_secrets(["configured-secret-1"])
    first = "fetched-token-000000"
    syncd_logging.redact_value(first, "fetched-refresh-000000")
    syncd_logging.redact_value(*(f"fetched-token-{n:06d}-x" for n in range(syncd_logging.MAX_FETCHED)))
    latest = f"fetched-token-{syncd_logging.MAX_FETCHED - 1:06d}-x"
    assert syncd_logging.scrub(f"{latest} configured-secret-1") == "*** ***"
    assert syncd_logging.scrub(first) == first


def test_library_lines_share_the_json_format(capsys: pytest.CaptureFixture[str]) -> None:
    """uvicorn and SQLAlchemy lines are JSON with the same keys as syncd's own, their extras kept."""
    syncd_logging.configure("info", json=True)
    logging.getLogger("uvicorn.error").setLevel(logging.NOTSET)  # as under `syncd run` (another test's uvicorn set it)
    structlog.get_logger("syncd.daemon").info("syncd_started", workers=4)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("sqlalchemy.engine").warning("pool overflow", extra={"pool_size": 10, "api_key": "k-1234567"})
    lines = json_lines(capsys.readouterr().err)
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("syncd.daemon", "info"),
        ("uvicorn.error", "info"),
        ("sqlalchemy.engine", "warning"),
    ]
    assert all({"event", "level", "logger", "timestamp"} <= line.keys() for line in lines)
    assert lines[1]["event"] == "Started server process [42]"
    assert (lines[2]["pool_size"], lines[2]["api_key"]) == (10, "***")


def test_the_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    """--log-format console renders readable lines, library lines included, still redacted."""
    syncd_logging.register_secrets(["console-secret-42"])
    syncd_logging.configure("info", json=False)
    logging.getLogger("uvicorn.error").warning("bad request with console-secret-42")
    err = capsys.readouterr().err
    assert "bad request with ***" in err
    assert "uvicorn.error" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.strip().splitlines()[-1])


def test_run_takes_a_log_format() -> None:
    """`syncd run --log-format` accepts console and json and nothing else."""
    result = invoke("run", "--log-format", "xml")
    assert result.exit_code == 2
    assert "console" in result.output
    assert "json" in result.output


class Chatty(httpx.AsyncBaseTransport):
    """A transport that logs every request and answer in full at DEBUG, like a chatty library."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.log = logging.getLogger("tests.wire")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.log.debug("%s %s headers=%s body=%s", request.method, request.url, dict(request.headers), body)
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        self.log.debug("answer %s headers=%s body=%s", response.status_code, dict(response.headers), content)
        return httpx.Response(response.status_code, headers=response.headers, content=content, request=request)


async def test_no_secret_or_fetched_token_in_any_debug_line(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A webhook and the vendor calls it causes, at DEBUG with every library logging, leak no secret or token."""
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    config = load_config(write_config(tmp_path, sqlite_url, hub, xero))
    syncd_logging.register_secrets(config.secrets())  # what every command does after loading the config
    syncd_logging.configure("debug", json=True)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # SQL and its parameters
    logging.getLogger("tests.wire").setLevel(logging.DEBUG)
    mounts = {
        "http://hubspot.test": Chatty(httpx.ASGITransport(app=hub.app)),
        "http://xero.test": Chatty(httpx.ASGITransport(app=xero.app)),
    }
    daemon = Daemon(config, mounts=mounts, poll=False, workers=0)
    async with (
        daemon.lifespan(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=daemon.app()), base_url=SYNCD_URL) as web,
    ):
        await daemon.runtime.connectors["hubspot"].ensure_properties()
        hub.subscribe(f"{SYNCD_URL}/webhooks/hubspot", web)
        deal = seed_deal(hub)
        await hub.set_deal_properties(deal, {"dealstage": "closedwon"})  # delivers a signed webhook
        await daemon.engine.drain()
    assert len(xero.invoices()) == 1
    fetched = [token for token, grant in xero._grants.items() if grant.kind.startswith("access")]
    assert fetched, "the Xero connection fetched no token"
    secrets = [*config.secrets(), *fetched]
    assert len(secrets) >= 5
    lines = json_lines(capsys.readouterr().err)
    loggers = {line["logger"] for line in lines}
    assert {"tests.wire", "httpx", "aiosqlite", "sqlalchemy.engine.Engine", "syncd.web.webhooks"} <= loggers
    assert any("Bearer ***" in line["event"] for line in lines if line["logger"] == "tests.wire")
    for line in lines:
        text = json.dumps(line)
        assert not [secret for secret in secrets if secret in text], text


@pytest.mark.slow
@pytest.mark.parametrize("log_format", [None, "console"])
async def test_syncd_run_logs_every_library_in_one_format(tmp_path: Path, log_format: str | None) -> None:
    """`syncd run` writes JSON lines by default, uvicorn's included; --log-format console writes none."""
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    ports = {name: free_port() for name in ("hub", "xero", "syncd")}
    config = write_config(
        tmp_path, f"sqlite:///{tmp_path / 'syncd.db'}", hub, xero, daemon_extra="poll_interval_s = 3600"
    )
    text = config.read_text().replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{ports["syncd"]}"')
    text = text.replace("http://hubspot.test", f"http://127.0.0.1:{ports['hub']}")
    config.write_text(text.replace("http://xero.test", f"http://127.0.0.1:{ports['xero']}"))
    command = [sys.executable, "-m", "syncd", "run", "--config", str(config)]
    command += ["--log-format", log_format] if log_format else []
    log = tmp_path / "daemon.log"
    async with serve(hub.app, ports["hub"]), serve(xero.app, ports["xero"]):
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                await _ready(client, f"http://127.0.0.1:{ports['syncd']}", proc, log)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = log.read_text().strip().splitlines()
    assert any("Uvicorn running on" in line for line in lines), lines
    if log_format is None:
        parsed = [json.loads(line) for line in lines]  # every line is one JSON object
        assert {"uvicorn.error", "syncd.daemon"} <= {line["logger"] for line in parsed}
        assert not [line for line in parsed if "color_message" in line]
    else:
        assert not any(line.startswith("{") for line in lines)


async def _ready(client: httpx.AsyncClient, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``/readyz`` answers 200 (the daemon runs its own clock, so the test polls it)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"syncd run exited with {proc.returncode}: {log.read_text()[-2000:]}"
        with contextlib.suppress(httpx.TransportError):
            if (await client.get(f"{url}/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("syncd run did not become ready")
