"""The webhook endpoint never answers 500: malformed input is 400 or 401, a database outage 503.

Driven through the real ASGI app (``httpx.ASGITransport``) and, where sockets and timing
matter, a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.hubspot.webhooks import sign_v3
from connectors.xero.webhooks import sign as xero_sign
from syncd.store.db import DeadLetterRow, EventRow
from tests.conftest import PG_ADMIN
from tests.harness import SYNCD_URL, Stack, stack

HUBSPOT_URI = f"{SYNCD_URL}/webhooks/hubspot"


def hubspot_event(**changes: Any) -> dict[str, Any]:
    """One well-formed HubSpot event, with ``changes`` applied."""
    event: dict[str, Any] = {
        "eventId": 1,
        "subscriptionId": 9,
        "portalId": 1,
        "occurredAt": int(time.time() * 1000),
        "subscriptionType": "deal.propertyChange",
        "objectId": 5,
        "propertyName": "dealstage",
        "propertyValue": "closedwon",
        "attemptNumber": 0,
    }
    return {**event, **changes}


def hubspot_headers(secret: str, body: bytes, timestamp: str | None = None) -> dict[str, str]:
    """Headers of a correctly signed HubSpot delivery (now, unless ``timestamp`` is given)."""
    stamp = str(int(time.time() * 1000)) if timestamp is None else timestamp
    signature = sign_v3(secret, method="POST", uri=HUBSPOT_URI, body=body, timestamp=stamp)
    return {
        "content-type": "application/json",
        "x-hubspot-signature-v3": signature,
        "x-hubspot-request-timestamp": stamp,
    }


def xero_event(**changes: Any) -> dict[str, Any]:
    """One well-formed Xero event, with ``changes`` applied."""
    event = {
        "resourceUrl": "https://api.xero.com/api.xro/2.0/Invoices/717f2bfc-c6d4-41fd-b238-3f2f0c0cf777",
        "resourceId": "717f2bfc-c6d4-41fd-b238-3f2f0c0cf777",
        "eventDateUtc": "2025-03-03T09:15:39.902",
        "eventType": "UPDATE",
        "eventCategory": "INVOICE",
        "tenantId": "3f7c2a6e-9b1d-4e58-a2c4-6d0e8f1b7a39",
        "tenantType": "ORGANISATION",
    }
    return {**event, **changes}


def xero_body(*events: dict[str, Any], **changes: Any) -> bytes:
    """A Xero delivery body holding ``events``."""
    payload = {"events": list(events), "firstEventSequence": 1, "lastEventSequence": 1, "entropy": "FXNGWLCCGV"}
    return json.dumps({**payload, **changes}).encode()


async def post_hubspot(s: Stack, body: bytes, timestamp: str | None = None) -> httpx.Response:
    headers = hubspot_headers(s.hub.client_secret, body, timestamp)
    # Header bytes as a client may send them: Latin-1, which the server decodes them as.
    raw = {key: value.encode("latin-1") for key, value in headers.items()}
    return await s.web.post("/webhooks/hubspot", content=body, headers=raw)


async def post_xero(s: Stack, body: bytes) -> httpx.Response:
    return await s.web.post(
        "/webhooks/xero", content=body, headers={"x-xero-signature": xero_sign(s.xero.webhook_key, body)}
    )


@pytest.mark.parametrize("timestamp", ["1e30", "nan", "-1", "9" * 400, "²³", "0x10", " ", "1" * 17])
async def test_an_out_of_range_hubspot_timestamp_is_401(tmp_path: Path, sqlite_url: str, timestamp: str) -> None:
    """A signed delivery whose X-HubSpot-Request-Timestamp is no epoch-ms number is 401, not 500."""
    async with stack(tmp_path, sqlite_url) as s:
        response = await post_hubspot(s, json.dumps([hubspot_event()]).encode(), timestamp)
        assert response.status_code == 401
        assert await s.daemon.runtime.store.count(EventRow) == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"occurredAt": 10**30}, "occurredAt"),
        ({"occurredAt": -1}, "occurredAt"),
        ({"objectId": int("9" * 400)}, "objectId"),
        ({"eventId": int("9" * 400)}, "eventId"),
        ({"subscriptionId": -5}, "subscriptionId"),
        ({"subscriptionType": "deal.teleported"}, "subscriptionType"),
        ({"subscriptionType": "deal." + "x" * 5000}, "subscriptionType"),
        ({"subscriptionType": "object.creation", "objectTypeId": "0-" + "1" * 400}, "objectTypeId"),
    ],
)
async def test_a_signed_hubspot_event_out_of_bounds_is_400(
    tmp_path: Path, sqlite_url: str, change: dict[str, Any], field: str
) -> None:
    """A correctly signed HubSpot event with an id, time or type out of bounds is 400 and not stored."""
    async with stack(tmp_path, sqlite_url) as s:
        response = await post_hubspot(s, json.dumps([hubspot_event(**change)]).encode())
        assert response.status_code == 400
        assert field in response.json()["error"]
        assert await s.daemon.runtime.store.count(EventRow) == 0
        assert await s.daemon.runtime.store.count(DeadLetterRow) == 1


async def test_json_nested_too_deep_is_400(tmp_path: Path, sqlite_url: str) -> None:
    """A signed body nested tens of thousands deep (json.loads raises RecursionError) is 400 for both vendors."""
    deep = b"[" * 50_000 + b"]" * 50_000
    async with stack(tmp_path, sqlite_url) as s:
        assert (await post_hubspot(s, deep)).status_code == 400
        assert (await post_xero(s, b'{"events": ' + deep + b"}")).status_code == 400
        assert await s.daemon.runtime.store.count(EventRow) == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resourceId": "1" * 400}, "resourceId"),
        ({"resourceId": "717f2bfc-c6d4-41fd-b238-3f2f0c0cf777" + "0" * 40}, "resourceId"),
        ({"eventCategory": "INVOICE" * 100}, "eventCategory"),
        ({"eventType": "update; drop table"}, "eventType"),
        ({"tenantId": "x" * 400}, "tenantId"),
        ({"eventDateUtc": "9999-12-31T23:59:59.999-14:00"}, "eventDateUtc"),
        ({"eventDateUtc": "2025-03-03T09:15:39" + "9" * 400}, "eventDateUtc"),
        ({"resourceUrl": "https://api.xero.com/" + "a" * 5000}, "resourceUrl"),
    ],
)
async def test_a_signed_xero_event_out_of_bounds_is_400(
    tmp_path: Path, sqlite_url: str, change: dict[str, Any], field: str
) -> None:
    """A correctly signed Xero event with an id, time or enum out of bounds is 400 and not stored."""
    async with stack(tmp_path, sqlite_url) as s:
        response = await post_xero(s, xero_body(xero_event(**change)))
        assert response.status_code == 400
        assert field in response.json()["error"]
        assert await s.daemon.runtime.store.count(EventRow) == 0


async def test_rejections_are_counted_by_outcome_and_reason(tmp_path: Path, sqlite_url: str) -> None:
    """/metrics counts each answer by connection, status and a reason from a fixed set; unknown names share one label."""
    async with stack(tmp_path, sqlite_url) as s:
        body = json.dumps([hubspot_event()]).encode()
        assert (await post_hubspot(s, body, "nan")).status_code == 401
        assert (await post_hubspot(s, json.dumps([hubspot_event(objectId=-1)]).encode())).status_code == 400
        assert (await post_hubspot(s, body)).status_code == 200
        for name in ("nope", "other"):
            assert (await s.web.post(f"/webhooks/{name}", content=body)).status_code == 404
        metrics = (await s.web.get("/metrics")).text
        assert 'syncd_webhooks_total{connection="hubspot",outcome="401",reason="signature"} 1.0' in metrics
        assert 'syncd_webhooks_total{connection="hubspot",outcome="400",reason="malformed"} 1.0' in metrics
        assert 'syncd_webhooks_total{connection="hubspot",outcome="200",reason="stored"} 1.0' in metrics
        assert 'syncd_webhooks_total{connection="",outcome="404",reason="unknown_connection"} 2.0' in metrics
        assert "nope" not in metrics


def _transactions(metrics: str) -> float:
    (line,) = [line for line in metrics.splitlines() if line.startswith("syncd_db_transactions_total ")]
    return float(line.split()[1])


async def test_metrics_count_the_transactions_of_the_store(tmp_path: Path, sqlite_url: str) -> None:
    """/metrics shows the store's transactions: a stored webhook is one, a duplicate one, a scrape's own reads none."""
    async with stack(tmp_path, sqlite_url) as s:
        first = _transactions((await s.web.get("/metrics")).text)
        assert _transactions((await s.web.get("/metrics")).text) == first
        body = json.dumps([hubspot_event()]).encode()
        assert (await post_hubspot(s, body)).status_code == 200
        assert (await post_hubspot(s, body)).status_code == 200  # the same event again: stored once
        assert _transactions((await s.web.get("/metrics")).text) == first + 2
        assert await s.daemon.runtime.store.count(EventRow) == 1


async def assert_down(s: Stack) -> None:
    """While the database is unreachable: webhook 503 + Retry-After, /readyz 503, /metrics 200."""
    response = await post_hubspot(s, json.dumps([hubspot_event()]).encode())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "60"
    malformed = await post_hubspot(s, json.dumps([hubspot_event(objectId=-1)]).encode())
    assert malformed.status_code == 503  # its dead letter could not be written either
    assert (await s.web.get("/readyz")).status_code == 503
    metrics = await s.web.get("/metrics")
    assert metrics.status_code == 200
    assert "syncd_database_up 0.0" in metrics.text
    assert 'syncd_webhooks_total{connection="hubspot",outcome="503",reason="unavailable"} 2.0' in metrics.text


async def assert_up(s: Stack) -> None:
    """Once the database is back the same delivery is stored and the process is ready again."""
    assert (await post_hubspot(s, json.dumps([hubspot_event()]).encode())).status_code == 200
    assert (await s.web.get("/readyz")).status_code == 200
    assert "syncd_database_up 1.0" in (await s.web.get("/metrics")).text
    assert await s.daemon.runtime.store.count(EventRow) == 1


async def test_a_missing_sqlite_file_is_503_then_recovers(tmp_path: Path) -> None:
    """With the SQLite file's folder gone the webhook is 503 with Retry-After; it is stored once it is back."""
    folder = tmp_path / "db"
    folder.mkdir()
    async with stack(tmp_path, f"sqlite:///{folder / 'syncd.db'}") as s:
        assert (await s.web.get("/readyz")).status_code == 200
        folder.rename(tmp_path / "gone")
        s.daemon.runtime.store.engine.dispose()  # the pooled connection still holds the old file open
        await assert_down(s)
        (tmp_path / "gone").rename(folder)
        await assert_up(s)


@pytest.mark.postgres
async def test_an_unreachable_postgres_is_503_then_recovers(tmp_path: Path, postgres_url: str) -> None:
    """With PostgreSQL refusing connections to the database the webhook is 503; it is stored once it is back."""
    name = postgres_url.rsplit("/", 1)[1]
    async with stack(tmp_path, postgres_url) as s:
        assert (await s.web.get("/readyz")).status_code == 200
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            await assert_down(s)
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await assert_up(s)


# -- fuzzing: whatever arrives, never a 500 ------------------------------------------------

LATIN1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | st.text(max_size=30)
    | st.just("deal.propertyChange")
    | st.just("717f2bfc-c6d4-41fd-b238-3f2f0c0cf777")
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
)


def _shaped(template: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``template``'s keys, each kept, dropped or given a fuzzed value."""
    keep = st.sampled_from(["keep", "drop", "fuzz"])
    return st.fixed_dictionaries({key: st.tuples(keep, JSON) for key in template}).map(
        lambda picks: {
            key: template[key] if how == "keep" else value for key, (how, value) in picks.items() if how != "drop"
        }
    )


HUBSPOT_BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.lists(_shaped(hubspot_event()), max_size=3).map(lambda events: json.dumps(events).encode()),
    st.integers(min_value=1, max_value=60_000).map(lambda depth: b"[" * depth + b"]" * depth),
)
XERO_BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.lists(_shaped(xero_event()), max_size=3).map(lambda events: xero_body(*events)),
    _shaped(json.loads(xero_body(xero_event()))).map(lambda payload: json.dumps(payload).encode()),
)
ANSWERS = {200, 400, 401, 413}


def test_fuzzed_deliveries_never_get_a_500(tmp_path: Path, sqlite_url: str) -> None:
    """Random headers and bodies, signed or not, to both vendors' endpoints get 200/400/401/413, never 500."""
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(stack(tmp_path, sqlite_url)) as s:

        @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(
            body=HUBSPOT_BODIES,
            signed=st.booleans(),
            timestamp=st.one_of(st.none(), LATIN1, st.integers().map(str), st.floats().map(str)),
            signature=LATIN1,
        )
        def hubspot(body: bytes, signed: bool, timestamp: str | None, signature: str) -> None:
            headers = hubspot_headers(s.hub.client_secret, body, timestamp)
            if not signed:
                headers["x-hubspot-signature-v3"] = signature
            raw = {key: value.encode("latin-1") for key, value in headers.items()}
            response = portal.call(lambda: s.web.post("/webhooks/hubspot", content=body, headers=raw))
            assert response.status_code in ANSWERS, response.text

        @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(body=XERO_BODIES, signed=st.booleans(), signature=LATIN1)
        def xero(body: bytes, signed: bool, signature: str) -> None:
            given_signature = xero_sign(s.xero.webhook_key, body) if signed else signature
            headers = {"x-xero-signature": given_signature.encode("latin-1")}
            response = portal.call(lambda: s.web.post("/webhooks/xero", content=body, headers=headers))
            assert response.status_code in ANSWERS, response.text

        hubspot()
        xero()


# -- slow clients: a real uvicorn on 127.0.0.1, raw sockets ---------------------------------

SLOW = "webhook_body_timeout_s = 1\nkeep_alive_timeout_s = 1\nmax_connections = 2\nrequest_head_timeout_s = 1"


class _Listening(uvicorn.Server):
    """uvicorn that says when it listens (no polling to find out)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()


@contextlib.asynccontextmanager
async def serving(s: Stack) -> AsyncIterator[int]:
    """The daemon's app under uvicorn, configured as `syncd run` does, on a free port in this loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = _Listening(s.daemon.server_config(lifespan="off"))  # the test's stack runs the lifespan
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await asyncio.wait_for(server.listening.wait(), timeout=10)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        sock.close()


async def request_head(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    return reader, writer


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it hangs up, kept as it arrives.

    A byte the client sent just as the server closed makes the server's kernel answer with a
    reset; ``reader.read()`` would then raise and drop the answer it had already received.
    """
    chunks: list[bytes] = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(4096):
            chunks.append(chunk)
    return b"".join(chunks)


POST_HEAD = b"POST /webhooks/hubspot HTTP/1.1\r\nhost: syncd.test\r\ncontent-length: 1000\r\n\r\n"


async def test_a_body_trickled_byte_by_byte_is_cut_off_with_408(tmp_path: Path, sqlite_url: str) -> None:
    """A client sending its body a byte at a time is answered 408 and disconnected after webhook_body_timeout_s."""
    async with stack(tmp_path, sqlite_url, daemon_extra=SLOW) as s, serving(s) as port:
        reader, writer = await request_head(port, POST_HEAD)
        started = time.monotonic()
        answer = asyncio.create_task(read_until_closed(reader))
        while not answer.done() and time.monotonic() - started < 8:
            with contextlib.suppress(ConnectionError):
                writer.write(b"[")
                await writer.drain()
            await asyncio.wait([answer], timeout=0.2)
        text = (await asyncio.wait_for(answer, timeout=2)).decode()
        elapsed = time.monotonic() - started
        writer.close()
        assert text.startswith("HTTP/1.1 408"), text
        assert "connection: close" in text.lower()
        assert 1 <= elapsed < 3
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            metrics = (await client.get("/metrics")).text  # the served app counts its own answers
        assert 'syncd_webhooks_total{connection="hubspot",outcome="408",reason="timeout"} 1.0' in metrics


async def test_headers_trickled_byte_by_byte_are_cut_off(tmp_path: Path, sqlite_url: str) -> None:
    """A client sending its request line and headers a byte at a time is disconnected after request_head_timeout_s."""
    async with stack(tmp_path, sqlite_url, daemon_extra=SLOW) as s, serving(s) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        closed = asyncio.create_task(read_until_closed(reader))
        for byte in POST_HEAD[:-2]:  # never the blank line that ends the head
            if closed.done() or time.monotonic() - started > 8:
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.wait([closed], timeout=0.2)
        assert await asyncio.wait_for(closed, timeout=2) == b""
        elapsed = time.monotonic() - started
        writer.close()
        assert 1 <= elapsed < 3
        # Prompt requests, several on one kept-alive connection, are served as before.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert [(await client.get("/healthz")).status_code for _ in range(3)] == [200, 200, 200]


async def test_connections_beyond_max_connections_get_503(tmp_path: Path, sqlite_url: str) -> None:
    """With max_connections = 2, two slow clients are served and a third connection is answered 503."""
    async with stack(tmp_path, sqlite_url, daemon_extra=SLOW) as s, serving(s) as port:
        held = [await request_head(port, POST_HEAD) for _ in range(2)]
        reader, writer = await request_head(port, b"GET /healthz HTTP/1.1\r\nhost: syncd.test\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), timeout=5)
        assert status.startswith(b"HTTP/1.1 503"), status
        for held_reader, held_writer in held:
            # The held ones were being served: each gets its own answer (408, as they stall).
            assert (await asyncio.wait_for(held_reader.readline(), timeout=5)).startswith(b"HTTP/1.1 408")
            held_writer.close()
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path, sqlite_url: str) -> None:
    """A keep-alive connection left idle is closed by the server after keep_alive_timeout_s."""
    async with stack(tmp_path, sqlite_url, daemon_extra=SLOW) as s, serving(s) as port:
        reader, writer = await request_head(port, b"GET /healthz HTTP/1.1\r\nhost: syncd.test\r\n\r\n")
        started = time.monotonic()
        text = await asyncio.wait_for(reader.read(), timeout=5)  # returns when the server hangs up
        elapsed = time.monotonic() - started
        writer.close()
        assert text.startswith(b"HTTP/1.1 200")
        assert 1 <= elapsed < 3
