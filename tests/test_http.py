"""The shared HTTP plumbing: the status table, Retry-After, retries of retriable errors only."""

from __future__ import annotations

import httpx
import pytest

from syncd.core.errors import AuthError, FatalError, NotFound, RateLimited, RecordError, RetriableError
from syncd.plumbing.http import Action, RateLimit, Rejected, VendorHttp, action_for, retry_after_s, within


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (200, Action.OK),
        (204, Action.OK),
        (400, Action.FAIL_RECORD),
        (401, Action.AUTH),
        (403, Action.AUTH),
        (404, Action.NOT_FOUND),
        (408, Action.RETRY),
        (409, Action.RETRY),
        (422, Action.FAIL_RECORD),
        (429, Action.RATE_LIMITED),
        (500, Action.RETRY),
        (503, Action.RETRY),
        (599, Action.RETRY),
    ],
)
def test_every_status_maps_to_one_action(status: int, action: Action) -> None:
    """Each HTTP status has exactly one action."""
    assert action_for(status) is action


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After is understood as delta-seconds and as an HTTP date."""
    assert retry_after_s(httpx.Headers({"retry-after": "7"})) == 7.0
    assert retry_after_s(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}), now=1445412470.0) == 10.0
    assert retry_after_s(httpx.Headers({})) is None


def _vendor(handler: httpx.MockTransport, sleeps: list[float], **kwargs: object) -> VendorHttp:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    client = httpx.AsyncClient(transport=handler)
    return VendorHttp(client, connection="acme", base_url="https://acme.test", sleep=sleep, **kwargs)  # type: ignore[arg-type]


async def test_a_429_is_retried_after_exactly_retry_after() -> None:
    """A 429 with Retry-After waits that long, then succeeds."""
    answers = iter([httpx.Response(429, headers={"retry-after": "3"}), httpx.Response(200, json={"ok": True})])
    sleeps: list[float] = []
    http = _vendor(httpx.MockTransport(lambda _r: next(answers)), sleeps)
    response = await http.request("GET", "/things")
    assert response.json() == {"ok": True}
    assert sleeps == [3.0]
    assert http.calls == 2


async def test_retries_stop_after_max_attempts() -> None:
    """A vendor that keeps failing raises RetriableError after max_attempts calls."""
    sleeps: list[float] = []
    http = _vendor(httpx.MockTransport(lambda _r: httpx.Response(503)), sleeps, max_attempts=3)
    with pytest.raises(RetriableError):
        await http.request("GET", "/things")
    assert http.calls == 3


async def test_unsafe_calls_are_not_retried() -> None:
    """retry=False sends once: the engine resolves a lost answer by looking up, not re-creating."""
    sleeps: list[float] = []
    http = _vendor(httpx.MockTransport(lambda _r: httpx.Response(500)), sleeps)
    with pytest.raises(RetriableError):
        await http.request("POST", "/invoices", json={}, retry=False)
    assert http.calls == 1


@pytest.mark.parametrize(("status", "error"), [(400, FatalError), (401, AuthError), (404, NotFound)])
async def test_non_retriable_errors_are_raised_at_once(status: int, error: type[Exception]) -> None:
    """4xx other than 429 are not retried and raise the error their action names."""
    sleeps: list[float] = []
    http = _vendor(httpx.MockTransport(lambda _r: httpx.Response(status, text="nope")), sleeps)
    with pytest.raises(error):
        await http.request("GET", "/things")
    assert http.calls == 1
    assert sleeps == []


async def test_transport_errors_are_retriable() -> None:
    """A connection error is retried like a 5xx."""
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200)

    sleeps: list[float] = []
    assert (await _vendor(httpx.MockTransport(handler), sleeps).request("GET", "/x")).status_code == 200
    assert len(sleeps) == 1


async def test_rate_limited_error_carries_retry_after() -> None:
    """The 429 error exposes the vendor's Retry-After to the engine."""
    sleeps: list[float] = []
    http = _vendor(
        httpx.MockTransport(lambda _r: httpx.Response(429, headers={"retry-after": "42"})), sleeps, max_attempts=1
    )
    with pytest.raises(RateLimited) as info:
        await http.request("GET", "/x")
    assert info.value.retry_after_s == 42.0


async def test_a_rate_limit_bucket_counts_requests() -> None:
    """Requests pass through the named bucket's limiter."""
    sleeps: list[float] = []
    http = _vendor(
        httpx.MockTransport(lambda _r: httpx.Response(200)),
        sleeps,
        limits=[RateLimit(max_requests=100, period_s=1, concurrency=2)],
    )
    for _ in range(5):
        await http.request("GET", "/x")
    assert http.calls == 5


@pytest.mark.parametrize(("limit", "window_s"), [(60, 60), (100, 10), (5, 1), (3, 60), (10_000, 60)])
def test_a_bucket_never_passes_more_than_the_vendor_limit_in_a_window(limit: int, window_s: float) -> None:
    """Burst plus one window of drip stays within the vendor's limit, and uses at least 95% of it."""
    (bucket,) = within(limit, window_s)
    most_in_a_window = bucket.max_requests + (window_s / bucket.period_s) * bucket.max_requests
    assert most_in_a_window <= limit + 1e-9
    assert most_in_a_window >= 0.95 * limit


def test_zero_or_none_switches_a_limit_off() -> None:
    """0 (TOML has no null) and None both switch limiting off; concurrency alone stays."""
    assert within(0, 60) == []
    assert within(None, 60) == []
    (only_concurrency,) = within(0, 60, concurrency=5)
    assert only_concurrency.concurrency == 5


class _AcmeErrors:
    """A vendor whose error bodies are ``{"problems": [...]}``."""

    def messages(self, response: httpx.Response) -> list[str]:
        return [str(item) for item in response.json().get("problems", [])]

    def auth_advice(self, response: httpx.Response) -> str:
        return f"run `syncd auth acme` (status {response.status_code})"


@pytest.mark.parametrize("status", [400, 422])
async def test_a_refused_record_carries_every_vendor_message(status: int) -> None:
    """400/422 raise Rejected (a record error) at once, holding each message the vendor's body lists."""
    body = {"problems": ["Account code '999' is not valid", "Currency JPY is not enabled"]}
    sleeps: list[float] = []
    http = _vendor(httpx.MockTransport(lambda _r: httpx.Response(status, json=body)), sleeps, errors=_AcmeErrors())
    with pytest.raises(Rejected) as caught:
        await http.request("PUT", "/invoices", json={})
    assert isinstance(caught.value, RecordError)
    assert caught.value.messages == ("Account code '999' is not valid", "Currency JPY is not enabled")
    assert caught.value.status == status
    assert str(caught.value) == (
        f"acme: PUT /invoices answered {status}: Account code '999' is not valid; Currency JPY is not enabled"
    )
    assert (http.calls, sleeps) == (1, [])


async def test_auth_errors_carry_the_vendors_advice() -> None:
    """A 401/403 message names the connection, the call and what the connector says to do."""
    http = _vendor(httpx.MockTransport(lambda _r: httpx.Response(403, json={})), [], errors=_AcmeErrors())
    with pytest.raises(AuthError, match=r"^acme: GET /things answered 403: run `syncd auth acme` \(status 403\)$"):
        await http.request("GET", "/things")


async def test_a_409_conflict_is_retried() -> None:
    """409 is retriable: a conflicting concurrent change settles and the call succeeds."""
    answers = iter([httpx.Response(409), httpx.Response(200, json={"ok": True})])
    sleeps: list[float] = []
    http = _vendor(httpx.MockTransport(lambda _r: next(answers)), sleeps)
    assert (await http.request("GET", "/things")).json() == {"ok": True}
    assert len(sleeps) == 1
