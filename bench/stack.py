"""The system under test: emulators in this process, syncd (or the baseline) in a child process.

The emulators are served by uvicorn on 127.0.0.1 free ports inside the benchmark's
event loop, with the load generator, so the bench can watch them directly (an invoice
commit at Xero is seen the moment it happens). syncd runs as ``python -m syncd run``
in its own process, so its CPU time and resident memory are read from
``/proc/<pid>`` without counting the emulators or the load generator. Everything
stays on loopback, and every wait here is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from cryptography.fernet import Fernet

from connectors.emulation import Fault
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.plumbing.serving import free_port, serve

REPO = Path(__file__).resolve().parents[1]
MAPPING = REPO / "mappings" / "hubspot-xero.toml"
PG_ADMIN = os.environ.get("SYNCD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
UNLIMITED = 1_000_000_000  # a client-side rate limit so high it never waits (TOML has no null)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ProcStats:
    """One reading of a process's resource use from ``/proc``.

    Attributes:
        cpu_s: user + system CPU seconds used so far.
        rss_mb: resident memory now.
        peak_rss_mb: the highest resident memory so far (``VmHWM``).
    """

    cpu_s: float
    rss_mb: float
    peak_rss_mb: float


def proc_stats(pid: int) -> ProcStats:
    """Read CPU time and memory of ``pid`` (Linux ``/proc``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of proc(5)
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            memory[key] = int(value.split()[0]) / 1024
    return ProcStats(cpu_s=cpu_s, rss_mb=memory.get("VmRSS", 0.0), peak_rss_mb=memory.get("VmHWM", 0.0))


def own_cpu_s() -> float:
    """CPU seconds of this (the bench) process: emulators plus load generator."""
    times = os.times()
    return times.user + times.system


class Child:
    """A child process serving HTTP (syncd or the baseline), with its log in a file.

    Args:
        argv: the command (run with this interpreter).
        url: where it answers; ``ready_path`` must answer 200 once it is up.
        log: its stdout and stderr.
        ready_path: the path polled until it answers 200.
    """

    def __init__(self, argv: Sequence[str], *, url: str, log: Path, ready_path: str = "/readyz") -> None:
        self.argv = list(argv)
        self.url = url
        self.log = log
        self.ready_path = ready_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The process id (once started)."""
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    def stats(self) -> ProcStats:
        """Its CPU time and memory now."""
        return proc_stats(self.pid)

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start it and wait until it answers ``ready_path`` with 200.

        Raises:
            RuntimeError: it exited, or was not ready within ``timeout_s``.
        """
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, *self.argv, stdout=out, stderr=out, env=env, cwd=REPO
            )
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"{self.argv[1]} exited with {self.proc.returncode}: {self.tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(self.url + self.ready_path)).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"{self.argv[1]} was not ready within {timeout_s:.0f} s: {self.tail()}")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the daemon drains), then SIGKILL if it has not exited in time."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)

    async def metric(self, name: str) -> float | None:
        """The value of an unlabelled metric on its ``/metrics`` (``None`` if it has none)."""
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(self.url + "/metrics")
        if response.status_code != 200:
            return None
        for line in response.text.splitlines():
            metric, _, value = line.partition(" ")
            if metric == name:
                return float(value)
        return None

    def tail(self, chars: int = 2000) -> str:
        """The end of its log."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


# -- databases ---------------------------------------------------------------------


def postgres_available() -> bool:
    """Whether the PostgreSQL server at ``SYNCD_TEST_PG_URL`` answers."""
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextlib.contextmanager
def database(kind: str, folder: Path) -> Any:
    """A fresh database URL: a SQLite file in ``folder``, or a throwaway PostgreSQL database dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'syncd.db'}"
        return
    name = f"syncd_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].split("://", 1)[1]
    try:
        yield f"postgresql+psycopg://{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- emulators ---------------------------------------------------------------------


@dataclass
class Vendors:
    """Both emulators, served on loopback in this process."""

    hub: HubSpotEmulator
    xero: XeroEmulator
    hub_url: str
    xero_url: str

    def add_latency(self, seconds: float) -> None:
        """Every answer of both emulators waits ``seconds`` first."""
        for emulator in (self.hub, self.xero):
            emulator.faults.add(Fault(kind="latency", latency_s=seconds, times=None))


@contextlib.asynccontextmanager
async def vendors(
    *, xero_limit_per_min: int | None = None, xero_app: Callable[[Any], Any] | None = None
) -> AsyncIterator[Vendors]:
    """Serve fresh emulators; Xero enforces its limits only when ``xero_limit_per_min`` is set.

    Args:
        xero_limit_per_min: Xero's per-minute limit to enforce (with its 5 concurrent
            calls and 5,000 a day); ``None`` switches Xero's limits off.
        xero_app: wraps the Xero ASGI app (to watch its requests).
    """
    hub = HubSpotEmulator(rate_limits=False, strict_properties=False)
    if xero_limit_per_min is None:
        xero = XeroEmulator(rate_limits=False)
    else:
        xero = XeroEmulator(rate_limits=True, rate_limit_per_min=xero_limit_per_min)
    ports = free_port(), free_port()
    app = xero_app(xero.app) if xero_app is not None else xero.app
    async with serve(hub.app, ports[0]), serve(app, ports[1]):
        yield Vendors(
            hub=hub, xero=xero, hub_url=f"http://127.0.0.1:{ports[0]}", xero_url=f"http://127.0.0.1:{ports[1]}"
        )


def seed_won_deals(hub: HubSpotEmulator, count: int, *, deals_per_company: int = 1) -> dict[str, str]:
    """Seed won deals (two lines each) with their company and billing contact.

    Each deal's first line is named uniquely, so the invoice it becomes is recognised.

    Returns:
        the first line's description → deal id.
    """
    by_line: dict[str, str] = {}
    company = contact = ""
    for index in range(count):
        if index % deals_per_company == 0:
            number = index // deals_per_company
            company = hub.add_company(
                {
                    "name": f"Client {number}",
                    "legal_name": f"Client {number} LLC",
                    "default_po_number": f"PO-{number}",
                    "payment_terms_days": "14",
                }
            )
            contact = hub.add_contact(
                {"firstname": "Dana", "lastname": f"Reyes {number}", "email": f"ap{number}@client.example"},
                company_id=company,
            )
        line = f"Discovery workshop #{index}"
        deal = hub.add_deal(
            {
                "dealname": f"Deal {index}",
                "dealstage": "closedwon",
                "pipeline": "default",
                "deal_currency_code": "USD",
            },
            company_id=company,
            contact_ids=[contact],
            line_items=[
                {"name": line, "quantity": "1", "price": "2500.00"},
                {"name": "Build sprint", "quantity": "4", "price": "2500.00"},
            ],
        )
        by_line[line] = deal
    return by_line


# -- syncd ------------------------------------------------------------------------


def write_config(
    folder: Path,
    *,
    db_url: str,
    port: int,
    bench: Vendors,
    workers: int,
    xero_limit_per_min: int = UNLIMITED,
    xero_concurrent: int = UNLIMITED,
    encryption_key: str | None = None,
    mapping: Path = MAPPING,
    batch_max: int | None = None,
) -> Path:
    """A syncd config pointing at the emulators, with client-side limits raised unless given.

    ``billing_start`` is in the past so deals seeded before the database existed are
    invoiced; poll ticks are hourly (the webhooks drive the work). Replicas of one
    database share ``encryption_key`` (a fresh one by default). ``batch_max`` sets
    ``[daemon].batch_max`` (1: batching off); ``None`` leaves syncd's default.
    """
    path = folder / "config.toml"
    hub, xero = bench.hub, bench.xero
    batching = "" if batch_max is None else f"batch_max = {batch_max}\n"
    path.write_text(
        f"""
[daemon]
database_url = "{db_url}"
listen = "127.0.0.1:{port}"
timezone = "America/New_York"
billing_start = "2000-01-01T00:00:00Z"
poll_interval_s = 3600
workers = {workers}
encryption_key = "{encryption_key or Fernet.generate_key().decode()}"
log_level = "info"
{batching}
[connections.hubspot]
connector = "hubspot"
base_url = "{bench.hub_url}"
token = "{hub.token}"
webhook_secret = "{hub.client_secret}"
rate_limit_per_10s = {UNLIMITED}
search_rate_per_s = {UNLIMITED}

[connections.xero]
connector = "xero"
base_url = "{bench.xero_url}"
token_url = "{bench.xero_url}/connect/token"
client_id = "{xero.client_id}"
client_secret = "{xero.client_secret}"
tenant_id = "{xero.tenant_id}"
webhook_key = "{xero.webhook_key}"
rate_limit_per_min = {xero_limit_per_min}
max_concurrent = {xero_concurrent}

[[pipelines]]
crm = "hubspot"
invoicing = "xero"
mapping = "{mapping}"
""",
        encoding="utf-8",
    )
    return path


@contextlib.asynccontextmanager
async def syncd(
    bench: Vendors,
    *,
    db: str = "sqlite",
    workers: int = 4,
    receiver_only: bool = False,
    xero_limit_per_min: int = UNLIMITED,
    xero_concurrent: int = UNLIMITED,
    batch_max: int | None = None,
) -> AsyncIterator[Child]:
    """Run syncd in a child process against ``bench`` on a fresh database.

    Args:
        bench: the emulators.
        db: ``sqlite`` or ``postgres``.
        workers: ``[daemon].workers``.
        receiver_only: serve the webhook endpoint with no workers and no poll ticks
            (``bench.receiver``) instead of ``syncd run``: the acknowledgement path alone.
        xero_limit_per_min / xero_concurrent: syncd's own Xero limits.
        batch_max: ``[daemon].batch_max`` (1: batching off; ``None``: syncd's default).
    """
    with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp:
        folder = Path(tmp)
        with database(db, folder) as db_url:
            port = free_port()
            config = write_config(
                folder,
                db_url=db_url,
                port=port,
                bench=bench,
                workers=workers,
                xero_limit_per_min=xero_limit_per_min,
                xero_concurrent=xero_concurrent,
                batch_max=batch_max,
            )
            module = ["-m", "bench.receiver"] if receiver_only else ["-m", "syncd", "run"]
            async with running([*module, "--config", str(config)], port=port, log=folder / "syncd.log") as child:
                yield child


@contextlib.asynccontextmanager
async def running(argv: Sequence[str], *, port: int, log: Path) -> AsyncIterator[Child]:
    """Start ``argv`` (a syncd serving on ``port`` of 127.0.0.1), and stop it after the block."""
    child = Child(argv, url=f"http://127.0.0.1:{port}", log=log)
    await child.start()
    try:
        yield child
    finally:
        await child.stop()


@contextlib.asynccontextmanager
async def replicas(
    bench: Vendors, *, count: int, workers: int, xero_limit_per_min: int, xero_concurrent: int
) -> AsyncIterator[list[Child]]:
    """Run ``count`` syncd processes against ``bench`` on one fresh PostgreSQL database.

    Each has its own port, log and config (the same settings, one encryption key); they
    share the work through the database, and the Xero budget through its rate-budget rows.
    """
    with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp, database("postgres", Path(tmp)) as db_url:
        key = Fernet.generate_key().decode()
        children: list[Child] = []
        try:
            for index in range(count):
                folder = Path(tmp) / f"replica-{index}"
                folder.mkdir()
                port = free_port()
                config = write_config(
                    folder,
                    db_url=db_url,
                    port=port,
                    bench=bench,
                    workers=workers,
                    xero_limit_per_min=xero_limit_per_min,
                    xero_concurrent=xero_concurrent,
                    encryption_key=key,
                )
                child = Child(
                    ["-m", "syncd", "run", "--config", str(config)],
                    url=f"http://127.0.0.1:{port}",
                    log=folder / "syncd.log",
                )
                children.append(child)
                await child.start()
            yield children
        finally:
            for child in children:
                await child.stop()


@contextlib.asynccontextmanager
async def baseline(bench: Vendors) -> AsyncIterator[Child]:
    """Run the minimal baseline (``bench.baseline``) in a child process against ``bench``."""
    with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp:
        port = free_port()
        hub, xero = bench.hub, bench.xero
        argv = [
            "-m",
            "bench.baseline",
            "--listen",
            f"127.0.0.1:{port}",
            "--hubspot",
            bench.hub_url,
            "--xero",
            bench.xero_url,
            "--token",
            hub.token,
            "--secret",
            hub.client_secret,
            "--xero-client-id",
            xero.client_id,
            "--xero-client-secret",
            xero.client_secret,
        ]
        child = Child(argv, url=f"http://127.0.0.1:{port}", log=Path(tmp) / "baseline.log", ready_path="/healthz")
        await child.start()
        try:
            yield child
        finally:
            await child.stop()
