"""Audit trail and feedback store: one SQLAlchemy Core schema for SQLite (default) and PostgreSQL.

Why it exists: CRD servers "SHALL retain logs of all CRD-related hook invocations and their responses", and
CDS Hooks feedback must be stored idempotently. Both go to the same database.

Design:
- Hook-call records are written by one background thread from a bounded queue, batched into one transaction,
  so auditing never adds database latency to a clinician's request. When the queue is full the record is
  dropped and counted (a warning is logged) instead of blocking the request.
- Feedback is written synchronously, because the client must only get its 200 once the feedback is stored.
  Idempotency uses the dialect's ``INSERT … ON CONFLICT DO NOTHING``: one statement, no read-then-write race
  between gunicorn processes, no per-row savepoints (a failed INSERT aborts a whole PostgreSQL transaction).
- Nothing here stores tokens: `HookCallRecord` has no field for `fhirAuthorization`, and any key that names a
  token is scrubbed from the JSON payloads before writing. Log lines carry counts and exception classes only,
  never patient data (the stored rows contain patient ids: the database itself is the access-controlled store).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateSchema

from cds_service import migrations

logger = logging.getLogger(__name__)

#: Keys removed from any JSON payload before it is stored (compared case-insensitively).
SECRET_KEYS: frozenset[str] = frozenset({"access_token", "refresh_token", "id_token", "fhirauthorization"})

SQLITE_BUSY_TIMEOUT_S = 10.0  # how long a writer waits for another process's write lock before failing
MAX_BATCH = 500  # call records written per transaction by the background writer
_TRANSIENT_RETRY_DELAYS_S = (0.2, 1.0)  # back-off before retrying a batch after a connection/lock error
_DROP_WARNING_INTERVAL_S = 30.0  # at most one "queue full" warning per interval, so a flood cannot flood the log
_PG_DDL_LOCK_KEY = 0x6B6574616D696E  # pg_advisory_xact_lock key: serialises CREATE TABLE across workers
_STOP = object()  # queue sentinel that tells the writer thread to exit
WRITER_LINGER_S = 0.05  # the writer sleeps this long once a record arrived, then takes all queued (fewer commits)


class AuditStoreError(RuntimeError):
    """The store cannot be opened or cannot store data. Messages never contain a password."""


@dataclass(frozen=True)
class HookCallRecord:
    """What happened on one call to the hook or feedback endpoint (the audit row)."""

    received_at: datetime  # UTC
    service_id: str
    endpoint: str  # "hook" | "feedback"
    hook: str | None
    hook_instance: str | None
    status_code: int
    latency_ms: float
    outcome: str | None  # "triaged-out" | "evaluated" | "refused" | "error" (what happened to the call)
    decisions: list[dict]  # per decision: {"policy", "outcome", "orders", "phase"} (may be empty)
    cards: list[dict]  # the cards returned (may be empty)
    system_actions: list[dict]
    mapping_version: str | None
    issuer: str | None  # JWT iss of the caller (None with --insecure-no-auth)
    patient_id: str | None  # context.patientId (audit needs it; access-controlled store; never in logs)
    user_id: str | None
    fhir_server: str | None
    error: str | None  # short PHI-free reason for 4xx/5xx ("invalid request: context.draftOrders missing")


@dataclass(frozen=True)
class FeedbackItem:
    """One validated CDS Hooks feedback entry (see `cds_service.feedback.parse_feedback`)."""

    card_uuid: str
    outcome: str  # "accepted" | "overridden"
    outcome_timestamp: datetime  # UTC, parsed
    accepted_suggestions: tuple[str, ...]
    override_reason: dict | None  # normalised {"code", "system", "display"?} or None
    user_comment: str | None


# --------------------------------------------------------------------------------------------------------------
# URLs


def redact_url(raw: str) -> str:
    """Hide the password of a database URL, even one SQLAlchemy cannot parse.

    Greedy up to the last '@' on purpose: an unencoded '@' inside a password must not leak its tail
    (SQLAlchemy's own `render_as_string(hide_password=True)` leaks it). Over-redacting is harmless.
    """
    redacted = re.sub(r"(://[^:/@?#]*:).*@", r"\1***@", raw)
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", redacted)


def normalise_database_url(raw: str) -> URL:
    """Parse a `--database` URL and pick our drivers: pysqlite for SQLite, psycopg 3 for PostgreSQL.

    Accepts ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``, ``sqlite://`` (in memory),
    ``postgresql://…`` and ``postgres://…`` (mapped to ``postgresql+psycopg://``).
    """
    if "://" not in raw:  # not URL-shaped: we cannot tell where a password would be, so do not echo it
        raise AuditStoreError("cannot parse the database URL: expected sqlite:///file.db or postgresql://user@host/db")
    try:
        url = make_url(raw)
    except Exception:  # ArgumentError or ValueError (bad port); their messages echo the URL, so say it ourselves
        raise AuditStoreError(f"cannot parse database URL {redact_url(raw)!r}") from None
    backend, _, driver = url.drivername.partition("+")
    if backend in {"postgresql", "postgres"} and driver in {"", "psycopg"}:
        authority = raw.partition("://")[2].partition("?")[0]
        if authority.count("@") > 1:
            # SQLAlchemy would take the password's tail for the host name, and the driver would echo it.
            raise AuditStoreError(
                f"cannot parse database URL {redact_url(raw)!r}: percent-encode '@' in the password as %40"
            )
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in {"", "pysqlite"}:
        return url.set(drivername="sqlite")
    raise AuditStoreError(
        f"unsupported database URL {redact_url(raw)!r}: use sqlite:///file.db or postgresql://user@host:5432/db"
    )


# --------------------------------------------------------------------------------------------------------------
# Schema


def _build_tables(schema: str | None) -> tuple[MetaData, Table, Table, Table]:
    """Describe the tables; built per store because the PostgreSQL schema is chosen per store."""
    json_type = JSON().with_variant(pg_dialect.JSONB(), "postgresql")
    metadata = MetaData(schema=schema)
    hook_calls = Table(
        "hook_calls",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("received_at", DateTime(timezone=True), nullable=False),
        Column("service_id", Text, nullable=False),
        Column("endpoint", Text, nullable=False),
        Column("hook", Text),
        Column("hook_instance", Text),
        Column("status_code", Integer, nullable=False),
        Column("latency_ms", Float, nullable=False),
        Column("outcome", Text),
        Column("decisions", json_type, nullable=False),
        Column("cards", json_type, nullable=False),
        Column("system_actions", json_type, nullable=False),
        Column("mapping_version", Text),
        Column("issuer", Text),
        Column("patient_id", Text),
        Column("user_id", Text),
        Column("fhir_server", Text),
        Column("error", Text),
        Index("ix_hook_calls_received_at", "received_at"),
        Index("ix_hook_calls_hook_instance", "hook_instance"),
    )
    feedback = Table(
        "feedback",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("received_at", DateTime(timezone=True), nullable=False),
        Column("service_id", Text, nullable=False),
        Column("card_uuid", Text, nullable=False),
        Column("outcome", Text, nullable=False),
        Column("outcome_timestamp", DateTime(timezone=True), nullable=False),
        Column("accepted_suggestions", json_type, nullable=False),
        Column("override_reason", json_type),
        Column("user_comment", Text),
        Column("issuer", Text),
        UniqueConstraint("service_id", "card_uuid", "outcome", "outcome_timestamp", name="uq_feedback_item"),
        Index("ix_feedback_card_uuid", "card_uuid"),
    )
    # JWT ids already used, shared by every worker and instance on this database (replay protection).
    jwt_ids = Table(
        "jwt_ids",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("issuer", Text, nullable=False),
        Column("jti", Text, nullable=False),
        Column("forget_after", Float, nullable=False),  # epoch seconds: token exp + leeway
        UniqueConstraint("issuer", "jti", name="uq_jwt_ids"),
        Index("ix_jwt_ids_forget_after", "forget_after"),
    )
    return metadata, hook_calls, feedback, jwt_ids


# --------------------------------------------------------------------------------------------------------------
# Helpers


def scrub_secrets(value: Any) -> Any:
    """Return a copy of a JSON-like value without any key that names a token, at any depth.

    Defence in depth: the service never puts tokens into cards, but a stored token would outlive its
    purpose, so a bug elsewhere must not be able to persist one. The input is not modified.
    """
    if isinstance(value, Mapping):
        return {key: scrub_secrets(item) for key, item in value.items() if str(key).lower() not in SECRET_KEYS}
    if isinstance(value, list | tuple):
        return [scrub_secrets(item) for item in value]
    return value


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
REPLACEMENT = "\ufffd"


def sanitise_for_store(value: Any) -> Any:
    """A copy of a JSON-like value that every supported database can store: NUL (refused by PostgreSQL text
    and JSONB) and lone surrogates (not encodable as UTF-8) become U+FFFD, in keys and values, at any depth.

    The value is kept, not dropped: an audit row must exist for every answered call, whatever it carried.
    """
    if isinstance(value, str):
        return _UNSTORABLE.sub(REPLACEMENT, value) if _needs_sanitising(value) else value
    if isinstance(value, Mapping):
        return {sanitise_for_store(str(key)): sanitise_for_store(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [sanitise_for_store(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/Infinity are not JSON
    return value


def _scrubbed_for_store(value: Any) -> Any:
    """`sanitise_for_store(scrub_secrets(value))` in one walk: the call payloads (cards, decisions) are the bulk of
    what the audit writer does per call. A payload the walk would return unchanged is returned as it is
    (`_storable_as_is`: one C-speed serialisation instead of the walk)."""
    if _storable_as_is(value):
        return value
    return _scrubbed_walk(value)


_SECRET_KEY_TEXTS = tuple(f'"{key}":' for key in sorted(SECRET_KEYS))


def _storable_as_is(value: Any) -> bool:
    """True only when `value` is stored as the same JSON text as `_scrubbed_walk(value)` (tuples stay tuples: both are
    arrays in the column): orjson serialises it with the store's own options
    (it refuses lone surrogates, non-string keys, datetimes and str subclasses, which the walk converts or keeps
    differently), the text holds no NUL (orjson writes it as `\\u0000`), no `null` (NaN is written as null too,
    and the walk turns it into None) and, lower-cased as the walk compares keys, no `"<secret key>":` — secret keys
    are plain ASCII, which orjson never escapes, so a key that lower-cases to one is found."""
    if not isinstance(value, dict | list):
        return False
    try:
        text = orjson.dumps(value, option=_ORJSON_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return False
    if "\\u0000" in text or "null" in text:
        return False
    lowered = text.lower()
    return not any(key in lowered for key in _SECRET_KEY_TEXTS)


def _scrubbed_walk(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub(REPLACEMENT, value) if _needs_sanitising(value) else value
    if isinstance(value, Mapping):
        return {
            sanitise_for_store(str(key)): _scrubbed_walk(item)
            for key, item in value.items()
            if str(key).lower() not in SECRET_KEYS
        }
    if isinstance(value, list | tuple):
        return [_scrubbed_walk(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_text(value: Any) -> str:
    """The JSON columns' serializer: orjson (C speed); whatever it cannot serialize as the stdlib would (non-str
    keys, datetimes, subclasses, huge integers) goes to `json.dumps`, which stores it or refuses it as before."""
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        return json.dumps(value)


def _needs_sanitising(text: str) -> bool:
    return "\x00" in text or (not text.isascii() and _UNSTORABLE.search(text) is not None)


def _as_utc(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC (SQLite returns them naive); aware ones are converted."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _describe(exc: BaseException, password: str | None = None) -> str:
    """A short, PHI-free description of a database error for logs and messages.

    Only the driver's first line: PostgreSQL's DETAIL line (second line) can quote row values.
    Bound parameters are never included (the engine uses hide_parameters=True). The password, if given,
    is blanked in case a driver ever echoes it.
    """
    original = getattr(exc, "orig", None) or exc
    first_line = redact_url((str(original).strip().splitlines() or [""])[0][:200])
    if password:
        first_line = first_line.replace(password, "***")
    return f"{type(original).__name__}: {first_line}" if first_line else type(original).__name__


def _is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: lost connections, a locked SQLite file, a PostgreSQL restart."""
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.DisconnectionError)


def _close_at_exit(store_ref: weakref.ref[AuditStore]) -> None:
    """atexit hook: the writer is a daemon thread, so queued records would otherwise be lost at exit."""
    store = store_ref()
    if store is not None:
        store.close()


def _reset_after_fork(store_ref: weakref.ref[AuditStore]) -> None:
    """In a forked child (gunicorn --preload): fresh locks, queue and pool; the parent keeps its own."""
    store = store_ref()
    if store is not None:
        store._reset_in_child()


# --------------------------------------------------------------------------------------------------------------
# The store


class AuditStore:
    """Hook-call audit records and feedback in one SQLite or PostgreSQL database.

    `schema` (PostgreSQL only) puts the tables into that schema, creating it if missing; tests use a fresh
    schema per run for isolation, deployments may use it to separate the audit tables from other data.
    """

    def __init__(
        self,
        url: str,
        *,
        asynchronous: bool = True,
        queue_size: int = 10000,
        schema: str | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1 (0 would make the queue unbounded)")
        self._url = normalise_database_url(url)
        self._safe_url = redact_url(url)
        self._asynchronous = asynchronous
        self._queue_size = queue_size
        self._schema = schema
        if schema is not None and self._url.get_backend_name() != "postgresql":
            raise AuditStoreError("a database schema can only be chosen for PostgreSQL")
        self._engine, self._in_memory = self._create_engine()
        # An in-memory SQLite database is one shared connection: serialise its use across threads.
        self._memory_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self._in_memory else contextlib.nullcontext()
        )
        self._metadata, self._hook_calls, self._feedback, self._jwt_ids = _build_tables(schema)
        self._claims_since_purge = 0
        self._create_tables()

        self._state = threading.Condition()  # guards everything below
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._writer: threading.Thread | None = None  # started on the first record_call
        self._pending = 0  # enqueued and not yet written (or given up on)
        self._dropped = 0
        self._failed = 0
        self._written = 0
        self._feedback_failed = 0
        self._last_drop_warning = float("-inf")
        self._closed = False

        store_ref = weakref.ref(self)
        atexit.register(_close_at_exit, store_ref)
        os.register_at_fork(after_in_child=functools.partial(_reset_after_fork, store_ref))

    # -- setup -------------------------------------------------------------------------------------------------

    def _create_engine(self) -> tuple[Engine, bool]:
        """One pooled engine per store; SQLite gets WAL and a busy timeout so processes do not block each other."""
        url = self._url
        if url.get_backend_name() == "postgresql":
            engine = create_engine(
                url,
                pool_pre_ping=True,  # survive a PostgreSQL restart between calls
                hide_parameters=True,  # exception messages would otherwise quote patient ids
                connect_args={"connect_timeout": 5},
                json_serializer=_json_text,
            )
            return engine, False

        database = url.database or ""
        in_memory = database in {"", ":memory:"}
        if in_memory:
            engine = create_engine(
                url,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
                hide_parameters=True,
                json_serializer=_json_text,
            )
        else:
            if not url.query.get("uri"):
                try:
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise AuditStoreError(
                        f"cannot create the directory for {self._safe_url!r}: {exc.strerror}"
                    ) from None
            engine = create_engine(
                url,
                # Connections are pooled and each is used by one thread at a time (writer or request thread).
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
                hide_parameters=True,
                json_serializer=_json_text,
            )

        @event.listens_for(engine, "connect")
        def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
                if not in_memory:
                    # Readers never block the writer and vice versa; several processes can share the file.
                    cursor.execute("PRAGMA journal_mode = WAL")
                    # In WAL mode NORMAL syncs at checkpoints, not at every commit: a crash of the process never
                    # loses a commit and the file never corrupts; only a power cut may lose the last commits.
                    cursor.execute("PRAGMA synchronous = NORMAL")
            finally:
                cursor.close()

        return engine, in_memory

    def _create_tables(self) -> None:
        """Create schema and tables if missing; safe when several workers start at once."""
        last_error: Exception | None = None
        for _attempt in range(3):
            try:
                with self._engine.begin() as connection:
                    if self.dialect == "postgresql":
                        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_DDL_LOCK_KEY})
                        if self._schema is not None:
                            connection.execute(CreateSchema(self._schema, if_not_exists=True))
                    try:  # the versioned schema (Alembic): a store of an earlier release is upgraded
                        migrations.upgrade_connection(connection, self._schema)
                    except migrations.UnknownRevision as exc:
                        raise AuditStoreError(f"{self._safe_url}: {exc}") from None
                return
            except sa_exc.SQLAlchemyError as exc:  # another process won a CREATE race, or we cannot connect
                last_error = exc
                if "already exists" not in str(exc):
                    break
                time.sleep(0.1)
        assert last_error is not None
        self._engine.dispose()
        raise AuditStoreError(f"cannot open audit database {self._safe_url!r}: {self._explain(last_error)}") from None

    def _reset_in_child(self) -> None:
        """Called right after fork in the child: nothing of the parent's thread, locks or connections is usable."""
        self._state = threading.Condition()
        self._queue = queue.Queue(maxsize=self._queue_size)
        self._writer = None
        self._pending = 0
        if self._in_memory:
            self._memory_lock = threading.Lock()
        self._engine.dispose(close=False)  # leave the parent's connections alone, open new ones here

    # -- public API --------------------------------------------------------------------------------------------

    @property
    def dialect(self) -> str:
        """The database kind: "sqlite" or "postgresql"."""
        return self._engine.dialect.name

    @property
    def dropped_count(self) -> int:
        """Call records dropped because the queue was full or the store was closed."""
        with self._state:
            return self._dropped

    @property
    def written_count(self) -> int:
        """Call records written by this store (this process) so far."""
        with self._state:
            return self._written

    @property
    def feedback_failed_count(self) -> int:
        """Feedback requests the database refused (the client got a 503 and may retry)."""
        with self._state:
            return self._feedback_failed

    @property
    def failed_count(self) -> int:
        """Call records the database refused (after retries); each was logged without its content."""
        with self._state:
            return self._failed

    @property
    def queue_depth(self) -> int:
        """Call records queued and not yet written (readiness, metrics)."""
        with self._state:
            return self._pending

    @property
    def queue_capacity(self) -> int:
        return self._queue_size

    def check_writable(self) -> str | None:
        """None when the database accepts a write now (a probe row inserted and rolled back), else why not."""
        probe = self._jwt_ids.insert().values(issuer="readiness-probe", jti=uuid.uuid4().hex, forget_after=0.0)
        try:
            with self._memory_lock, self._engine.connect() as connection, connection.begin() as transaction:
                connection.execute(probe)
                transaction.rollback()
        except sa_exc.SQLAlchemyError as exc:
            return self._explain(exc)
        return None

    def record_call(self, record: HookCallRecord) -> None:
        """Audit one call. Asynchronous mode only enqueues (microseconds) and never raises or blocks.

        The record's lists must not be changed after this call: the writer reads them later.
        """
        if not self._asynchronous:
            if self._closed:
                with self._state:
                    self._count_drop_locked("store closed")
            else:
                self._write_calls([record])
            return
        with self._state:
            if self._closed:
                self._count_drop_locked("store closed")
                return
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self._count_drop_locked("queue full")
                return
            self._pending += 1
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._run_writer, args=(self._queue,), name="audit-writer", daemon=True
                )
                self._writer.start()

    def record_feedback(self, service_id: str, items: list[FeedbackItem], issuer: str | None) -> int:
        """Store feedback now; returns how many rows were new. A repeat of a stored item is not an error.

        Raises AuditStoreError when the database cannot store it, so the endpoint can answer 5xx.
        """
        received_at = datetime.now(UTC)
        rows_by_key: dict[tuple[str, str, datetime], dict[str, Any]] = {}
        for item in items:  # duplicates inside one request collapse here; repeats across requests in the DB
            timestamp = _as_utc(item.outcome_timestamp)
            rows_by_key.setdefault(
                (sanitise_for_store(item.card_uuid), item.outcome, timestamp),
                sanitise_for_store(
                    {
                        "service_id": service_id,
                        "card_uuid": item.card_uuid,
                        "outcome": item.outcome,
                        "accepted_suggestions": list(item.accepted_suggestions),
                        "override_reason": scrub_secrets(item.override_reason) if item.override_reason else None,
                        "user_comment": item.user_comment,
                        "issuer": issuer,
                    }
                )
                | {"received_at": received_at, "outcome_timestamp": timestamp},
            )
        if not rows_by_key:
            return 0
        insert = pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert
        statement = (
            insert(self._feedback)
            .values(list(rows_by_key.values()))
            .on_conflict_do_nothing(index_elements=["service_id", "card_uuid", "outcome", "outcome_timestamp"])
            .returning(self._feedback.c.id)  # rowcount is -1 with psycopg 3; RETURNING counts on both dialects
        )
        try:
            with self._memory_lock, self._engine.begin() as connection:
                inserted = len(connection.execute(statement).all())
        except sa_exc.SQLAlchemyError as exc:
            with self._state:
                self._feedback_failed += 1
                failures = self._feedback_failed
            logger.error(
                "audit: could not store %d feedback item(s): %s (%d feedback write(s) failed so far)",
                len(rows_by_key),
                self._explain(exc),
                failures,
            )
            raise AuditStoreError(f"could not store feedback: {self._explain(exc)}") from None
        return inserted

    def claim_jti(self, issuer: str, jti: str, forget_after: float) -> bool:
        """Record a JWT id as used; False if it was already used (a replay) by any worker on this database.

        Synchronous by necessity (the answer decides the request), one indexed insert. Expired ids are purged
        every 500 claims. Raises AuditStoreError when the database cannot answer (the caller refuses the call).

        On the request path of every call: the insert is compiled once (`_claim_sql`) and run on the pool's DBAPI
        connection (checkout still pre-pings PostgreSQL), which costs a quarter of building and executing the
        SQLAlchemy statement each time; the statement and the transaction are the same.
        """
        sql, order = self._claim_sql
        values = {"issuer": issuer, "jti": jti, "forget_after": forget_after}
        params: Any = tuple(values[name] for name in order) if order is not None else values
        dbapi_error = self._engine.dialect.loaded_dbapi.Error
        try:
            with self._memory_lock:
                connection = self._engine.raw_connection()
                try:
                    cursor = connection.cursor()
                    try:
                        if self.dialect == "postgresql":
                            # This transaction only: the commit returns before its WAL record is flushed. Uniqueness
                            # is decided by the unique index when the row is inserted, not at the flush, so one jti
                            # is still claimed exactly once however many workers race (tests/service/test_audit.py);
                            # what a database crash could lose is the last fraction of a second of claims.
                            cursor.execute("SET LOCAL synchronous_commit = off")
                        cursor.execute(sql, params)
                        claimed = bool(cursor.fetchall())
                    finally:
                        cursor.close()
                    connection.commit()
                except BaseException:
                    connection.rollback()
                    raise
                finally:
                    connection.close()  # back to the pool
        except (dbapi_error, sa_exc.SQLAlchemyError) as exc:
            logger.error("audit: could not check a JWT id: %s", self._explain(exc))
            raise AuditStoreError(f"could not check a JWT id: {self._explain(exc)}") from None
        self._claims_since_purge += 1
        if self._claims_since_purge >= 500:
            self._claims_since_purge = 0
            self._purge_expired_jtis()
        return claimed

    @functools.cached_property
    def _claim_sql(self) -> tuple[str, tuple[str, ...] | None]:
        """The claim's INSERT ... ON CONFLICT DO NOTHING RETURNING in the driver's own paramstyle, compiled once."""
        insert = pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert
        statement = (
            insert(self._jwt_ids)
            .values(issuer=bindparam("issuer"), jti=bindparam("jti"), forget_after=bindparam("forget_after"))
            .on_conflict_do_nothing(index_elements=["issuer", "jti"])
            .returning(self._jwt_ids.c.id)
        )
        compiled = statement.compile(dialect=self._engine.dialect)
        order = compiled.positiontup  # positional paramstyle (SQLite's qmark): the parameters' order
        return compiled.string, tuple(order) if order is not None else None

    def _purge_expired_jtis(self) -> None:
        try:
            with self._memory_lock, self._engine.begin() as connection:
                connection.execute(self._jwt_ids.delete().where(self._jwt_ids.c.forget_after < time.time()))
        except sa_exc.SQLAlchemyError as exc:  # the claim itself succeeded; the next purge tries again
            logger.warning("audit: could not purge expired JWT ids: %s", self._explain(exc))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every call record queued so far has been written (or given up on), at most `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._state:
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning("audit: flush timed out with %d call record(s) still queued", self._pending)
                    return
                self._state.wait(remaining)

    def close(self) -> None:
        """Write what is queued, stop the writer and release connections. Safe to call twice."""
        with self._state:
            if self._closed:
                return
            self._closed = True  # from now on record_call drops (and counts) instead of enqueueing
        self.flush()
        with self._state:
            writer, writer_queue = self._writer, self._queue
        if writer is not None:
            try:
                writer_queue.put(_STOP, timeout=1.0)
            except queue.Full:
                logger.warning("audit: writer did not drain its queue; stopping without it")
            writer.join(timeout=5.0)
        self._engine.dispose()
        with self._state:
            if self._dropped:
                logger.warning("audit: closed; %d call record(s) were dropped in total", self._dropped)

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close()

    def recent_calls(self, limit: int = 50) -> list[dict]:
        """The newest `limit` call records, newest first, JSON columns decoded, times in UTC."""
        table = self._hook_calls
        query = select(table).order_by(table.c.received_at.desc(), table.c.id.desc()).limit(max(limit, 0))
        return self._read(query, ("received_at",))

    def feedback_for(self, card_uuid: str) -> list[dict]:
        """Every stored feedback row for one card, oldest outcome first."""
        table = self._feedback
        query = select(table).where(table.c.card_uuid == card_uuid).order_by(table.c.outcome_timestamp, table.c.id)
        return self._read(query, ("received_at", "outcome_timestamp"))

    # -- internals ---------------------------------------------------------------------------------------------

    def _explain(self, exc: BaseException) -> str:
        """`_describe` with this store's password blanked."""
        return _describe(exc, self._url.password)

    def _read(self, query: Any, datetime_columns: tuple[str, ...]) -> list[dict]:
        try:
            with self._memory_lock, self._engine.connect() as connection:
                rows = [dict(row._mapping) for row in connection.execute(query)]
        except sa_exc.SQLAlchemyError as exc:
            raise AuditStoreError(f"could not read the audit store: {self._explain(exc)}") from None
        for row in rows:
            for column in datetime_columns:
                if row[column] is not None:
                    row[column] = _as_utc(row[column])
        return rows

    def _count_drop_locked(self, reason: str) -> None:
        """Count a dropped record; warn at most once per interval (caller holds self._state)."""
        self._dropped += 1
        now = time.monotonic()
        if now - self._last_drop_warning >= _DROP_WARNING_INTERVAL_S:
            self._last_drop_warning = now
            logger.error("audit: %s, %d call record(s) dropped so far", reason, self._dropped)

    def _run_writer(self, writer_queue: queue.Queue[Any]) -> None:
        """Background thread: take whatever is queued, write it in one transaction, repeat until _STOP."""
        while True:
            first = writer_queue.get()
            stop = first is _STOP
            batch: list[HookCallRecord] = [] if stop else [first]
            if not stop:
                # Sleep through the linger, then take what queued meanwhile: a writer waiting on the queue instead
                # would be woken by every call's put (a thread switch on the request path, per call).
                time.sleep(WRITER_LINGER_S)
            while not stop and len(batch) < MAX_BATCH:
                try:
                    item = writer_queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                try:
                    self._write_calls(batch)
                except Exception as exc:  # never let anything kill the writer
                    logger.error("audit: writer error: %s", self._explain(exc))
                finally:
                    with self._state:
                        self._pending -= len(batch)
                        self._state.notify_all()
            if stop:
                return

    def _write_calls(self, records: list[HookCallRecord]) -> None:
        """Insert call records: one transaction for all, then record by record if that fails.

        Transient errors (lock, lost connection) are retried with back-off first; anything else means one
        record is bad (e.g. not JSON-serialisable), so the others are saved individually and the bad one is
        counted and logged (class of error only).
        """
        rows: list[dict[str, Any]] = []
        failed = 0
        last_error: BaseException | None = None
        for record in records:
            try:
                rows.append(self._call_row(record))
            except Exception as exc:
                failed, last_error = failed + 1, exc

        if rows:
            error = self._insert_calls_with_retry(rows)
            if error is not None:
                last_error = error
                for row in rows:
                    try:
                        self._insert_calls([row])
                    except Exception as exc:
                        failed, last_error = failed + 1, exc

        with self._state:
            self._written += len(records) - failed
            self._failed += failed
            failures = self._failed
        if failed:
            assert last_error is not None
            logger.error(
                "audit: %d of %d call record(s) could not be written: %s (%d failed so far)",
                failed,
                len(records),
                self._explain(last_error),
                failures,
            )

    def _insert_calls_with_retry(self, rows: list[dict[str, Any]]) -> Exception | None:
        """Insert all rows in one transaction; retry transient errors. Returns the last error or None."""
        for delay in (*_TRANSIENT_RETRY_DELAYS_S, None):
            try:
                self._insert_calls(rows)
                return None
            except Exception as exc:
                if delay is None or not _is_transient(exc) or self._closed:
                    return exc
                time.sleep(delay)
        return None  # pragma: no cover - the loop always returns

    def _insert_calls(self, rows: list[dict[str, Any]]) -> None:
        with self._memory_lock, self._engine.begin() as connection:
            connection.execute(self._hook_calls.insert(), rows)

    @staticmethod
    def _call_row(record: HookCallRecord) -> dict[str, Any]:
        """The database row for a record: UTC time, JSON payloads copied without secrets, every string
        sanitised for the store (NUL, lone surrogates)."""
        row = sanitise_for_store(
            {
                "service_id": record.service_id,
                "endpoint": record.endpoint,
                "hook": record.hook,
                "hook_instance": record.hook_instance,
                "outcome": record.outcome,
                "mapping_version": record.mapping_version,
                "issuer": record.issuer,
                "patient_id": record.patient_id,
                "user_id": record.user_id,
                "fhir_server": record.fhir_server,
                "error": record.error,
            }
        )
        row["decisions"] = _scrubbed_for_store(list(record.decisions or []))
        row["cards"] = _scrubbed_for_store(list(record.cards or []))
        row["system_actions"] = _scrubbed_for_store(list(record.system_actions or []))
        row["received_at"] = _as_utc(record.received_at)
        row["status_code"] = int(record.status_code)
        row["latency_ms"] = float(record.latency_ms)
        return row
