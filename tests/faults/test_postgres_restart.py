"""PostgreSQL restarted under a running ``syncd run``: nothing lost, nothing twice.

The test runs its own throw-away cluster (``initdb`` into a temporary folder, its own
port), never the shared server: ``pg_ctl restart -m immediate`` kills every backend
without a checkpoint, as a crash of the database host would, while webhooks arrive and
invoices are being created. Webhooks refused meanwhile (503) are delivered again, as the
vendors do.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from syncd.plumbing.serving import free_port
from tests.faults.live import live
from tests.faults.rig import deals

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@dataclass(frozen=True)
class Cluster:
    """A private PostgreSQL: its data folder, port and binaries."""

    data: Path
    port: int
    bin: Path
    log: Path

    @property
    def url(self) -> str:
        """The ``syncd`` database's URL."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/syncd"

    def ctl(self, *args: str) -> None:
        """Run ``pg_ctl`` on this cluster (as the ``postgres`` user when the tests run as root)."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        _run(self.bin / "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", *args)

    def restart(self) -> None:
        """``pg_ctl restart -m immediate``: every connection dies, no checkpoint, then it starts again."""
        self.ctl("restart", "-m", "immediate")


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _run(*command: str | Path) -> None:
    done = subprocess.run([*_as_postgres(), *map(str, command)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{command[0]} failed: {done.stdout}\n{done.stderr}"


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """initdb, start on a free port, create the ``syncd`` database; stopped and removed afterwards."""
    binaries = _binaries()
    if binaries is None:
        if os.environ.get("CI"):
            pytest.fail("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
        pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql/*/bin")
    folder = Path(tempfile.mkdtemp(prefix="syncd-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root; the cluster belongs to postgres
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    node = Cluster(data=folder / "data", port=free_port(), bin=binaries, log=folder / "postgres.log")
    _run(binaries / "initdb", "-D", node.data, "-A", "trust", "-U", "postgres", "--no-sync")
    node.ctl("start")
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{node.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE syncd")
        yield node
    finally:
        with contextlib.suppress(AssertionError):
            node.ctl("stop", "-m", "immediate")
        shutil.rmtree(folder, ignore_errors=True)


async def test_a_postgres_restart_mid_run_loses_and_duplicates_nothing(tmp_path: Path, cluster: Cluster) -> None:
    """Deals won before, during and after an immediate restart of PostgreSQL are each invoiced once."""
    async with live(tmp_path, cluster.url) as s:
        await s.start()
        before = deals(s.hub, 3)
        for deal in before:
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        restart = asyncio.create_task(asyncio.to_thread(cluster.restart))  # while the first are invoiced
        during: list[str] = []
        while not restart.done() or len(during) < 2:  # webhooks keep coming while it is down
            (deal,) = deals(s.hub, 1)
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
            during.append(deal)
            await asyncio.sleep(0.15)
        await restart
        refused = [d for d in s.hub.webhooks.deliveries if d.status != 200]
        await s.settled(before + during)
        assert await s.replicas[0].stop() == 0
        report = await s.verify("PostgreSQL restarted mid-run", expect_won=before + during)
    assert report.invoices == len(before) + len(during)
    assert "database system was interrupted" in cluster.log.read_text()  # it did go down hard
    assert refused, "no webhook arrived while the database was down"
    assert {d.status for d in refused} == {503}  # and those were answered 503, to be delivered again
