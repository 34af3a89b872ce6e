"""One syncd process: uvicorn, the APScheduler ticks and the workers, one lifespan.

The lifespan owns the store, the HTTP client and the scheduler. Shutdown is bounded by
``[daemon].shutdown_grace_s`` from the signal (SIGTERM or SIGINT, seen by
:class:`Server`): the workers claim nothing more at once and ``/readyz`` answers 503;
each worker finishes the vendor call in flight (no retry and no further call of that
row; the row goes back to the queue with its attempt counted) and hands the
rest of its claimed batch back to the queue uncounted (:meth:`syncd.engine.loop.Engine._work`).
uvicorn closes the connections (at most a fifth of the grace), the scheduler stops,
and a worker still busy when the grace is nearly spent is cancelled: its row goes back
to the queue with its attempt counted, so the next attempt looks up what it may have
created. Nothing claimed stays leased to a process that is gone.

Before the workers start, every CRM connection that writes billing properties creates
the ones it lacks (what ``syncd setup hubspot`` does, idempotently): the deal's, and the
company's with ``[collections] company_status``; when the token may not, the daemon
refuses to start with one line naming the scope and the command.

Mapping files are reloaded while it runs: on SIGHUP, and when a file's modification
time, size or inode changes (looked at every ``[daemon].mapping_watch_interval_s``).
A valid file is swapped in for the next event; a bad one leaves the running mapping in
place and each problem is logged (:meth:`~syncd.engine.runtime.Runtime.reload_mappings`).

uvicorn is configured here (:meth:`Daemon.server_config`): it installs no logging of its
own (its loggers go through the root handler :func:`syncd.plumbing.logging.configure` sets up, in
the same format as every other line), it answers 503 beyond ``[daemon].max_connections``,
closes keep-alive connections idle for ``[daemon].keep_alive_timeout_s`` and connections
whose request line and headers take longer than ``[daemon].request_head_timeout_s``; the
app itself cuts off a webhook body slower than ``[daemon].webhook_body_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import httpx
import structlog
import uvicorn
from starlette.applications import Starlette

from syncd.core.errors import AuthError, ConfigError
from syncd.core.interfaces import WritesCompanyStatus
from syncd.engine import recurring
from syncd.engine.alerts import AlertSender
from syncd.engine.loop import Engine
from syncd.engine.runtime import Runtime, utcnow
from syncd.engine.scheduler import build_scheduler, scheduler_jobs_settled
from syncd.plumbing import logging as syncd_logging
from syncd.plumbing.http import Sleep
from syncd.plumbing.settings import Config
from syncd.web.webhooks import create_app

log = structlog.get_logger("syncd.daemon")


@runtime_checkable
class WritesCrmProperties(Protocol):
    """A CRM connector that writes its own properties and can create them (HubSpot)."""

    async def ensure_properties(self) -> Any:
        """Create the missing properties; raises AuthError when the token may not."""
        ...


class Daemon:
    """The running service.

    Args:
        config: the validated configuration.
        clock: the clock (injected in tests).
        mounts: URL prefix → transport, to reach in-process emulators.
        poll: run the scheduler's poll ticks (tests that drive polls by hand turn it off).
        workers: worker tasks (default ``[daemon].workers``; 0 in tests that drain by hand).
        sleep: how vendor calls wait between retries (injected in tests: no wall time).

    Attributes:
        refusal: why the last start was refused (one line for ``syncd run``), if it was.
        alert_sender: posts alerts (``[alerts] webhook_url`` set); a task of its own
            beside the workers (none when ``workers`` is 0: tests call it by hand).
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], datetime] = utcnow,
        mounts: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        poll: bool = True,
        workers: int | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.config = config
        self.clock = clock
        self.mounts = mounts
        self.poll = poll
        self.sleep = sleep
        self.workers = config.daemon.workers if workers is None else workers
        self._runtime: Runtime | None = None
        self._engine: Engine | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_by: float | None = None  # loop time by which the workers must be done
        self._stamps: dict[Path, tuple[int, int, int] | None] = {}
        self.refusal: str | None = None
        self.alert_sender: AlertSender | None = None

    @property
    def runtime(self) -> Runtime:
        """The runtime (only while the lifespan runs)."""
        if self._runtime is None:
            raise RuntimeError("syncd is not started")
        return self._runtime

    @property
    def engine(self) -> Engine:
        """The engine (only while the lifespan runs)."""
        if self._engine is None:
            raise RuntimeError("syncd is not started")
        return self._engine

    def ready(self) -> bool:
        """Whether the workers run and no shutdown has begun."""
        return self._engine is not None and not self._stop.is_set()

    def app(self) -> Starlette:
        """The ASGI app, with this daemon's lifespan."""
        return create_app(self, lifespan=self.lifespan)

    def server_config(
        self, *, log_format: syncd_logging.LogFormat | None = None, lifespan: Literal["on", "off"] = "on"
    ) -> uvicorn.Config:
        """uvicorn's settings for this daemon, after setting up the process's logging.

        Args:
            log_format: ``json`` or ``console`` for every log line of the process (uvicorn,
                SQLAlchemy, APScheduler, httpx and syncd's own); ``None`` leaves logging as
                it is (tests). Setting it here mirrors ``uvicorn.Config``, which configures
                logging when it is built.
            lifespan: ``off`` when the caller runs :meth:`lifespan` itself (tests).
        """
        daemon = self.config.daemon
        if log_format is not None:
            syncd_logging.configure(daemon.log_level, json=log_format is syncd_logging.LogFormat.json)
        host, _, port = daemon.listen.rpartition(":")
        return uvicorn.Config(
            self.app(),
            host=host,
            port=int(port),
            lifespan=lifespan,
            log_config=None,  # uvicorn's loggers propagate to syncd's root handler
            access_log=False,
            # uvicorn answers 503 once its open connections (the new one included) or
            # running requests reach limit_concurrency: +1 lets max_connections be served.
            limit_concurrency=daemon.max_connections + 1,
            timeout_keep_alive=daemon.keep_alive_timeout_s,
            timeout_graceful_shutdown=graceful_shutdown_s(daemon.shutdown_grace_s),
            http=head_deadline_protocol(daemon.request_head_timeout_s),
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        """Start the runtime, workers and scheduler; stop them within the grace and close on exit."""
        self._stop = asyncio.Event()
        self._stop_by = None
        self._loop = asyncio.get_running_loop()
        self._runtime = await Runtime.start(self.config, clock=self.clock, mounts=self.mounts, sleep=self.sleep)
        try:
            await _create_crm_properties(self._runtime)
        except BaseException as exc:
            self.refusal = str(exc) if isinstance(exc, ConfigError) else None
            await self._runtime.aclose()
            raise
        self._engine = Engine(self._runtime, stop=self._stop)
        scheduler = (
            build_scheduler(
                self._runtime,
                self._engine.notify,
                self._engine.refresh_aging,
                functools.partial(recurring.run_due, self._engine),
                self._engine.collections.run,
            )
            if self.poll
            else None
        )
        self._workers = [asyncio.create_task(self._engine.run_worker(self._stop)) for _ in range(self.workers)]
        self.alert_sender = AlertSender(self._runtime) if self.config.settings.alerts.webhook_url else None
        if self.alert_sender is not None and self.workers:
            self._workers.append(asyncio.create_task(self.alert_sender.run(self._stop)))
        self._stamps = _mapping_stamps(self._runtime)
        watch = self._watch_mappings()
        sighup = self._listen_for_sighup()
        if scheduler is not None:
            scheduler.start()
        log.info("syncd_started", workers=len(self._workers), pipelines=len(self._runtime.pipelines))
        try:
            yield
        finally:
            self._begin_stop()
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            await self._stop_workers()
            await self._engine.batcher.settle()  # a batched call in flight finishes before the store closes
            if scheduler is not None:
                await scheduler_jobs_settled(scheduler, CLOSE_MARGIN_S / 2)
            await asyncio.gather(*watch, return_exceptions=True)
            await self._runtime.aclose()
            log.info("syncd_stopped")

    def stop_soon(self) -> None:
        """Begin stopping now (safe from a signal handler): workers claim nothing more.

        The grace (``[daemon].shutdown_grace_s``) runs from here, not from when uvicorn
        has closed its connections.
        """
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self) -> None:
        if self._stop.is_set():
            return
        grace_s = self.config.daemon.shutdown_grace_s
        self._stop_by = asyncio.get_running_loop().time() + grace_s - CLOSE_MARGIN_S
        self._stop.set()
        log.info("syncd_stopping", grace_s=grace_s)

    async def _stop_workers(self) -> None:
        """Wait for the workers until the grace is nearly spent; cancel the ones still busy."""
        workers, self._workers = self._workers, []
        if not workers:
            return
        left_s = max(0.0, (self._stop_by or 0.0) - asyncio.get_running_loop().time())
        _done, busy = await asyncio.wait(workers, timeout=left_s)
        for task in busy:
            task.cancel()
        if busy:
            log.warning("workers_cancelled", workers=len(busy), grace_s=self.config.daemon.shutdown_grace_s)
            await asyncio.wait(busy, timeout=CLOSE_MARGIN_S / 2)  # their rows are handed back meanwhile

    # -- mapping reloads ------------------------------------------------------------------

    def reload_mappings(self) -> list[str]:
        """Validate every mapping file again and swap in the valid ones (SIGHUP does this).

        Returns:
            every problem found (see :meth:`~syncd.engine.runtime.Runtime.reload_mappings`).
        """
        self._stamps = _mapping_stamps(self.runtime)  # before reading: a later edit is seen next time
        return self.runtime.reload_mappings()

    def poll_mappings(self) -> list[str] | None:
        """Reload if a mapping file changed since it was last read (the watch task calls this).

        Returns:
            ``None`` when no file changed, else the reload's problems (empty when it
            went through).
        """
        if _mapping_stamps(self.runtime) == self._stamps:
            return None
        log.info("mapping_file_changed")
        return self.reload_mappings()

    def _watch_mappings(self) -> list[asyncio.Task[None]]:
        interval = self.config.daemon.mapping_watch_interval_s
        return [asyncio.create_task(self._watch(interval))] if interval else []

    async def _watch(self, interval_s: int) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval_s)
            if not self._stop.is_set():
                self.poll_mappings()

    def _listen_for_sighup(self) -> bool:
        """Reload the mappings on SIGHUP; only possible from the main thread (not in every test)."""
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
            return False
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (NotImplementedError, RuntimeError, ValueError):
            return False
        return True

    def _on_sighup(self) -> None:
        log.info("mapping_reload_requested", signal="SIGHUP")
        self.reload_mappings()


CLOSE_MARGIN_S = 3.0  # of the shutdown grace, kept for handing rows back and closing the store and client


def graceful_shutdown_s(grace_s: int) -> int:
    """How long uvicorn waits for open requests on shutdown: a fifth of the grace, 1 to 5 s."""
    return max(1, min(5, grace_s // 5))


class Server(uvicorn.Server):
    """uvicorn's server for ``syncd run``: a stop signal also tells the daemon at once.

    uvicorn sees SIGTERM first, but runs the lifespan's shutdown only after closing its
    connections; the workers should stop claiming from the signal on, and the grace is
    counted from it.
    """

    def __init__(self, config: uvicorn.Config, daemon: Daemon) -> None:
        super().__init__(config)
        self.daemon = daemon

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.daemon.stop_soon()
        super().handle_exit(sig, frame)


async def _create_crm_properties(runtime: Runtime) -> None:
    """``syncd setup hubspot`` for every connection that needs it, before any worker runs.

    Raises:
        ConfigError: a token lacks the scope to create them (one line: scope and command).
    """
    company_status = runtime.config.settings.collections.company_status
    for name, connector in runtime.connectors.items():
        if not isinstance(connector, WritesCrmProperties):
            continue
        try:
            await connector.ensure_properties()
            if company_status and isinstance(connector, WritesCompanyStatus):
                await connector.ensure_company_properties()
        except AuthError as exc:
            raise ConfigError(
                f"syncd cannot create the deal{' and company' if company_status else ''} properties it writes: "
                f"{exc}; then run `syncd setup hubspot --connection {name}`",
                place=f"[connections.{name}]",
            ) from exc


class _RequestHeadDeadline(asyncio.Protocol):
    """Closes a connection whose request line and headers are not complete in time.

    uvicorn has no such timeout: its keep-alive timer is reset by every byte received and
    an ASGI app only runs once the headers are complete, so a client trickling its headers
    would hold a connection as long as it liked (the analysis of
    https://github.com/xorbitsai/inference/pull/5213). The deadline runs from the first
    byte of each request (from the connection's start for the first) until its head is
    parsed; the body is the app's business (``webhook_body_timeout_s``).
    """

    head_timeout_s: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    _head_cycle: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = getattr(self, "cycle", None)
        if self._head_timer is None and (cycle is None or cycle.response_complete):
            self._arm()  # a new request on a kept-alive connection
        super().data_received(data)
        if self._head_timer is not None and getattr(self, "cycle", None) is not self._head_cycle:
            self._disarm()  # the head is parsed: uvicorn made a new request cycle

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_cycle = getattr(self, "cycle", None)
        self._head_timer = asyncio.get_running_loop().call_later(self.head_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        log.warning("request_head_timeout", timeout_s=self.head_timeout_s)
        transport: asyncio.BaseTransport | None = getattr(self, "transport", None)
        if transport is not None:
            transport.close()


def head_deadline_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a request-head deadline."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("SyncdHTTPProtocol", (_RequestHeadDeadline, AutoHTTPProtocol), {"head_timeout_s": timeout_s})


def _mapping_stamps(runtime: Runtime) -> dict[Path, tuple[int, int, int] | None]:
    """The config file's and each mapping file's (mtime ns, size, inode); ``None`` for one that cannot be read."""
    stamps: dict[Path, tuple[int, int, int] | None] = {}
    paths = [runtime.config.path, *(runtime.config.mapping_path(p.settings) for p in runtime.pipelines)]
    for path in paths:
        try:
            found = path.stat()
        except OSError:
            stamps[path] = None
            continue
        stamps[path] = (found.st_mtime_ns, found.st_size, found.st_ino)
    return stamps
