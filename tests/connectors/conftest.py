"""Session fixtures for the connector tests: the Xero Accounting API description."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.configurations import Config

REPO = Path(__file__).resolve().parents[2]
XERO_SPEC_FILE = REPO / "specs" / "xero" / "xero_accounting.yaml"


@pytest.fixture(scope="session")
def xero_spec() -> OpenAPI:
    """``specs/xero/xero_accounting.yaml``, parsed once per session.

    The file fails strict spec validation on a nit (a string default on a boolean), so
    spec validation is skipped; request and response validation still work
    (``specs/README.md``). A missing file fails the session: it is part of the repository.

    The operations' ``security`` (OAuth2) is dropped in memory: openapi-core cannot check
    an OAuth2 scheme and warns "Unsupported scheme type" instead. The bearer token and
    tenant header are asserted by ``test_xero.py``.
    """
    if not XERO_SPEC_FILE.exists():
        pytest.fail(
            f"the Xero OpenAPI file is not at {XERO_SPEC_FILE}; it is tracked in the repository (specs/README.md)"
        )
    with XERO_SPEC_FILE.open("rb") as handle:
        raw = yaml.load(handle, Loader=yaml.CSafeLoader)
    raw.pop("security", None)
    for operations in raw["paths"].values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
    return OpenAPI.from_dict(raw, config=Config(spec_validator_cls=None))
