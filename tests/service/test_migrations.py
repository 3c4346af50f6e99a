"""The audit store's versioned schema (Alembic) on SQLite and PostgreSQL: a store of an earlier release is adopted
with its rows, a store at an unknown (newer) revision is refused in one line, the migrated schema is exactly the
one `cds_service.audit` writes to, and `ketamine-cds db upgrade|current`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from cds_service import migrations, serving
from cds_service.audit import AuditStore, AuditStoreError, _build_tables, normalise_database_url
from cds_service.cli import main
from cds_service.config import ServiceConfig
from tests.service.test_audit import make_record, postgres_schema  # noqa: F401  (fixture)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    """(url, schema) of an empty database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}", None
    else:
        yield request.getfixturevalue("postgres_url"), request.getfixturevalue("postgres_schema")


def _engine(url: str) -> Any:
    return create_engine(normalise_database_url(url))


def _make_pre_alembic_store(url: str, schema: str | None) -> None:
    """A store as the release before versioning left it: tables by create_all, a row, no alembic_version."""
    metadata, hook_calls, _, _ = _build_tables(schema)
    engine = _engine(url)
    with engine.begin() as connection:
        if schema:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        metadata.create_all(connection)
        connection.execute(
            hook_calls.insert().values(
                received_at=datetime(2026, 1, 2, tzinfo=UTC),
                service_id="ketamine-prior-auth",
                endpoint="hook",
                hook_instance="kept-from-before",
                status_code=200,
                latency_ms=3.0,
                decisions=[],
                cards=[],
                system_actions=[],
            )
        )
    engine.dispose()


def _revision(url: str, schema: str | None) -> str | None:
    engine = _engine(url)
    with engine.connect() as connection:
        revision = migrations.current_revision(connection, schema)
    engine.dispose()
    return revision


def test_a_store_of_an_earlier_release_is_upgraded_with_its_rows(database: tuple[str, str | None]) -> None:
    url, schema = database
    _make_pre_alembic_store(url, schema)
    assert _revision(url, schema) is None
    with AuditStore(url, schema=schema, asynchronous=False) as store:
        store.record_call(make_record(hook_instance="written-after"))
        rows = {row["hook_instance"] for row in store.recent_calls()}
    assert rows == {"kept-from-before", "written-after"}
    assert _revision(url, schema) == migrations.head()


def test_a_store_at_an_unknown_revision_is_refused(
    database: tuple[str, str | None], capsys: pytest.CaptureFixture[str]
) -> None:
    url, schema = database
    AuditStore(url, schema=schema).close()
    engine = _engine(url)
    table = f'"{schema}".alembic_version' if schema else "alembic_version"
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE {table} SET version_num = '0007_from_a_newer_release'"))
    engine.dispose()
    with pytest.raises(AuditStoreError, match=r"schema revision '0007_from_a_newer_release'.* does not know"):
        AuditStore(url, schema=schema)
    if schema is None:  # the start-up check turns it into the one line before the port is bound
        with pytest.raises(SystemExit):
            serving.check_before_bind(
                ServiceConfig(insecure_no_auth=True, database=url), [("127.0.0.1", 8765)], mappings_checked=True
            )
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("ketamine-cds: not starting: ") and "0007_from_a_newer_release" in line


def test_the_migrated_schema_is_the_one_the_store_writes(database: tuple[str, str | None]) -> None:
    url, schema = database
    AuditStore(url, schema=schema).close()
    metadata = _build_tables(schema)[0]
    engine = _engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "include_schemas": schema is not None,
                "include_name": lambda name, kind, _parent: kind != "schema" or name == schema,
                "include_object": lambda _obj, name, kind, *_: not (kind == "table" and name == "alembic_version"),
                "compare_type": True,
            },
        )
        differences = compare_metadata(context, metadata)
    engine.dispose()
    assert differences == []


def test_db_cli_shows_and_upgrades(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    _make_pre_alembic_store(url, None)
    assert main(["db", "current", "--database", url]) == 0
    assert capsys.readouterr().out.strip() == (
        f"audit store at revision none (not versioned); head is {migrations.head()}: run `ketamine-cds db upgrade`"
    )
    assert main(["db", "upgrade", "--database", url]) == 0
    assert capsys.readouterr().out.strip() == f"audit store at revision {migrations.head()} (was not versioned)"
    assert main(["db", "current", "--database", url]) == 0
    assert capsys.readouterr().out.strip() == f"audit store at revision {migrations.head()}; up to date"
    assert main(["db", "current", "--database", "mysql://nope"]) == 2
    assert "unsupported database URL" in capsys.readouterr().err
