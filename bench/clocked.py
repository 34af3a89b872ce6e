"""``syncd run`` with its business clock moved: the month-start benchmark's daemon on the 1st.

The month-start benchmark (``bench.monthstart``) needs a daemon that believes it is the
first of a month *now*, without waiting for one. The daemon takes its clock as a
parameter (``syncd.daemon.Daemon(clock=...)``, as the tests inject theirs), so this
builds the same :class:`~syncd.daemon.Daemon` and :class:`~syncd.daemon.Server` as
``syncd run`` (``syncd/cli/main.py::run``) with the real UTC time plus a fixed offset as
its clock: time still runs, from another instant. Only the business clock moves; vendor
rate windows, leases' timeouts and HTTP timers run on real time as always.

The database must already be migrated (the benchmark's first phase ran ``syncd run`` on it).

Usage: ``python -m bench.clocked --config CONFIG --offset-s SECONDS``
"""

from __future__ import annotations

import argparse
import signal
from datetime import datetime, timedelta
from pathlib import Path

from syncd.daemon import Daemon, Server
from syncd.engine.runtime import utcnow
from syncd.plumbing import logging as syncd_logging
from syncd.plumbing.settings import load_config


def shifted(offset_s: float) -> datetime:
    """The real time in UTC plus ``offset_s`` seconds."""
    return utcnow() + timedelta(seconds=offset_s)


def main() -> None:
    """Serve until SIGTERM, with the clock ``--offset-s`` seconds ahead of (or behind) real time."""
    parser = argparse.ArgumentParser(prog="python -m bench.clocked")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--offset-s", type=float, required=True, help="seconds added to the real time")
    args = parser.parse_args()
    config = load_config(args.config)
    syncd_logging.register_secrets(config.secrets())
    offset_s: float = args.offset_s
    daemon = Daemon(config, clock=lambda: shifted(offset_s))
    server = Server(daemon.server_config(log_format=syncd_logging.LogFormat.json), daemon)
    # As ``syncd run``: uvicorn re-raises the stop signal after draining; make that a no-op.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()


if __name__ == "__main__":
    main()
