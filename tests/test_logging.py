"""Logs never carry a secret: credential-named keys and known secret values are redacted."""

from __future__ import annotations

import json

import pytest
import structlog

from syncd import logging as syncd_logging


def test_secrets_are_redacted_from_json_logs(capsys: pytest.CaptureFixture[str]) -> None:
    """A token under a sensitive key, or inside a message, never reaches the log line."""
    syncd_logging.register_secrets(["pat-na1-0000-super-secret"])
    syncd_logging.configure("info", json=True)
    log = structlog.get_logger("test")
    log.info(
        "http_failed", token="abc", error="401 for Bearer pat-na1-0000-super-secret", headers={"Authorization": "x"}
    )
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "http_failed"
    assert line["token"] == "***"
    assert "super-secret" not in line["error"]
    assert line["headers"] == {"Authorization": "***"}
