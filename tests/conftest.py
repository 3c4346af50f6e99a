"""Fixtures shared by every test folder: the PostgreSQL test server (started by the machine or by `.ci/run`)."""

from __future__ import annotations

import os

import psycopg
import pytest

from cds_service.audit import redact_url

POSTGRES_URL = os.environ.get("KETAMINE_CDS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test server's URL; skip PostgreSQL tests if it is not running (fail if told it must be)."""
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        if os.environ.get("KETAMINE_CDS_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {redact_url(POSTGRES_URL)}: {type(exc).__name__}")
    return POSTGRES_URL


def pytest_configure(config: pytest.Config) -> None:
    """Remembered mapping verdicts (fhir_mappings/validation/verdicts.py) go to a cache of this test run, never the
    developer's: a test sees the full check on its first start, as a new machine would."""
    if not os.environ.get("KETAMINE_CDS_TEST_KEEP_CACHE"):
        import tempfile

        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ketamine-cds-test-cache-")
