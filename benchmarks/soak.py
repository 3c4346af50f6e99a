"""Soak and durability: the service under gunicorn (2 workers) on loopback, mixed requests, bounded in time.

Prints its figures (not a test; `tests/reliability/test_soak.py` runs a few-second version and asserts the
invariants, not timings):

1. soak — `--seconds` (≤ 60) of load from `--concurrency` clients: the hot path (non-ketamine order),
   ketamine orders from prefetch and from the FHIR server, invalid bodies (422), unauthenticated calls (401),
   feedback (each item sent twice). Figures: answers by status, errors (5xx, timeouts, refused connections),
   audit rows against answered calls, feedback rows against distinct items, worker RSS at warm-up and at the
   end. Audit store: PostgreSQL in a throw-away schema (`--database`), or SQLite.
2. kill — the same load against an SQLite store, the whole gunicorn process group SIGKILLed mid-load: the
   file must pass `PRAGMA integrity_check` and hold every feedback item that was acknowledged as stored.

    python benchmarks/soak.py [--seconds 60] [--concurrency 8] [--database postgresql://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sandbox.demo import write_sandbox_keys  # noqa: E402
from sandbox.ehr import DEFAULT_ISSUER  # noqa: E402
from sandbox.signing import SandboxKey, sign_cds_jwt  # noqa: E402
from tests.harness import free_port  # noqa: E402
from tests.reliability import corpus  # noqa: E402
from tests.reliability.fault_server import FaultServer  # noqa: E402

HOOK = "/cds-services/ketamine-prior-auth"
FEEDBACK = HOOK + "/feedback"
KINDS = ("hot", "prefetch", "fallback", "invalid", "unauthenticated", "feedback")
EXPECTED = {"hot": 200, "prefetch": 200, "fallback": 200, "invalid": 422, "unauthenticated": 401, "feedback": 200}


@dataclass
class SoakResult:
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)  # kind: status that was not the expected one
    errors: Counter[str] = field(default_factory=Counter)  # 5xx, timeouts, connection errors
    answered: Counter[str] = field(default_factory=Counter)  # "hook" / "feedback": calls that got an HTTP answer
    feedback_acknowledged: set[str] = field(default_factory=set)  # card uuids answered {"stored": 1}
    feedback_items: set[str] = field(default_factory=set)
    rss_start_kb: dict[int, int] = field(default_factory=dict)
    rss_end_kb: dict[int, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    feedback_rows: int = 0
    integrity: str = ""
    missing_feedback: int = 0  # acknowledged as stored, not in the database after a SIGKILL

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def rss_growth(self) -> float:
        growth = [
            (self.rss_end_kb[p] - self.rss_start_kb[p]) / self.rss_start_kb[p]
            for p in self.rss_end_kb
            if p in self.rss_start_kb
        ]
        return max(growth) if growth else 0.0

    def report(self, title: str) -> str:
        lines = [
            f"{title}: {self.total} answers in {self.seconds:.1f} s ({self.total / max(self.seconds, 0.001):.0f}/s)",
            "  by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items())),
            "  by kind: " + ", ".join(f"{k}: {n}" for k, n in sorted(self.by_kind.items())),
            f"  errors: {sum(self.errors.values())} {dict(self.errors) or ''}; unexpected statuses: "
            f"{sum(self.unexpected.values())} {dict(self.unexpected) or ''}",
            f"  audit rows: hook {self.rows.get('hook', '?')} for {self.answered['hook']} answered, feedback "
            f"{self.rows.get('feedback', '?')} for {self.answered['feedback']} answered",
            f"  feedback: {self.feedback_rows} rows for {len(self.feedback_items)} distinct items "
            f"(each sent twice), {len(self.feedback_acknowledged)} acknowledged as new",
        ]
        if self.rss_end_kb:
            lines.append(
                "  worker RSS: "
                + ", ".join(
                    f"pid {p}: {self.rss_start_kb.get(p, 0) // 1024} -> {self.rss_end_kb[p] // 1024} MiB"
                    for p in sorted(self.rss_end_kb)
                )
                + f" (max growth {self.rss_growth() * 100:.1f} %)"
            )
        if self.integrity:
            lines.append(
                f"  PRAGMA integrity_check: {self.integrity}; acknowledged feedback missing: {self.missing_feedback}"
                " (connection errors above: calls in flight when the process group was killed)"
            )
        return "\n".join(lines)


# -- the service under gunicorn -----------------------------------------------------------------------------


class Gunicorn:
    """`gunicorn cds_service.wsgi:app` (the README's production recipe), ready once every worker logged it."""

    def __init__(self, workdir: Path, database: str, fhir_servers: list[str], workers: int = 2) -> None:
        self.port = free_port()
        self.workers = workers
        self.key = write_sandbox_keys(workdir, fhir_servers)
        env = {
            **os.environ,
            "KETAMINE_CDS_TRUSTED_ISSUERS": str(workdir / "trusted-issuers.json"),
            "KETAMINE_CDS_PUBLIC_BASE_URL": self.base_url,
            "KETAMINE_CDS_DATABASE": database,
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),  # inside workdir: a SIGKILLed run leaves nothing
        }
        gunicorn = Path(sys.executable).with_name("gunicorn")
        command = [str(gunicorn), "-c", "python:cds_service.gunicorn_conf", "--bind", f"127.0.0.1:{self.port}"]
        command += ["--workers", str(workers), "--threads", "4", "--timeout", "60", "cds_service.wsgi:app"]
        self.process = subprocess.Popen(
            command, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum("ketamine-cds ready" in line for line in self.lines) < self.workers:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not become ready:\n" + "".join(self.lines)[-3000:])
                self._changed.wait(0.5)

    def worker_pids(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            return [int(p) for p in path.read_text().split()]
        return []

    def stop(self) -> None:
        """Graceful: workers finish their requests and flush the audit queue."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole process group: master and workers die mid-request."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- the load -----------------------------------------------------------------------------------------------


class Load:
    """Clients that call the service in a fixed rotation of request kinds until told to stop."""

    def __init__(self, service: Gunicorn, key: SandboxKey, fhir_base: str) -> None:
        self.service = service
        self.key = key
        self.fhir_base = fhir_base
        self.result = SoakResult()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.prefetch = corpus.full_prefetch()
        self._feedback_repeat: dict[int, str] = {}

    def token(self, path: str) -> str:
        return sign_cds_jwt(self.key, iss=DEFAULT_ISSUER, aud=self.service.base_url + path)

    def request(self, kind: str, worker: int) -> tuple[str, Any, dict[str, str]]:
        """(path, JSON body, headers) of one call of this kind."""
        auth = {"Authorization": f"Bearer {self.token(HOOK)}"}
        if kind == "hot":
            return HOOK, corpus.hook_request(draft_orders=[corpus.non_ketamine_order()]), auth
        if kind == "prefetch":
            return HOOK, corpus.hook_request(prefetch=self.prefetch), auth
        if kind == "fallback":
            return HOOK, corpus.hook_request(fhir_server=self.fhir_base), auth
        if kind == "invalid":
            body = corpus.hook_request(draft_orders=[corpus.non_ketamine_order()])
            del body["context"]["patientId"]
            return HOOK, body, auth
        if kind == "unauthenticated":
            return HOOK, corpus.hook_request(), {}
        # feedback: every item twice (the second answer must say it was already stored)
        card = self._feedback_repeat.pop(worker, None)
        if card is None:
            card = str(uuid.uuid4())
            self._feedback_repeat[worker] = card
        body = {"feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-01-15T17:00:00Z"}]}
        return FEEDBACK, body, {"Authorization": f"Bearer {self.token(FEEDBACK)}"}

    def client(self, worker: int) -> None:
        session = requests.Session()
        kinds = itertools.cycle(KINDS[worker % len(KINDS) :] + KINDS[: worker % len(KINDS)])
        while not self.stop.is_set():
            self.one(session, next(kinds), worker)

    def warm_up(self, calls: int = 12) -> None:
        """Evaluated calls, in parallel, before anything is measured: each worker loads what it loads lazily on
        its first evaluation (the reading layer's text models) — counted and audited like every other call."""
        threads = [
            threading.Thread(target=self.one, args=(requests.Session(), kind, 100 + n), daemon=True)
            for n, kind in enumerate(["prefetch", "fallback"] * (calls // 2))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    def one(self, session: requests.Session, kind: str, worker: int) -> None:
        path, body, headers = self.request(kind, worker)
        try:
            response = session.post(self.service.base_url + path, json=body, headers=headers, timeout=60)
        except requests.RequestException as exc:
            with self.lock:
                self.result.errors[type(exc).__name__] += 1
            return
        with self.lock:
            result = self.result
            result.statuses[response.status_code] += 1
            result.by_kind[kind] += 1
            result.answered["feedback" if path == FEEDBACK else "hook"] += 1
            if response.status_code >= 500:
                result.errors[f"HTTP {response.status_code}"] += 1
            elif response.status_code != EXPECTED[kind]:
                result.unexpected[f"{kind}: {response.status_code}"] += 1
            if kind == "feedback":
                card = body["feedback"][0]["card"]
                result.feedback_items.add(card)
                if response.status_code == 200 and response.json().get("stored") == 1:
                    result.feedback_acknowledged.add(card)

    def run(self, seconds: float, concurrency: int, on_warm: Any = None) -> SoakResult:
        self.warm_up()
        threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(concurrency)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        if on_warm is not None:
            time.sleep(min(5.0, seconds / 5))
            on_warm()
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        self.stop.set()
        for thread in threads:
            thread.join(timeout=60)
        self.result.seconds = time.monotonic() - started
        return self.result


# -- counting rows ------------------------------------------------------------------------------------------


def count_rows(database: str, schema: str | None) -> tuple[dict[str, int], int]:
    """(hook_calls rows by endpoint, feedback rows)."""
    if database.startswith("sqlite:///"):
        with sqlite3.connect(database.removeprefix("sqlite:///")) as connection:
            rows = dict(connection.execute("SELECT endpoint, count(*) FROM hook_calls GROUP BY endpoint").fetchall())
            feedback = connection.execute("SELECT count(*) FROM feedback").fetchone()[0]
        return rows, feedback
    import psycopg

    with psycopg.connect(database.split("?")[0]) as connection:
        rows = dict(
            connection.execute(f'SELECT endpoint, count(*) FROM "{schema}".hook_calls GROUP BY endpoint').fetchall()
        )
        feedback = connection.execute(f'SELECT count(*) FROM "{schema}".feedback').fetchone()[0]
    return rows, feedback


def postgres_schema_url(url: str) -> tuple[str, str]:
    """A fresh schema on the server and a URL whose connections use it (libpq `options=-csearch_path=`)."""
    import psycopg

    schema = f"soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}", schema


def drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# -- the two runs ---------------------------------------------------------------------------------------------


def soak(workdir: Path, *, seconds: float, concurrency: int, database: str | None) -> SoakResult:
    """Load for `seconds`, graceful stop, then count: answers, rows, feedback, RSS."""
    fhir = FaultServer(corpus.resources()).start()
    schema = None
    url = database or f"sqlite:///{workdir / 'audit.db'}"
    if database and database.startswith("postgres"):
        url, schema = postgres_schema_url(database)
    service = Gunicorn(workdir, url, [fhir.base("healthy")])
    try:
        service.wait_ready()
        load = Load(service, service.key, fhir.base("healthy"))

        def sample_start() -> None:
            load.result.rss_start_kb = {pid: rss_kb(pid) for pid in service.worker_pids()}

        result = load.run(seconds, concurrency, on_warm=sample_start)
        result.rss_end_kb = {pid: rss_kb(pid) for pid in service.worker_pids()}
        service.stop()
        result.rows, result.feedback_rows = count_rows(url, schema)
        return result
    finally:
        service.stop()
        fhir.stop()
        if schema and database:
            drop_schema(database, schema)


def kill_during_load(workdir: Path, *, seconds: float, concurrency: int) -> SoakResult:
    """Load on SQLite, SIGKILL mid-load, then check the file: integrity and every acknowledged feedback item."""
    fhir = FaultServer(corpus.resources()).start()
    database = f"sqlite:///{workdir / 'killed.db'}"
    service = Gunicorn(workdir, database, [fhir.base("healthy")])
    try:
        service.wait_ready()
        load = Load(service, service.key, fhir.base("healthy"))
        load.warm_up()
        threads = [threading.Thread(target=load.client, args=(n,), daemon=True) for n in range(concurrency)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        service.kill()  # mid-load: requests in flight, audit rows queued, transactions open
        load.stop.set()
        for thread in threads:
            thread.join(timeout=60)
        result = load.result
        result.seconds = time.monotonic() - started
        path = workdir / "killed.db"
        with sqlite3.connect(path) as connection:
            result.integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
            stored = {row[0] for row in connection.execute("SELECT card_uuid FROM feedback")}
        result.rows, result.feedback_rows = count_rows(database, None)
        result.missing_feedback = len(result.feedback_acknowledged - stored)
        return result
    finally:
        if service.process.poll() is None:
            service.kill()
        fhir.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="soak duration (at most 60)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--kill-seconds", type=float, default=8.0, help="load before the SIGKILL")
    args = parser.parse_args()
    seconds = min(args.seconds, 60.0)
    with tempfile.TemporaryDirectory(prefix="ketamine-soak-") as tmp:
        result = soak(Path(tmp) / "soak", seconds=seconds, concurrency=args.concurrency, database=args.database)
        print(result.report(f"soak ({args.concurrency} clients, gunicorn 2 workers, {args.database.split('://')[0]})"))
        killed = kill_during_load(Path(tmp) / "kill", seconds=args.kill_seconds, concurrency=args.concurrency)
        print(killed.report("SIGKILL during load (SQLite)"))
    ok = (
        not result.errors
        and result.rows.get("hook") == result.answered["hook"]
        and result.rows.get("feedback") == result.answered["feedback"]
        and result.feedback_rows == len(result.feedback_items)
        and result.rss_growth() < 0.10
        and killed.integrity == "ok"
        and killed.missing_feedback == 0
    )
    print("invariants hold" if ok else "INVARIANTS BROKEN")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
