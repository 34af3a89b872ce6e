"""Test support: an ASGI app on a real loopback socket in a thread, the CLI runner, and
real ``syncd run`` processes.

A synchronous client (a vendor SDK, or the CLI, which runs its own event loop) needs a
real socket; uvicorn serves the app in a thread and says when it listens (as httpx's
own ``tests/conftest.py::serve_in_thread`` does). The crash and fault tests start the
daemon as a subprocess (:func:`start_daemon`), wait until it answers ``/readyz``
(:func:`healthy`) and then until what they expect is true (:func:`until`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import structlog
import uvicorn
from click.testing import Result
from starlette.types import ASGIApp
from typer.testing import CliRunner

from syncd.cli.main import app


class _Server(uvicorn.Server):
    """uvicorn that signals when it is listening (no polling to find out)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


@contextlib.contextmanager
def serve_in_thread(asgi: ASGIApp) -> Iterator[str]:
    """``asgi`` on a free loopback port, in a thread, until the block exits; its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(asgi, log_config=None, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(timeout=10), "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def invoke(*args: str) -> Result:
    """Run ``syncd ARGS`` in-process; the test's logging set-up is put back afterwards."""
    saved, handlers = structlog.get_config(), logging.root.handlers[:]
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        structlog.configure(**saved)
        logging.root.handlers[:] = handlers


async def until(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Wait until ``check()`` is true (a real process works on its own time), else fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def start_daemon(config: Path, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python -m syncd run --config CONFIG``, its output appended to ``log``; ``env`` is added to ours."""
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "syncd", "run", "--config", str(config)], stdout=out, stderr=out, env=environ
        )


async def healthy(client: httpx.AsyncClient, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the daemon at ``url`` answers ``/readyz`` 200; fail with its log's tail if it exits."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if (await client.get(f"{url}/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("daemon did not become ready")
