"""PostgreSQL fixtures for the reliability tests (the same server and throw-away schemas as the audit tests)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

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


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A uniquely named schema, created and dropped afterwards, so runs never see each other's rows."""
    schema = f"reliability_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    yield schema
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
