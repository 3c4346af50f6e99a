"""The Flask application: discovery, the order-sign hook and feedback, with auth, CORS, errors and audit.

`create_app(config)` builds everything the request path needs exactly once — mappings (value sets,
facts, policies, routing, compiled), the trusted issuers and JWT verifier, the pooled FHIR client, the
audit store — so a request does no loading, parsing of configuration or compiling.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from cds_service.audit import AuditStore, AuditStoreError, HookCallRecord
from cds_service.auth import AuthError, Caller, JwtVerifier, SharedReplayCache, TrustedIssuers
from cds_service.bench_floor import floor_enabled, register_floor
from cds_service.config import ServiceConfig
from cds_service.discovery import SERVICE_ID, discovery_document
from cds_service.errors import Issue, ServiceError, operation_outcome
from cds_service.feedback import parse_feedback
from cds_service.fhir_client import FhirClient
from cds_service.hook import CallTrace, HookOutcome, handle_order_sign
from cds_service.hook_request import ORDER_TYPES, JsonLimits, parse_json, warm_up_fhir_models
from cds_service.json_answer import OrjsonProvider
from cds_service.observability import install as install_observability
from cds_service.runtime import WarmUp, warm_up_is_deferred
from fhir_mappings.mappings import Mappings
from fhir_mappings.reading.text import shared_reader
from fhir_mappings.resource_shapes import warm_up as warm_up_shapes
from fhir_mappings.validation import load_validated

log = logging.getLogger("ketamine_cds")
Clock = Callable[[], datetime]
# Types that reach the record by reference rather than by a query: their shape definitions are loaded at start-up.
_REFERENCE_TARGET_TYPES = ("Practitioner", "PractitionerRole", "Organization", "Location", "Medication")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class ServiceState:
    """Everything loaded once per process and shared by all requests (read-only after start-up)."""

    config: ServiceConfig
    mappings: Mappings
    verifier: JwtVerifier | None
    issuers: TrustedIssuers | None
    fhir: FhirClient
    audit: AuditStore
    clock: Clock = utc_now
    warned: set[str] = field(default_factory=set)
    json_limits: JsonLimits = field(default_factory=JsonLimits)
    audit_failures: int = 0  # audit rows that could not even be handed to the store (logged as errors)
    warm_up: WarmUp = field(default_factory=WarmUp.finished)  # models, shapes, ConText (cds_service.runtime)

    def endpoint_url(self, path: str) -> str:
        return self.config.base_url + path


@dataclass
class PendingAudit:
    """The audit row of the call being answered; written exactly once, by `after_request`, with the status
    actually sent — whatever happened (200, 4xx, 413, 401, an unexpected 5xx)."""

    endpoint: str  # "hook" | "feedback"
    started: float
    caller: Caller | None = None
    trace: CallTrace = field(default_factory=CallTrace)
    outcome: HookOutcome | None = None
    stored: int | None = None  # feedback rows newly stored
    error: str | None = None


class _CollapseSlashes:
    """WSGI middleware: `//cds-services//id` → `/cds-services/id` (a trailing slash typed into the CDS Hooks
    sandbox's discovery URL makes it call `{discovery}//{id}`)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if "//" in path:
            environ["PATH_INFO"] = re.sub(r"/{2,}", "/", path)
        return self.app(environ, start_response)


def create_app(
    config: ServiceConfig | None = None,
    *,
    mappings: Mappings | None = None,
    audit: AuditStore | None = None,
    fhir_client: FhirClient | None = None,
    clock: Clock | None = None,
) -> Flask:
    """Application factory (also used by gunicorn via `cds_service.wsgi:app`)."""
    config = (config or ServiceConfig()).validate()
    if mappings is None:  # checked as `ketamine-cds mappings validate` checks it: all problems, file:line:column
        mappings = load_validated(config.site_config)
    issuers = TrustedIssuers.load(config.trusted_issuers) if config.trusted_issuers else None
    audit = audit or AuditStore(config.database)
    # jti replay protection shared by every gunicorn worker and instance that uses the same database.
    verifier = JwtVerifier(issuers, replay_cache=SharedReplayCache(audit.claim_jti)) if issuers is not None else None
    if config.insecure_no_auth:
        log.warning(
            "!!! --insecure-no-auth: hook and feedback calls are accepted WITHOUT a JWT. Local development only: "
            "never expose this instance to a network or real patient data. !!!"
        )
    state = ServiceState(
        config=config,
        mappings=mappings,
        verifier=verifier,
        issuers=issuers,
        fhir=fhir_client
        or FhirClient(
            timeout=config.fhir_timeout, max_workers=config.fhir_concurrency, page_size=config.fhir_page_size
        ),
        audit=audit,
        clock=clock or utc_now,
        json_limits=JsonLimits(max_bytes=config.max_body_bytes, max_depth=config.max_json_depth),
    )
    shape_types = {*mappings.queries.supplied_types(), *ORDER_TYPES, *_REFERENCE_TARGET_TYPES}
    state.warm_up = WarmUp([warm_up_fhir_models, lambda: warm_up_shapes(shape_types), shared_reader])
    if not warm_up_is_deferred():  # under gunicorn (our configuration) the worker warms up in the background
        state.warm_up.run(reraise=True)

    app = Flask("ketamine_cds")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json = OrjsonProvider(app)  # answers serialised in C (cds_service/json_answer.py)
    app.extensions["ketamine_cds"] = state
    app.wsgi_app = _CollapseSlashes(app.wsgi_app)  # type: ignore[method-assign]
    # Browser clients (the CDS Hooks sandbox): preflight answered without auth, headers on every response.
    CORS(
        app,
        resources={r"/cds-services*": {"origins": "*"}},
        methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Accept"],
        expose_headers=["Content-Type"],
        max_age=600,
        send_wildcard=True,
        # Chrome Private Network Access: a public HTTPS page (sandbox.cds-hooks.org) calling a service on
        # localhost must be allowed explicitly in the preflight answer.
        allow_private_network=True,
    )
    _register_routes(app, state)
    install_observability(app, state)  # request ids, the call's JSON log line, metrics, /readyz, /metrics
    _register_errors(app)
    if floor_enabled():  # `ketamine-cds bench` only: the bare endpoint its ratios are measured against
        register_floor(app)
    log.info(
        "ketamine-cds ready: %s/cds-services, mappings %s, policies %s, audit %s",
        config.base_url,
        mappings.version,
        ", ".join(mappings.policies),
        state.audit.dialect,
    )
    return app


def _register_routes(app: Flask, state: ServiceState) -> None:
    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def no_store(response: Response) -> Response:
        response.headers.setdefault("Cache-Control", "no-store")  # answers carry patient-specific advice
        return response

    @app.get("/cds-services")
    def discovery() -> Response:
        # Discovery holds no PHI: no token needed, but a token that is sent must be valid.
        if request.headers.get("Authorization") and state.verifier is not None:
            _authenticate(state, "/cds-services")
        return jsonify(discovery_document(state.mappings.queries))  # per call: a reload may change the queries

    @app.post(f"/cds-services/{SERVICE_ID}")
    def order_sign() -> Response:
        pending = _begin_audit("hook")
        with pending.trace.timed("auth"):
            pending.caller = _authenticate(state, f"/cds-services/{SERVICE_ID}")  # before the body is even read
        raw = _read_body()
        pending.outcome = handle_order_sign(state, raw, pending.caller, pending.trace)
        return jsonify(pending.outcome.response)

    @app.post(f"/cds-services/{SERVICE_ID}/feedback")
    def feedback() -> Response:
        pending = _begin_audit("feedback")
        pending.caller = _authenticate(state, f"/cds-services/{SERVICE_ID}/feedback")
        body = parse_json(_read_body(), state.json_limits)
        items = parse_feedback(body)
        try:
            stored = state.audit.record_feedback(SERVICE_ID, items, pending.caller.iss if pending.caller else None)
        except AuditStoreError:
            # Logged by the store (class of error only); the client must retry, so say so with a 503.
            raise ServiceError(
                503, [Issue("feedback could not be stored now; retry later", code="transient")]
            ) from None
        pending.stored = stored
        return jsonify({"stored": stored, "received": len(items)})

    @app.after_request
    def write_audit(response: Response) -> Response:
        pending: PendingAudit | None = g.pop("pending_audit", None)
        if pending is not None:
            _write_audit(state, pending, response.status_code)
        return response

    @app.get("/healthz")
    def health() -> Response:
        """Liveness: the process answers. Whether it can serve correctly is /readyz."""
        return jsonify(
            {
                "status": "ok",
                "mappings": state.mappings.version,
                # Counters, no content: audit rows that were dropped or could not be written (each logged).
                "audit": {
                    "dropped": state.audit.dropped_count,
                    "failed": state.audit.failed_count + state.audit_failures,
                    "feedback_failed": state.audit.feedback_failed_count,
                },
            }
        )


def _begin_audit(endpoint: str) -> PendingAudit:
    pending = PendingAudit(endpoint=endpoint, started=g.get("started", time.perf_counter()))
    g.pending_audit = pending
    return pending


def _read_body() -> bytes:
    """The raw request body, at most MAX_CONTENT_LENGTH bytes (413 with an OperationOutcome beyond)."""
    try:
        return request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise ServiceError(413, [Issue("request body too large", code="too-costly")]) from None


def _authenticate(state: ServiceState, path: str) -> Caller | None:
    """Verify the EHR's JWT (aud = this endpoint's public URL); None only with --insecure-no-auth."""
    if state.config.insecure_no_auth and state.verifier is None:
        return None
    header = request.headers.get("Authorization")
    if state.config.insecure_no_auth and not header:
        return None
    assert state.verifier is not None
    try:
        return state.verifier.verify(header, state.endpoint_url(path))
    except AuthError as exc:
        log.warning("JWT refused on %s: %s", path, exc)  # the reason only; never the token
        raise ServiceError(401, [Issue("authentication failed", code="login")]) from None


def _write_audit(state: ServiceState, pending: PendingAudit, status: int) -> None:
    """Hand the call's row to the store; a row that cannot even be built is logged as an error and counted."""
    try:
        outcome = pending.outcome if status == 200 else None
        trace = pending.trace
        if pending.endpoint == "hook":
            kind = outcome.kind if outcome else ("refused" if 400 <= status < 500 else "error")
        else:
            kind = "stored" if status == 200 else ("refused" if 400 <= status < 500 else "error")
        record = HookCallRecord(
            received_at=state.clock(),
            service_id=SERVICE_ID,
            endpoint=pending.endpoint,
            hook="order-sign" if pending.endpoint == "hook" else None,
            hook_instance=outcome.hook_instance if outcome else trace.hook_instance,
            status_code=status,
            latency_ms=round((time.perf_counter() - pending.started) * 1000, 2),
            outcome=kind,
            decisions=outcome.decision_summaries if outcome else [],
            cards=outcome.response["cards"] if outcome else [],
            system_actions=outcome.response["systemActions"] if outcome else [],
            mapping_version=state.mappings.version,
            issuer=pending.caller.iss if pending.caller else None,
            patient_id=outcome.patient_id if outcome else trace.patient_id,
            user_id=outcome.user_id if outcome else trace.user_id,
            fhir_server=outcome.fhir_server if outcome else trace.fhir_server,
            error=None if status == 200 else (pending.error or f"HTTP {status}"),
        )
        state.audit.record_call(record)
    except Exception as exc:  # the answer has been computed: never let auditing replace it with a 500
        state.audit_failures += 1
        log.error(
            "audit: could not record a %s call (%s); %d so far",
            pending.endpoint,
            type(exc).__name__,
            state.audit_failures,
        )


def _note_error(message: str) -> None:
    g.call_error = message[:500]  # the reason in the call's log line (every endpoint, audited or not)
    pending: PendingAudit | None = g.get("pending_audit")
    if pending is not None:
        pending.error = message[:500]


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError) -> tuple[Response, int, dict[str, str]]:
        # Why a call was refused (which field, which rule): issue texts name locations and rules and never quote
        # request values (cds_service.errors), so they are safe to log; the body and the token never are.
        reasons = "; ".join(issue.diagnostics for issue in exc.issues[:5])
        log.warning("%s %s refused with HTTP %d: %s", request.method, request.path, exc.status, reasons)
        headers = {"WWW-Authenticate": 'Bearer realm="ketamine-cds"'} if exc.status == 401 else {}
        _note_error(exc.issues[0].diagnostics if exc.issues else str(exc.status))
        return jsonify(exc.body()), exc.status, headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = {404: "not-found", 405: "not-supported", 413: "too-costly", 415: "not-supported"}.get(
            exc.code or 500, "processing"
        )
        _note_error(f"{exc.code} {exc.name}")
        body = operation_outcome([Issue(f"{exc.code} {exc.name}", code=code)])
        return jsonify(body), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        trace_id = uuid.uuid4().hex[:12]
        # Frames only, plus the exception type: exception messages may quote request data.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unhandled %s (trace %s)\n%s", type(exc).__name__, trace_id, frames)
        _note_error(f"internal error {type(exc).__name__} (trace {trace_id})")
        body = operation_outcome([Issue(f"internal error (trace {trace_id})", code="exception")])
        return jsonify(body), 500
