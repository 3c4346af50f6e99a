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

from flask import Flask, Response, jsonify, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from cds_service.audit import AuditStore, HookCallRecord
from cds_service.auth import AuthError, Caller, JwtVerifier, SharedReplayCache, TrustedIssuers
from cds_service.config import ServiceConfig
from cds_service.discovery import SERVICE_ID, discovery_document
from cds_service.errors import Issue, ServiceError, operation_outcome
from cds_service.feedback import parse_feedback
from cds_service.fhir_client import FhirClient
from cds_service.hook import HookOutcome, handle_order_sign
from cds_service.hook_request import warm_up_fhir_models
from fhir_mappings.mappings import Mappings
from fhir_mappings.validation import load_validated

log = logging.getLogger("ketamine_cds")
Clock = Callable[[], datetime]


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

    def endpoint_url(self, path: str) -> str:
        return self.config.base_url + path


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
        fhir=fhir_client or FhirClient(timeout=config.fhir_timeout, max_workers=max(16, config.threads * 14)),
        audit=audit,
        clock=clock or utc_now,
    )
    warm_up_fhir_models()

    app = Flask("ketamine_cds")
    app.config["MAX_CONTENT_LENGTH"] = 8 * 1024 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]
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
    _register_errors(app)
    log.info(
        "ketamine-cds ready: %s/cds-services, mappings %s, policies %s, audit %s",
        config.base_url,
        mappings.version,
        ", ".join(mappings.policies),
        state.audit.dialect,
    )
    return app


def _register_routes(app: Flask, state: ServiceState) -> None:
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
        started = time.perf_counter()
        caller: Caller | None = None
        outcome: HookOutcome | None = None
        status, error = 500, "internal error"
        try:
            caller = _authenticate(state, f"/cds-services/{SERVICE_ID}")
            outcome = handle_order_sign(state, request.get_data(), caller)
            status, error = 200, None
            return jsonify(outcome.response)
        except ServiceError as exc:
            status, error = exc.status, exc.issues[0].diagnostics if exc.issues else str(exc.status)
            raise
        finally:
            _audit_hook(state, started, status, error, caller, outcome)

    @app.post(f"/cds-services/{SERVICE_ID}/feedback")
    def feedback() -> Response:
        started = time.perf_counter()
        caller: Caller | None = None
        status, error, stored = 500, "internal error", 0
        try:
            caller = _authenticate(state, f"/cds-services/{SERVICE_ID}/feedback")
            body = request.get_json(silent=True)
            if body is None:
                raise ServiceError(400, "request body is not valid JSON", code="structure")
            items = parse_feedback(body)
            stored = state.audit.record_feedback(SERVICE_ID, items, caller.iss if caller else None)
            status, error = 200, None
            return jsonify({"stored": stored, "received": len(items)})
        except ServiceError as exc:
            status, error = exc.status, exc.issues[0].diagnostics if exc.issues else str(exc.status)
            raise
        finally:
            state.audit.record_call(
                HookCallRecord(
                    received_at=state.clock(),
                    service_id=SERVICE_ID,
                    endpoint="feedback",
                    hook=None,
                    hook_instance=None,
                    status_code=status,
                    latency_ms=round((time.perf_counter() - started) * 1000, 2),
                    outcome="stored" if status == 200 else "refused",
                    decisions=[],
                    cards=[],
                    system_actions=[],
                    mapping_version=state.mappings.version,
                    issuer=caller.iss if caller else None,
                    patient_id=None,
                    user_id=None,
                    fhir_server=None,
                    error=error,
                )
            )

    @app.get("/healthz")
    def health() -> Response:
        return jsonify({"status": "ok", "mappings": state.mappings.version})


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


def _audit_hook(
    state: ServiceState,
    started: float,
    status: int,
    error: str | None,
    caller: Caller | None,
    outcome: HookOutcome | None,
) -> None:
    latency = round((time.perf_counter() - started) * 1000, 2)
    state.audit.record_call(
        HookCallRecord(
            received_at=state.clock(),
            service_id=SERVICE_ID,
            endpoint="hook",
            hook="order-sign",
            hook_instance=outcome.hook_instance if outcome else _peek_hook_instance(),
            status_code=status,
            latency_ms=latency,
            outcome=outcome.kind if outcome else ("refused" if 400 <= status < 500 else "error"),
            decisions=outcome.decision_summaries if outcome else [],
            cards=outcome.response["cards"] if outcome else [],
            system_actions=outcome.response["systemActions"] if outcome else [],
            mapping_version=state.mappings.version,
            issuer=caller.iss if caller else None,
            patient_id=outcome.patient_id if outcome else None,
            user_id=outcome.user_id if outcome else None,
            fhir_server=outcome.fhir_server if outcome else None,
            error=error,
        )
    )


def _peek_hook_instance() -> str | None:
    """The hookInstance of a refused call, for the audit trail, if the body is JSON at all."""
    body = request.get_json(silent=True)
    value = body.get("hookInstance") if isinstance(body, dict) else None
    return value[:64] if isinstance(value, str) else None


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError) -> tuple[Response, int, dict[str, str]]:
        # Why a call was refused (which field, which rule): issue texts name locations and rules and never quote
        # request values (cds_service.errors), so they are safe to log; the body and the token never are.
        reasons = "; ".join(issue.diagnostics for issue in exc.issues[:5])
        log.warning("%s %s refused with HTTP %d: %s", request.method, request.path, exc.status, reasons)
        headers = {"WWW-Authenticate": 'Bearer realm="ketamine-cds"'} if exc.status == 401 else {}
        return jsonify(exc.body()), exc.status, headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = {404: "not-found", 405: "not-supported", 413: "too-costly", 415: "not-supported"}.get(
            exc.code or 500, "processing"
        )
        body = operation_outcome([Issue(f"{exc.code} {exc.name}", code=code)])
        return jsonify(body), exc.code or 500

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        trace_id = uuid.uuid4().hex[:12]
        # Frames only, plus the exception type: exception messages may quote request data.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unhandled %s (trace %s)\n%s", type(exc).__name__, trace_id, frames)
        body = operation_outcome([Issue(f"internal error (trace {trace_id})", code="exception")])
        return jsonify(body), 500
