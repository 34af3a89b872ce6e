"""Failpoints: armed only from SYNCD_FAILPOINTS, each fires once, an unknown one is refused in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.core.errors import ConfigError
from syncd.plumbing import failpoints
from tests.harness import write_config


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    failpoints.disarm()
    yield
    failpoints.disarm()


def test_nothing_is_armed_without_the_variable() -> None:
    """No SYNCD_FAILPOINTS: every point passes."""
    assert failpoints.arm_from_env({}) == {}
    for point in failpoints.POINTS:
        failpoints.hit(point)


def test_an_armed_point_fires_once_and_others_pass() -> None:
    """``raise`` raises at its point the first time only; other points are untouched."""
    armed = failpoints.arm_from_env({failpoints.ENV: " after_claim:raise , after_local_commit:kill "})
    assert armed == {"after_claim": "raise", "after_local_commit": "kill"}
    failpoints.hit("before_vendor_call")
    with pytest.raises(failpoints.FailpointHit, match="after_claim"):
        failpoints.hit("after_claim")
    failpoints.hit("after_claim")  # fired already


@pytest.mark.parametrize("spec", ["after_claim", "after_lunch:kill", "after_claim:explode"])
def test_an_unknown_point_or_action_names_the_variable_and_what_exists(spec: str) -> None:
    """A typo is a ConfigError naming SYNCD_FAILPOINTS, the entry, and the known points and actions."""
    with pytest.raises(ConfigError) as caught:
        failpoints.arm_from_env({failpoints.ENV: spec})
    assert caught.value.place == failpoints.ENV
    assert repr(spec) in caught.value.message
    assert "after_vendor_2xx" in caught.value.message
    assert "kill, stop, raise" in caught.value.message


def test_kill_sigkills_the_process_itself() -> None:
    """``kill`` ends the process with SIGKILL at the point, after one warning line naming it."""
    code = "from syncd.plumbing import failpoints; failpoints.arm_from_env(); failpoints.hit('after_vendor_2xx'); print('alive')"
    env = {**os.environ, failpoints.ENV: "after_vendor_2xx:kill"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == -signal.SIGKILL
    assert "alive" not in done.stdout


def test_syncd_run_refuses_a_bad_variable_in_one_line(tmp_path: Path) -> None:
    """``syncd run`` with a misspelt point exits 2 with one line, before it starts anything."""
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'syncd.db'}", HubSpotEmulator(), XeroEmulator())
    env = {**os.environ, failpoints.ENV: "after_vendor_200:kill"}
    command = [sys.executable, "-m", "syncd", "run", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=60)
    assert done.returncode == 2
    assert "SYNCD_FAILPOINTS" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "syncd.db").exists()
