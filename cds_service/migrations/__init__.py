"""Versioned schema of the audit store (Alembic): the service brings a store to this release's head at start-up.

Why Alembic: an audit trail outlives releases. A store created before the schema was versioned (tables made by
`create_all`, no `alembic_version`) is adopted by the baseline revision, which creates only what is missing; a
store at a revision this release does not know (migrated by a newer release) is refused with one line instead of
being written to with the wrong schema. A new schema change is a new file in `versions/` whose `down_revision`
is the current head; `tests/service/test_migrations.py` fails while the tables `cds_service.audit` describes and
the migrated schema differ.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine

_LOCATION = str(Path(__file__).parent)


class UnknownRevision(RuntimeError):
    """The store is at a revision this release does not know."""


@functools.cache
def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", _LOCATION)
    return config


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """This release's schema revision."""
    revision = _script().get_current_head()
    assert revision is not None
    return revision


def current_revision(connection: Connection, schema: str | None = None) -> str | None:
    """The store's revision; None for a store that is empty or predates versioning."""
    return MigrationContext.configure(connection, opts={"version_table_schema": schema}).get_current_revision()


def upgrade_connection(connection: Connection, schema: str | None = None) -> tuple[str | None, str]:
    """Bring the store on this connection to head, inside the connection's transaction: (before, after)."""
    script = _script()
    before = current_revision(connection, schema)
    if before is not None:
        try:
            script.get_revision(before)
        except Exception:
            raise UnknownRevision(
                f"the audit store is at schema revision {before!r}, which this release of ketamine-cds does not "
                f"know (its newest is {head()!r}): a newer release has migrated it; run that release, or a "
                "database of its own for this one"
            ) from None
    if before == head():
        return before, before

    def upgrade_steps(revision: Any, _context: Any) -> Any:
        return script._upgrade_revs("head", revision)

    with EnvironmentContext(_config(), script, fn=upgrade_steps, destination_rev="head") as environment:
        environment.configure(connection=connection, version_table_schema=schema)
        environment.run_migrations()
    return before, head()


def current(url: str) -> str | None:
    """The revision of the store at `url` (for `ketamine-cds db current`)."""
    from cds_service.audit import AuditStoreError, _describe, normalise_database_url

    engine = create_engine(normalise_database_url(url), hide_parameters=True)
    try:
        with engine.connect() as connection:
            return current_revision(connection)
    except Exception as exc:
        raise AuditStoreError(f"cannot read the audit store's revision: {_describe(exc)}") from None
    finally:
        engine.dispose()


def upgrade(url: str) -> tuple[str | None, str]:
    """Upgrade the store at `url` to head (what the service does at start-up): (before, after)."""
    from cds_service.audit import AuditStore

    before = current(url)
    AuditStore(url, asynchronous=False).close()  # the store's own start-up: schema lock, then upgrade
    after = current(url)
    assert after is not None
    return before, after
