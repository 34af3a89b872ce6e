"""syncd's webhook receiver alone: ``syncd run`` with no workers and no poll ticks.

The ingest benchmark measures the acknowledgement path (verify, dedupe, store, answer
200) without the workers competing for the CPU; ``[daemon].workers`` cannot be 0 in
a config, so this builds the same :class:`~syncd.daemon.Daemon` and uvicorn server as
``syncd run`` (``syncd/cli/main.py::run``) with ``workers=0, poll=False``.

Usage: ``python -m bench.receiver --config CONFIG``
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import uvicorn

from syncd.daemon import Daemon
from syncd.plumbing import logging as syncd_logging
from syncd.plumbing.settings import load_config


def main() -> None:
    """Serve the receiver until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--config", type=Path, required=True)
    config = load_config(parser.parse_args().config)
    syncd_logging.register_secrets(config.secrets())
    syncd_logging.configure(config.daemon.log_level)
    host, _, port = config.daemon.listen.rpartition(":")
    daemon = Daemon(config, poll=False, workers=0)
    server = uvicorn.Server(
        uvicorn.Config(daemon.app(), host=host, port=int(port), log_config=None, access_log=False, lifespan="on")
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()


if __name__ == "__main__":
    main()
