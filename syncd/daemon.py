"""One syncd process: uvicorn, the APScheduler ticks and the workers, one lifespan.

The lifespan owns the store, the HTTP client and the scheduler. On shutdown (SIGTERM,
handled by uvicorn) it stops taking new work, lets every worker finish the batch it
has claimed, stops the scheduler and closes the store: in-flight work is drained, and
anything not yet claimed stays in the database for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import httpx
import structlog
from starlette.applications import Starlette

from syncd.engine import Engine
from syncd.runtime import Runtime, utcnow
from syncd.scheduler import build_scheduler
from syncd.settings import Config
from syncd.webhooks import create_app

log = structlog.get_logger("syncd.daemon")


class Daemon:
    """The running service.

    Args:
        config: the validated configuration.
        clock: the clock (injected in tests).
        mounts: URL prefix → transport, to reach in-process emulators.
        poll: run the scheduler's poll ticks (tests that drive polls by hand turn it off).
        workers: worker tasks (default ``[daemon].workers``; 0 in tests that drain by hand).
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], datetime] = utcnow,
        mounts: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        poll: bool = True,
        workers: int | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.mounts = mounts
        self.poll = poll
        self.workers = config.daemon.workers if workers is None else workers
        self._runtime: Runtime | None = None
        self._engine: Engine | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

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

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        """Start the runtime, workers and scheduler; drain and close them on exit."""
        self._stop = asyncio.Event()
        self._runtime = await Runtime.start(self.config, clock=self.clock, mounts=self.mounts)
        self._engine = Engine(self._runtime)
        scheduler = (
            build_scheduler(self._runtime, self._engine.notify, self._engine.refresh_aging) if self.poll else None
        )
        self._workers = [asyncio.create_task(self._engine.run_worker(self._stop)) for _ in range(self.workers)]
        if scheduler is not None:
            scheduler.start()
        log.info("syncd_started", workers=len(self._workers), pipelines=len(self._runtime.pipelines))
        try:
            yield
        finally:
            self._stop.set()
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []
            await self._runtime.aclose()
            log.info("syncd_stopped")
