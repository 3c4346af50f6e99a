"""Operations: JSON logs (one line per call), request ids, Prometheus metrics, liveness and readiness.

Why a module of its own: the request path (`app.py`, `hook.py`) only records *what happened* (the audit's
`PendingAudit`, the `CallTrace` stage timings); this module turns that into one PHI-free log line and metric
samples per call. Nothing here reads a body, a token, a patient id or a name: the log line is built from a fixed
list of fields (`CALL_LOG_FIELDS`), each of them a code, a count, a duration or an id this service or the
client's infrastructure chose (request id, `hookInstance`).

Metrics under gunicorn: `cds_service.serving` points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before any
worker starts, so `/metrics` answered by any worker sums every worker's counters and histograms (prometheus-client's
multiprocess mode). Without it (the app in one process, tests) the process's own registry is served.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, jsonify, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from pythonjsonlogger.json import JsonFormatter
from werkzeug.middleware.proxy_fix import ProxyFix

if TYPE_CHECKING:
    from cds_service.app import PendingAudit, ServiceState

log = logging.getLogger("ketamine_cds.call")

#: The only fields a call's log line may carry (a test checks that no patient id or token appears).
CALL_LOG_FIELDS = (
    "request_id",
    "trace_id",
    "hook_instance",
    "method",
    "endpoint",
    "status",
    "outcome",
    "decisions",
    "reason",
    "duration_ms",
    "stages_ms",
    "remote_addr",
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # what proxies and load balancers send; anything else: new id
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_PROBES = {"/healthz", "/readyz", "/metrics"}  # logged at DEBUG: orchestrators call them every few seconds
#: /readyz answers 503 once the audit queue holds more than this share of its capacity (the writer is behind).
AUDIT_QUEUE_READY_SHARE = 0.5

# -- logging -------------------------------------------------------------------------------------------------


def json_formatter() -> logging.Formatter:
    """Every log line one JSON object: time (UTC, ISO 8601), level, logger, message, plus any `extra` fields."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(process)d %(message)s",
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        timestamp="time",
    )


def logging_dict(level: str) -> dict[str, Any]:
    """`logging.config.dictConfig` for the service and gunicorn's own loggers (gunicorn's `logconfig_dict`)."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "cds_service.observability.json_formatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "alembic": {"level": "WARNING"},  # its per-start "Context impl" lines say nothing an operator needs
            # The service's own call line (`ketamine_cds.call`) is the access log: one line per call, with outcome.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
    }


def configure_logging(level: str) -> None:
    """JSON lines on stderr at `level` (KETAMINE_CDS_LOG_LEVEL), for `serve`, the WSGI module and tools."""
    import logging.config

    logging.config.dictConfig(logging_dict(level))


# -- metrics -------------------------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CALLS = Counter(
    "ketamine_cds_calls_total",
    "Calls answered, by endpoint, HTTP status and outcome",
    ["endpoint", "status", "outcome"],
)
DECISIONS = Counter("ketamine_cds_decisions_total", "Policy decisions returned, by outcome", ["outcome"])
CALL_SECONDS = Histogram(
    "ketamine_cds_call_duration_seconds", "Time to answer a call, by endpoint", ["endpoint"], buckets=_LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "ketamine_cds_stage_duration_seconds",
    "Time spent per stage of an order-sign call (parse, auth, fhir_fetch, evaluation, render)",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
FHIR_FAILURES = Counter(
    "ketamine_cds_fhir_fetch_failures_total",
    "FHIR queries not fully read from the EHR's server, by kind (timeout, http, error)",
    ["kind"],
)
AUDIT_QUEUE = Gauge(
    "ketamine_cds_audit_queue_depth",
    "Audit rows queued and not yet written (sum over live workers, as of each worker's last call)",
    multiprocess_mode="livesum",
)
AUDIT_PROBLEMS = Counter(
    "ketamine_cds_audit_failures_total",
    "Audit rows not written (failed: refused by the database; dropped: queue full) and feedback writes refused",
    ["kind"],
)


def _classify_fetch_failure(reason: str) -> str | None:
    """A query's PHI-free reason as a metric label; None for what is not a server failure (page limit, no server)."""
    if "timeout" in reason or "deadline" in reason:
        return "timeout"
    if "HTTP " in reason:
        return "http"
    markers = ("connection error", "read error", "invalid JSON", "response too large", "not a FHIR resource")
    if any(marker in reason for marker in (*markers, "OperationOutcome", "not a searchset Bundle")):
        return "error"
    return None


class _AuditCounters:
    """Turns the store's per-process totals into counter increments (the store counts; we only export)."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {"failed": 0, "dropped": 0, "feedback_failed": 0}

    def export(self, state: ServiceState) -> None:
        audit = state.audit
        now = {
            "failed": audit.failed_count + state.audit_failures,
            "dropped": audit.dropped_count,
            "feedback_failed": audit.feedback_failed_count,
        }
        for kind, total in now.items():
            if total > self.seen[kind]:
                AUDIT_PROBLEMS.labels(kind).inc(total - self.seen[kind])
                self.seen[kind] = total
        AUDIT_QUEUE.set(audit.queue_depth)


def metrics_payload() -> bytes:
    """Every worker's samples under gunicorn (multiprocess directory), else this process's registry."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


# -- request ids and stage timing ----------------------------------------------------------------------------


def request_ids() -> tuple[str, str | None]:
    """(request id, W3C trace id): the caller's `X-Request-ID` if it is a sane token, else the trace id of a
    valid `traceparent`, else a new UUID."""
    trace = _TRACEPARENT.fullmatch(request.headers.get("traceparent", "").strip().lower())
    trace_id = trace.group(1) if trace and trace.group(1) != "0" * 32 else None
    given = request.headers.get("X-Request-ID", "").strip()
    if _REQUEST_ID.fullmatch(given):
        return given, trace_id
    return trace_id or uuid.uuid4().hex, trace_id


@contextmanager
def timed(stages: dict[str, float], stage: str) -> Iterator[None]:
    """Add the time spent in the block to `stages[stage]` (seconds), also when it raises."""
    started = time.perf_counter()
    try:
        yield
    finally:
        stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - started


# -- wiring --------------------------------------------------------------------------------------------------


def install(app: Flask, state: ServiceState) -> None:
    """ProxyFix, request ids, the per-call log line and metrics, `/readyz` and `/metrics`.

    Called after the routes are registered, so its `after_request` runs before the audit's (which pops the
    pending audit row this line is built from).
    """
    if state.config.proxies:
        hops = state.config.proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)  # type: ignore[method-assign]
    audit_counters = _AuditCounters()

    @app.before_request
    def assign_request_id() -> None:
        g.request_id, g.trace_id = request_ids()

    @app.after_request
    def log_call(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        if "traceparent" in request.headers and g.get("trace_id"):
            response.headers["traceparent"] = request.headers["traceparent"].strip()
        try:
            _observe(state, response.status_code)
            audit_counters.export(state)
        except Exception as exc:  # observability must never replace an answer
            logging.getLogger("ketamine_cds").error("call log/metrics failed: %s", type(exc).__name__)
        return response

    @app.get("/readyz")
    def readiness() -> tuple[Response, int]:
        checks = readiness_checks(state)
        ready = all(check["ok"] for check in checks.values())
        return jsonify({"status": "ready" if ready else "not ready", "checks": checks}), 200 if ready else 503

    @app.get("/metrics")
    def metrics() -> Response:
        audit_counters.export(state)
        return Response(metrics_payload(), mimetype=CONTENT_TYPE_LATEST.split(";")[0], content_type=CONTENT_TYPE_LATEST)


def readiness_checks(state: ServiceState) -> dict[str, dict[str, Any]]:
    """Can this worker answer calls correctly and at full speed now? Mappings loaded, audit store writable, audit
    queue draining, warm-up finished."""
    mappings = state.mappings
    checks: dict[str, dict[str, Any]] = {
        "mappings": {"ok": mappings is not None and bool(mappings.policies), "version": mappings.version}
    }
    problem = state.audit.check_writable()
    checks["audit_store"] = {"ok": problem is None, "dialect": state.audit.dialect}
    if problem is not None:
        checks["audit_store"]["error"] = problem
    depth, capacity = state.audit.queue_depth, state.audit.queue_capacity
    checks["audit_queue"] = {
        "ok": depth <= capacity * AUDIT_QUEUE_READY_SHARE,
        "depth": depth,
        "capacity": capacity,
    }
    # A worker answers while it warms up (in the background, cds_service.runtime), but is only ready once every
    # call is answered at full speed.
    warm = state.warm_up
    checks["warm_up"] = {"ok": warm.ok, "done": warm.done.is_set()}
    if warm.error is not None:
        checks["warm_up"]["error"] = warm.error
    return checks


def _observe(state: ServiceState, status: int) -> None:
    """The call's one log line and its metric samples."""
    pending: PendingAudit | None = g.get("pending_audit")
    rule = request.url_rule.rule if request.url_rule is not None else "(no route)"  # never the raw path
    duration = time.perf_counter() - g.get("started", time.perf_counter())  # the app's clock (its first hook)
    line: dict[str, Any] = {
        "request_id": g.get("request_id"),
        "trace_id": g.get("trace_id"),
        "method": request.method,
        "endpoint": rule,
        "status": status,
        "duration_ms": round(duration * 1000, 1),
        "remote_addr": request.remote_addr,
    }
    outcome = "ok" if status < 400 else ("refused" if status < 500 else "error")
    if pending is not None:
        trace = pending.trace
        result = pending.outcome if status == 200 else None
        if pending.endpoint == "hook":
            outcome = result.kind if result else outcome
        elif status == 200:
            outcome = "stored"
        hook_instance = result.hook_instance if result else trace.hook_instance
        # A UUID only: a lenient or refused call may carry any text there, and text could be anything.
        line["hook_instance"] = hook_instance if hook_instance and _UUID.fullmatch(hook_instance) else None
        decisions = [summary["outcome"] for summary in result.decision_summaries] if result else []
        line["decisions"] = decisions
        line["stages_ms"] = {stage: round(seconds * 1000, 1) for stage, seconds in trace.stages.items()}
        for decision in decisions:
            DECISIONS.labels(decision).inc()
        for stage, seconds in trace.stages.items():
            STAGE_SECONDS.labels(stage).observe(seconds)
        for reason in trace.fetch_reasons:
            kind = _classify_fetch_failure(reason)
            if kind is not None:
                FHIR_FAILURES.labels(kind).inc()
    line["outcome"] = outcome
    if status >= 400:
        line["reason"] = g.get("call_error") or f"HTTP {status}"
    if rule not in _PROBES:
        CALLS.labels(rule, str(status), outcome).inc()
        CALL_SECONDS.labels(rule).observe(duration)
    level = logging.DEBUG if rule in _PROBES else (logging.WARNING if status >= 500 else logging.INFO)
    assert set(line) <= set(CALL_LOG_FIELDS)
    log.log(level, "%s %s %d %s", request.method, rule, status, outcome, extra=line)
