"""PostgreSQL fixtures for the reliability tests (the same server and throw-away schemas as the audit tests)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A uniquely named schema, created and dropped afterwards, so runs never see each other's rows."""
    schema = f"reliability_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    yield schema
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
