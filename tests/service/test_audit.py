"""AuditStore against SQLite (tmp_path) and a real PostgreSQL server (a throw-away schema per test)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc

from cds_service import audit
from cds_service.audit import AuditStore, AuditStoreError, FeedbackItem, HookCallRecord, normalise_database_url

PATIENT_ID = "patient-4711-phi"  # must never show up in a log line

StoreFactory = Callable[..., AuditStore]


def make_record(**changes: Any) -> HookCallRecord:
    """A fully populated hook-call record; tests override what they look at."""
    record = HookCallRecord(
        received_at=datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC),
        service_id="ketamine-prior-auth",
        endpoint="hook",
        hook="order-sign",
        hook_instance=str(uuid.uuid4()),
        status_code=200,
        latency_ms=182.25,
        outcome="evaluated",
        decisions=[{"policy": "mgbhp-031", "outcome": "criteria-met", "orders": ["MedicationRequest/1"], "phase": 1}],
        cards=[{"uuid": "card-1", "summary": "Prior authorization needed", "suggestions": [{"uuid": "s-1"}]}],
        system_actions=[{"type": "update", "description": "coverage information", "resource": {"id": "1"}}],
        mapping_version="2025.03.1",
        issuer="https://ehr.example.org",
        patient_id=PATIENT_ID,
        user_id="Practitioner/77",
        fhir_server="https://ehr.example.org/fhir",
        error=None,
    )
    return replace(record, **changes)


def make_feedback(**changes: Any) -> FeedbackItem:
    item = FeedbackItem(
        card_uuid="8f1d6c2e-6f0a-4b6e-9d8e-0c5e3f1a2b3c",
        outcome="accepted",
        outcome_timestamp=datetime(1985, 4, 12, 23, 20, 50, 520000, tzinfo=UTC),
        accepted_suggestions=("2e6b3a44-0d5c-4d3e-8a5f-7c1e9b0d4f21",),
        override_reason=None,
        user_comment=None,
    )
    return replace(item, **changes)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A uniquely named schema, dropped afterwards, so runs and tests never see each other's rows."""
    schema = f"audit_test_{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Factory for stores on one database of the parametrized backend; all are closed at the end."""
    if request.param == "sqlite":
        url, schema = f"sqlite:///{tmp_path}/audit/audit.db", None
    else:
        url, schema = request.getfixturevalue("postgres_url"), request.getfixturevalue("postgres_schema")
    stores: list[AuditStore] = []

    def factory(**options: Any) -> AuditStore:
        store = AuditStore(url, schema=schema, **options)
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.close()


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Path:
    return tmp_path / "data" / "audit.db"


# --------------------------------------------------------------------------------------------------------------
# Recording calls


def test_dialect_names_the_backend(make_store: StoreFactory, request: pytest.FixtureRequest) -> None:
    store = make_store()
    assert store.dialect == request.node.callspec.params["make_store"]


def test_call_round_trips_every_field(make_store: StoreFactory) -> None:
    store = make_store(asynchronous=False)
    record = make_record(status_code=422, outcome="refused", error="invalid request: context.draftOrders missing")
    store.record_call(record)

    [row] = store.recent_calls()
    assert isinstance(row.pop("id"), int)
    expected = {name: getattr(record, name) for name in HookCallRecord.__dataclass_fields__}
    assert row == expected
    assert row["received_at"].tzinfo is not None and row["received_at"].utcoffset() == timedelta(0)


def test_times_are_stored_as_utc(make_store: StoreFactory) -> None:
    store = make_store(asynchronous=False)
    plus_two = timezone(timedelta(hours=2))
    store.record_call(make_record(hook_instance="aware", received_at=datetime(2025, 3, 1, 14, 0, tzinfo=plus_two)))
    store.record_call(make_record(hook_instance="naive", received_at=datetime(2025, 3, 1, 11, 0)))

    times = {row["hook_instance"]: row["received_at"] for row in store.recent_calls()}
    assert times["aware"] == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert times["naive"] == datetime(2025, 3, 1, 11, 0, tzinfo=UTC)


def test_recent_calls_are_newest_first_and_limited(make_store: StoreFactory) -> None:
    store = make_store(asynchronous=False)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    for minute in (3, 1, 4, 2):
        store.record_call(make_record(hook_instance=f"m{minute}", received_at=start + timedelta(minutes=minute)))

    assert [row["hook_instance"] for row in store.recent_calls(limit=3)] == ["m4", "m3", "m2"]


def test_async_write_is_visible_after_flush(make_store: StoreFactory) -> None:
    store = make_store()
    instances = [f"call-{number}" for number in range(200)]
    for instance in instances:
        store.record_call(make_record(hook_instance=instance))
    store.flush(timeout=10)

    assert sorted(row["hook_instance"] for row in store.recent_calls(limit=1000)) == sorted(instances)
    assert store.failed_count == 0
    assert store.dropped_count == 0


def test_record_call_never_waits_for_the_database(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 calls are recorded while the writer is stuck in a transaction: the request path only enqueues.
    (No timing: the enqueues run in a thread that must finish while the writer is still held.)"""
    store = make_store()
    write_for_real = store._write_calls
    writer_busy, release_writer, enqueued = threading.Event(), threading.Event(), threading.Event()

    def stuck_write(records: list[HookCallRecord]) -> None:
        writer_busy.set()
        release_writer.wait(60)
        write_for_real(records)

    monkeypatch.setattr(store, "_write_calls", stuck_write)
    store.record_call(make_record(hook_instance="first"))
    assert writer_busy.wait(10), "the writer never started its transaction"

    def enqueue() -> None:
        for number in range(1000):
            store.record_call(make_record(hook_instance=f"fast-{number}"))
        enqueued.set()

    threading.Thread(target=enqueue, daemon=True).start()
    finished_while_stuck = enqueued.wait(30)
    release_writer.set()
    assert finished_while_stuck, "record_call waited for the stuck database transaction"
    store.flush(timeout=30)
    assert len(store.recent_calls(limit=2000)) == 1001


def test_full_queue_drops_and_counts_instead_of_blocking(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(queue_size=5)
    write_for_real = store._write_calls
    writer_busy, release_writer = threading.Event(), threading.Event()

    def stuck_write(records: list[HookCallRecord]) -> None:
        writer_busy.set()
        release_writer.wait(10)
        write_for_real(records)

    monkeypatch.setattr(store, "_write_calls", stuck_write)
    store.record_call(make_record(hook_instance="in-flight"))
    assert writer_busy.wait(5), "the writer never picked up the first record"

    caplog.set_level(logging.WARNING, logger="cds_service.audit")
    started = time.perf_counter()
    for number in range(10):  # 5 fit into the queue, 5 do not
        store.record_call(make_record(hook_instance=f"queued-{number}"))
    assert time.perf_counter() - started < 0.5
    assert store.dropped_count == 5
    assert "dropped" in caplog.text
    assert PATIENT_ID not in caplog.text

    release_writer.set()
    store.flush(timeout=10)
    assert len(store.recent_calls(limit=100)) == 6


def test_bad_record_does_not_kill_the_writer(make_store: StoreFactory, caplog: pytest.LogCaptureFixture) -> None:
    store = make_store()
    caplog.set_level(logging.ERROR, logger="cds_service.audit")
    store.record_call(make_record(hook_instance="unserialisable", cards=[{"when": object()}]))
    store.record_call(make_record(hook_instance="good-same-batch"))
    store.flush()
    store.record_call(make_record(hook_instance="good-later"))
    store.flush()

    assert {row["hook_instance"] for row in store.recent_calls()} == {"good-same-batch", "good-later"}
    assert store.failed_count == 1
    assert "could not be written" in caplog.text
    assert PATIENT_ID not in caplog.text


def test_transient_database_error_is_retried(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store()
    monkeypatch.setattr(audit, "_TRANSIENT_RETRY_DELAYS_S", (0.01, 0.01))
    insert_for_real = store._insert_calls
    attempts: list[int] = []

    def flaky_insert(rows: list[dict[str, Any]]) -> None:
        attempts.append(len(rows))
        if len(attempts) == 1:
            raise sa_exc.OperationalError("INSERT", {}, Exception("database is locked"))
        insert_for_real(rows)

    monkeypatch.setattr(store, "_insert_calls", flaky_insert)
    store.record_call(make_record(hook_instance="retried"))
    store.flush()

    assert len(attempts) == 2
    assert [row["hook_instance"] for row in store.recent_calls()] == ["retried"]
    assert store.failed_count == 0


def test_tokens_are_scrubbed_from_stored_payloads(make_store: StoreFactory) -> None:
    store = make_store()
    secret = "eyJhbGciOiJSUzM4NCJ9.secret-token"
    cards = [{"uuid": "c1", "links": [{"appContext": {"access_token": secret, "keep": 1}}]}]
    system_actions = [{"type": "update", "resource": {"Access_Token": secret, "id": "1"}}]
    decisions = [{"policy": "p", "fhirAuthorization": {"access_token": secret, "scope": "x"}}]
    store.record_call(
        make_record(hook_instance="scrub", cards=cards, system_actions=system_actions, decisions=decisions)
    )
    store.flush()

    [row] = store.recent_calls()
    assert secret not in json.dumps([row["cards"], row["system_actions"], row["decisions"]])
    assert row["cards"] == [{"uuid": "c1", "links": [{"appContext": {"keep": 1}}]}]
    assert row["system_actions"] == [{"type": "update", "resource": {"id": "1"}}]
    assert row["decisions"] == [{"policy": "p"}]
    assert cards[0]["links"][0]["appContext"]["access_token"] == secret  # the caller's data is left alone


def test_close_is_idempotent_and_later_records_are_dropped(make_store: StoreFactory) -> None:
    store = make_store()
    store.record_call(make_record(hook_instance="before-close"))
    store.close()
    store.close()
    store.record_call(make_record(hook_instance="after-close"))  # must not raise

    assert store.dropped_count == 1
    assert [row["hook_instance"] for row in store.recent_calls()] == ["before-close"]


# --------------------------------------------------------------------------------------------------------------
# Feedback


def test_same_feedback_twice_is_stored_once(make_store: StoreFactory) -> None:
    store = make_store()
    item = make_feedback()

    assert store.record_feedback("ketamine-prior-auth", [item], issuer="https://ehr.example.org") == 1
    assert store.record_feedback("ketamine-prior-auth", [item], issuer="https://ehr.example.org") == 0
    assert store.record_feedback("ketamine-prior-auth", [item, item], issuer=None) == 0

    [row] = store.feedback_for(item.card_uuid)
    assert row["outcome"] == "accepted"
    assert row["accepted_suggestions"] == list(item.accepted_suggestions)
    assert row["outcome_timestamp"] == item.outcome_timestamp
    assert row["issuer"] == "https://ehr.example.org"


def test_feedback_differing_in_timestamp_or_outcome_is_a_new_row(make_store: StoreFactory) -> None:
    store = make_store()
    first = make_feedback()
    later = replace(first, outcome_timestamp=first.outcome_timestamp + timedelta(seconds=1))
    overridden = replace(
        first,
        outcome="overridden",
        accepted_suggestions=(),
        override_reason={"code": "patient-refused", "system": None},
        user_comment="discussed with patient",
    )

    assert store.record_feedback("ketamine-prior-auth", [first, later, overridden], issuer=None) == 3
    rows = store.feedback_for(first.card_uuid)
    assert sorted((row["outcome"], row["outcome_timestamp"]) for row in rows) == [
        ("accepted", first.outcome_timestamp),
        ("accepted", later.outcome_timestamp),
        ("overridden", first.outcome_timestamp),
    ]
    stored_override = next(row for row in rows if row["outcome"] == "overridden")
    assert stored_override["override_reason"] == {"code": "patient-refused", "system": None}
    assert stored_override["user_comment"] == "discussed with patient"


def test_same_instant_in_another_time_zone_is_the_same_feedback(make_store: StoreFactory) -> None:
    store = make_store()
    utc_item = make_feedback()
    offset_item = replace(
        utc_item, outcome_timestamp=utc_item.outcome_timestamp.astimezone(timezone(timedelta(hours=-5)))
    )

    assert store.record_feedback("ketamine-prior-auth", [utc_item], issuer=None) == 1
    assert store.record_feedback("ketamine-prior-auth", [offset_item], issuer=None) == 0


def test_feedback_is_kept_per_service(make_store: StoreFactory) -> None:
    store = make_store()
    item = make_feedback()
    assert store.record_feedback("service-a", [item], issuer=None) == 1
    assert store.record_feedback("service-b", [item], issuer=None) == 1
    assert {row["service_id"] for row in store.feedback_for(item.card_uuid)} == {"service-a", "service-b"}


def test_empty_feedback_list_stores_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    assert store.record_feedback("ketamine-prior-auth", [], issuer=None) == 0


# --------------------------------------------------------------------------------------------------------------
# SQLite specifics


def test_sqlite_creates_the_directory_and_uses_wal(sqlite_file: Path) -> None:
    with AuditStore(f"sqlite:///{sqlite_file}") as store:
        store.record_feedback("svc", [make_feedback()], issuer=None)
    assert sqlite_file.exists()
    with sqlite3.connect(sqlite_file) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_relative_sqlite_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with AuditStore("sqlite:///relative/dir/audit.db", asynchronous=False) as store:
        store.record_call(make_record())
    assert (tmp_path / "relative" / "dir" / "audit.db").is_file()


def test_in_memory_sqlite_works_across_threads() -> None:
    with AuditStore("sqlite://") as store:
        store.record_call(make_record(hook_instance="memory"))
        store.flush()
        assert store.record_feedback("svc", [make_feedback()], issuer=None) == 1
        assert [row["hook_instance"] for row in store.recent_calls()] == ["memory"]


def test_two_stores_on_one_sqlite_file_write_concurrently(sqlite_file: Path) -> None:
    url = f"sqlite:///{sqlite_file}"
    background, synchronous = AuditStore(url), AuditStore(url, asynchronous=False)
    errors: list[BaseException] = []
    base_time = datetime(2025, 1, 1, tzinfo=UTC)

    def worker(thread_number: int, store: AuditStore) -> None:
        try:
            for number in range(40):
                store.record_call(make_record(hook_instance=f"t{thread_number}-{number}"))
                item = make_feedback(
                    card_uuid=f"card-{thread_number}", outcome_timestamp=base_time + timedelta(seconds=number)
                )
                store.record_feedback("svc", [item], issuer=None)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(number, background if number % 2 else synchronous)) for number in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    background.flush(timeout=30)

    try:
        assert errors == []
        assert background.failed_count == 0 and synchronous.failed_count == 0
        assert len(synchronous.recent_calls(limit=1000)) == 8 * 40
        for number in range(8):
            assert len(background.feedback_for(f"card-{number}")) == 40
    finally:
        background.close()
        synchronous.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_its_own_writer(sqlite_file: Path) -> None:
    """gunicorn --preload forks after the store exists: the child must still be able to audit."""
    store = AuditStore(f"sqlite:///{sqlite_file}")
    store.record_call(make_record(hook_instance="parent"))
    store.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child process
        try:
            store.record_call(make_record(hook_instance="child"))
            store.flush()
            os._exit(0 if store.failed_count == 0 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert {row["hook_instance"] for row in store.recent_calls()} == {"parent", "child"}
    finally:
        store.close()


# --------------------------------------------------------------------------------------------------------------
# URLs and errors


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://postgres@127.0.0.1:5432/test", "postgresql+psycopg"),
        ("postgres://postgres@db.internal/audit", "postgresql+psycopg"),
        ("postgresql+psycopg://postgres@db.internal/audit", "postgresql+psycopg"),
        ("sqlite:///relative.db", "sqlite"),
        ("sqlite:////absolute/path.db", "sqlite"),
    ],
)
def test_database_urls_map_to_our_drivers(raw: str, expected: str) -> None:
    assert normalise_database_url(raw).drivername == expected


def test_sqlite_url_keeps_relative_and_absolute_paths() -> None:
    assert normalise_database_url("sqlite:///relative.db").database == "relative.db"
    assert normalise_database_url("sqlite:////absolute/path.db").database == "/absolute/path.db"


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql://auditor:s3cret-pw@127.0.0.1:1/audit",  # nothing listens on port 1
        "postgresql://auditor:s3cret-pw@127.0.0.1:notaport/audit",
        "postgresql://auditor:s3cret@pw@127.0.0.1:5432/audit",  # unencoded '@' in the password
        "postgresql://auditor@127.0.0.1:1/audit?password=s3cret-pw",
        "mysql://auditor:s3cret-pw@db.internal/audit",
        "postgresql+psycopg2://auditor:s3cret-pw@db.internal/audit",
        "not a url at all s3cret-pw",
    ],
)
def test_bad_url_raises_without_the_password(raw: str) -> None:
    with pytest.raises(AuditStoreError) as raised:
        AuditStore(raw)
    message = str(raised.value)
    assert "s3cret" not in message
    assert "pw@" not in message
    # A logged traceback must not leak it through a chained driver/SQLAlchemy error either.
    assert "s3cret" not in "".join(traceback.format_exception(raised.value))


def test_schema_is_only_for_postgresql(tmp_path: Path) -> None:
    with pytest.raises(AuditStoreError, match="PostgreSQL"):
        AuditStore(f"sqlite:///{tmp_path}/a.db", schema="audit")


def test_unwritable_sqlite_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(AuditStoreError, match="directory"):
        AuditStore(f"sqlite:///{blocker}/sub/audit.db")


@pytest.mark.postgres
def test_postgresql_schema_is_created_and_used(postgres_url: str, postgres_schema: str) -> None:
    with AuditStore(postgres_url, schema=postgres_schema, asynchronous=False) as store:
        store.record_call(make_record(hook_instance="in-schema"))
    with psycopg.connect(postgres_url) as connection:
        count = connection.execute(f'SELECT count(*) FROM "{postgres_schema}".hook_calls').fetchone()
    assert count == (1,)


def test_scrub_secrets_is_recursive_and_case_insensitive() -> None:
    payload = {"a": [{"ACCESS_TOKEN": "x", "b": ({"refresh_token": "y", "c": 1},)}], "id_token": "z"}
    assert audit.scrub_secrets(payload) == {"a": [{"b": [{"c": 1}]}]}


def test_queue_size_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="queue_size"):
        AuditStore(f"sqlite:///{tmp_path}/a.db", queue_size=0)


# --------------------------------------------------------------------------------------------------------------
# JWT ids shared across workers


def test_claim_jti_is_first_come_across_stores(make_store: StoreFactory) -> None:
    """Two stores on one database stand for two gunicorn workers: a jti used by one is a replay for the other."""
    worker_a, worker_b = make_store(), make_store()
    forget_after = time.time() + 300
    assert worker_a.claim_jti("https://ehr.test", "jti-1", forget_after) is True
    assert worker_b.claim_jti("https://ehr.test", "jti-1", forget_after) is False
    assert worker_a.claim_jti("https://ehr.test", "jti-1", forget_after) is False
    assert worker_b.claim_jti("https://other-issuer.test", "jti-1", forget_after) is True  # per issuer
    assert worker_b.claim_jti("https://ehr.test", "jti-2", forget_after) is True


class _RecordingCursor:
    def __init__(self, cursor: Any, statements: list[str]) -> None:
        self._cursor, self._statements = cursor, statements

    def execute(self, sql: str, *args: Any) -> Any:
        self._statements.append(sql)
        return self._cursor.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _RecordingConnection:
    def __init__(self, connection: Any, statements: list[str]) -> None:
        self._connection, self._statements = connection, statements

    def cursor(self) -> _RecordingCursor:
        return _RecordingCursor(self._connection.cursor(), self._statements)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def _recording_raw_connection(original: Any, statements: list[str]) -> Any:
    return lambda: _RecordingConnection(original(), statements)


def test_claim_jti_is_exactly_once_under_a_race_of_workers(make_store: StoreFactory) -> None:
    """Eight stores (as eight gunicorn workers, own connections) claim the same ids at the same instant: each id
    is claimed exactly once — also on PostgreSQL, where the claim commits with synchronous_commit=off."""
    workers = [make_store() for _ in range(8)]
    forget_after = time.time() + 300
    statements: list[str] = []
    for store in workers:  # the claim runs on the pool's DBAPI connection: record what its cursors execute
        store._engine.raw_connection = _recording_raw_connection(store._engine.raw_connection, statements)
    jtis = [f"race-{n}-{uuid.uuid4().hex}" for n in range(20)]
    results: dict[str, list[bool]] = {jti: [] for jti in jtis}
    lock = threading.Lock()
    barrier = threading.Barrier(len(workers))

    def claim(store: AuditStore) -> None:
        for jti in jtis:
            barrier.wait()
            won = store.claim_jti("https://ehr.test", jti, forget_after)
            with lock:
                results[jti].append(won)

    threads = [threading.Thread(target=claim, args=(store,)) for store in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(sorted(wins) == [False] * (len(workers) - 1) + [True] for wins in results.values()), results
    if workers[0].dialect == "postgresql":
        assert sum("synchronous_commit = off" in s for s in statements) == len(workers) * len(jtis)


def test_claim_jti_purges_expired_ids(make_store: StoreFactory) -> None:
    store = make_store()
    store.claim_jti("https://ehr.test", "old", time.time() - 10)
    store._claims_since_purge = 499  # the next claim triggers the purge
    store.claim_jti("https://ehr.test", "new", time.time() + 300)
    assert store.claim_jti("https://ehr.test", "old", time.time() + 300) is True  # forgotten, so claimable


# NUL and lone surrogates: PostgreSQL text and JSONB refuse NUL, JSONB refuses lone surrogate escapes, and
# neither driver can encode a lone surrogate as UTF-8. The row is stored with U+FFFD instead, never dropped.

NASTY = "a\x00b\ud800c\udfff"
CLEAN = "a\ufffdb\ufffdc\ufffd"


def test_call_records_with_nul_and_lone_surrogates_are_stored_sanitised(make_store: StoreFactory) -> None:
    store = make_store(asynchronous=False)
    store.record_call(
        make_record(
            hook_instance=NASTY,
            error=NASTY,
            patient_id=NASTY,
            cards=[{"summary": NASTY, NASTY: [NASTY, {"k": NASTY}]}],
            decisions=[{"policy": NASTY}],
        )
    )

    assert store.failed_count == 0 and store.written_count == 1
    [row] = store.recent_calls()
    assert row["hook_instance"] == row["error"] == row["patient_id"] == CLEAN
    assert row["cards"] == [{"summary": CLEAN, CLEAN: [CLEAN, {"k": CLEAN}]}]
    assert row["decisions"] == [{"policy": CLEAN}]


def test_feedback_with_nul_and_lone_surrogates_is_stored_once_sanitised(make_store: StoreFactory) -> None:
    store = make_store()
    item = make_feedback(
        outcome="overridden",
        accepted_suggestions=(),
        override_reason={"code": NASTY, "system": None},
        user_comment=NASTY,
    )

    assert store.record_feedback("ketamine-prior-auth", [item], issuer=NASTY) == 1
    assert store.record_feedback("ketamine-prior-auth", [item], issuer=NASTY) == 0
    [row] = store.feedback_for(item.card_uuid)
    assert row["user_comment"] == row["issuer"] == CLEAN
    assert row["override_reason"] == {"code": CLEAN, "system": None}


def test_sanitise_for_store_leaves_clean_values_alone() -> None:
    value = {"a": ["x", 1, 2.5, None, True, {"é": "😀"}]}
    assert audit.sanitise_for_store(value) == value
    assert audit.sanitise_for_store({"n": float("nan")}) == {"n": None}


_payload_keys = st.sampled_from(["a", "access_token", "Authorization", "b\x00", "\ud800k", "client_secret", "x"])
_payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(alphabet=st.sampled_from(["a", "\x00", "\ud800", "é", "\udfff"]), max_size=4),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children)
        | st.dictionaries(_payload_keys | st.integers(0, 3), children, max_size=3)
    ),
    max_leaves=15,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(payload=_payloads)
def test_one_walk_scrubs_and_sanitises_as_the_two_did(payload: Any) -> None:
    expected = audit.sanitise_for_store(audit.scrub_secrets(payload))
    assert audit._scrubbed_walk(payload) == expected
    assert audit._json_text(audit._scrubbed_for_store(payload)) == audit._json_text(expected)  # fast path: same text
    assert json.loads(audit._json_text(expected)) == json.loads(json.dumps(expected))


def test_json_columns_refuse_what_the_stdlib_refuses() -> None:
    with pytest.raises(TypeError):
        audit._json_text({"when": datetime.now(UTC)})
    assert json.loads(audit._json_text({"big": 10**30, 1: "x"})) == {"big": 10**30, "1": "x"}


_payload_text = st.text(alphabet=st.sampled_from(["a", "K", "\u212a", "_", "\x00", "\ud800", "\u00e9", '"', "\\", ":"]))
_secretish_keys = st.sampled_from(
    ["access_token", "ACCESS_TOKEN", "id_to\u212aen", "Refresh_Token", "fhirAuthorization"]  # U+212A: Kelvin sign
)
_store_payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _payload_text,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(_payload_text | _secretish_keys | st.integers(0, 3), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(_store_payloads)
def test_a_payload_stored_as_is_is_what_the_walk_would_store(payload: Any) -> None:
    """The fast path (`_storable_as_is`) never keeps a secret key, a NUL, a lone surrogate or a NaN the walk would
    remove or replace: whenever it says "as is", the stored JSON text is the walk's."""
    walked = audit._scrubbed_walk(payload)
    if audit._storable_as_is(payload):
        assert audit._json_text(payload) == audit._json_text(walked)
    assert audit._json_text(audit._scrubbed_for_store(payload)) == audit._json_text(walked)


def test_typical_cards_take_the_fast_path_and_secrets_do_not() -> None:
    cards = [{"summary": "Likely to be authorized – MGB 031 ≥ 3 criteria", "indicator": "info", "detail": "x" * 500}]
    assert audit._storable_as_is(cards) and audit._scrubbed_for_store(cards) is cards
    leaked = [{"summary": "s", "links": [{"Access_Token": "abc"}]}]
    assert not audit._storable_as_is(leaked)
    assert audit._scrubbed_for_store(leaked) == [{"summary": "s", "links": [{}]}]
