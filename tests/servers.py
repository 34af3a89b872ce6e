"""Test support: an ASGI app on a real loopback socket in a thread, and the CLI runner.

A synchronous client (a vendor SDK, or the CLI, which runs its own event loop) needs a
real socket; uvicorn serves the app in a thread and says when it listens (as httpx's
own ``tests/conftest.py::serve_in_thread`` does).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator

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
