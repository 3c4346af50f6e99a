"""The order-sign pipeline: request → triage → patient record → decisions → cards.

Triage runs before any FHIR access: most order-sign calls are not about ketamine and get
`{"cards": [], "systemActions": []}` at once. Only for ketamine-related orders is the record gathered
(prefetch first, the rest from the EHR's FHIR server in parallel) and evaluated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cards import build_response
from cds_service.auth import Caller, fhir_server_allowed, matching_fhir_prefix
from cds_service.crd_version import error_status, refuse_unhandled_coverage, requested_version
from cds_service.errors import Issue, ServiceError
from cds_service.hook_request import (
    HookRequest,
    normalise_body,
    parse_json,
    validate_orders_fhir,
    validate_request,
)
from cds_service.observability import timed
from cds_service.prefetch import FhirAccess, RequiredDataUnavailable, gather_record
from fhir_mappings.model import Decision
from fhir_mappings.record import reference_key
from fhir_mappings.resource_shapes import shape_problems

if TYPE_CHECKING:
    from cds_service.app import ServiceState

log = logging.getLogger("ketamine_cds.hook")


@dataclass
class HookOutcome:
    """What happened to one call, for the response and the audit trail."""

    kind: str  # "triaged-out" | "evaluated"
    response: dict[str, Any]
    hook_instance: str
    patient_id: str | None = None
    user_id: str | None = None
    fhir_server: str | None = None
    decision_summaries: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CallTrace:
    """What is known of a call so far, filled in as the pipeline goes, so that a refused call is audited
    with what was learnt before it was refused — without parsing the body a second time."""

    hook_instance: str | None = None
    patient_id: str | None = None
    user_id: str | None = None
    fhir_server: str | None = None
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (metrics, the call's log line)
    fetch_reasons: list[str] = field(default_factory=list)  # why queries sent to the FHIR server were not read

    def timed(self, stage: str) -> Any:
        return timed(self.stages, stage)

    def saw_body(self, body: Any) -> None:
        value = body.get("hookInstance") if isinstance(body, dict) else None
        self.hook_instance = value[:64] if isinstance(value, str) else None

    def saw_request(self, req: HookRequest) -> None:
        self.hook_instance = req.hook_instance[:64]
        self.patient_id, self.user_id, self.fhir_server = req.patient_id, req.user_id, req.fhir_server


def handle_order_sign(
    state: ServiceState, raw: bytes, caller: Caller | None, trace: CallTrace | None = None
) -> HookOutcome:
    trace = trace if trace is not None else CallTrace()
    with trace.timed("parse"):
        body = normalise_body(parse_json(raw, state.json_limits), lenient=state.config.lenient)
    trace.saw_body(body)
    version = requested_version(body)  # 422 for a CRD version this service does not serve
    try:
        return _order_sign(state, body, caller, version, trace)
    except ServiceError as exc:
        exc.status = error_status(version, exc)  # CRD 2.2: 400 unless only a CRD-specific rule is broken
        raise


def _order_sign(state: ServiceState, body: Any, caller: Caller | None, version: str, trace: CallTrace) -> HookOutcome:
    with trace.timed("parse"):
        req = validate_request(body, lenient=state.config.lenient)
    trace.saw_request(req)
    groups = state.mappings.triage(req.draft_orders, _known_medications(req))
    if not groups:
        return HookOutcome("triaged-out", {"cards": [], "systemActions": []}, req.hook_instance)

    evaluated = [o for g in groups for o in g.orders]
    validate_orders_fhir([o.resource for o in evaluated], {o.ref: o.index for o in evaluated})
    now = state.clock()
    fhir = _fhir_access(state, req, caller)
    with trace.timed("fhir_fetch"):
        record = _gather(state, req, fhir, now, trace)
    with trace.timed("evaluation"):
        decisions = state.mappings.decide(record, groups)
    refuse_unhandled_coverage(version, decisions)  # CRD 2.2 hook-13: 400 when the payer is not handled here
    with trace.timed("render"):
        response = build_response(
            decisions,
            req.draft_orders,
            hook_instance=req.hook_instance,
            patient_id=req.patient_id,
            user_id=req.user_id,
            today=now.date(),
            configuration=req.configuration,
            crd_version=version,
        )
    return HookOutcome(
        kind="evaluated",
        response=response,
        hook_instance=req.hook_instance,
        patient_id=req.patient_id,
        user_id=req.user_id,
        fhir_server=req.fhir_server,
        decision_summaries=[_summary(d) for d in decisions],
    )


def _gather(state: ServiceState, req: HookRequest, fhir: FhirAccess | None, now: Any, trace: CallTrace) -> Any:
    """The record; what the FHIR server could not give is noted on the trace (PHI-free reasons, for metrics)."""
    try:
        record = gather_record(
            queries=state.mappings.queries,
            context=req.context,
            prefetch=req.prefetch,
            fhir=fhir,
            client=state.fhir,
            now=now,
            deadline=time.monotonic() + state.config.fetch_budget,
            draft_orders=req.draft_orders,
        )
    except RequiredDataUnavailable as exc:
        trace.fetch_reasons.extend(exc.reasons.values())
        raise
    trace.fetch_reasons.extend(o.reason for o in record.queries.values() if o.source != "prefetch" and o.reason)
    return record


def _summary(decision: Decision) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "policy": decision.policy.id if decision.policy else None,
        "outcome": decision.outcome.value,
        "orders": list(decision.order_refs),
    }
    for key in ("phase", "service", "program"):
        if getattr(decision, key):
            summary[key] = getattr(decision, key)
    return summary


def _fhir_access(state: ServiceState, req: HookRequest, caller: Caller | None) -> FhirAccess | None:
    """The EHR's FHIR server, if this caller may make us contact it (no SSRF: registered prefixes only).

    Everything read afterwards — pages, `next` links, references — must lie under the request's own
    `fhirServer`: the caller's token never goes to another server, not even one its issuer also uses.
    """
    if not req.fhir_server:
        return None
    if caller is not None:
        prefixes: tuple[str, ...] = tuple(caller.fhir_servers)
    elif state.issuers is not None:
        prefixes = state.issuers.all_fhir_servers()
    else:
        # --insecure-no-auth without a trusted-issuers file: local development against any server the
        # developer points the client at; paging links must stay on that server.
        prefixes = (req.fhir_server,)
        if "open-fhir" not in state.warned:
            state.warned.add("open-fhir")
            log.warning("--insecure-no-auth without trusted issuers: fetching from whatever fhirServer a call names")
    entry = matching_fhir_prefix(req.fhir_server, prefixes)
    if entry is None:
        log.warning("fhirServer refused: not registered for the caller's issuer")
        if not req.prefetch:
            raise ServiceError(
                412,
                [Issue("fhirServer is not registered for this client and no prefetch was sent", code="forbidden")],
            )
        return None
    own_server = (req.fhir_server,)
    pool_key = None if state.issuers is None else entry  # insecure open mode: one pool per origin
    return FhirAccess(
        req.fhir_server, req.access_token, lambda url: fhir_server_allowed(url, own_server), pool_key=pool_key
    )


def _known_medications(req: HookRequest) -> dict[str, dict[str, Any]] | None:
    """Medications the request already carries (prefetch), only when a draft order references one that is
    not contained — so triage can follow `medicationReference` without any FHIR access."""
    wanted = set()
    for order in req.draft_orders:
        reference = order.get("medicationReference") if isinstance(order, dict) else None
        ref = reference.get("reference") if isinstance(reference, dict) else None
        key = reference_key(ref) if isinstance(ref, str) else None
        if key:
            wanted.add(key)
    if not wanted or not req.prefetch:
        return None
    known: dict[str, dict[str, Any]] = {}
    for value in req.prefetch.values():
        entries = value.get("entry") if isinstance(value, dict) and value.get("resourceType") == "Bundle" else None
        for entry in entries or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "Medication":
                key = f"Medication/{resource.get('id')}"
                if key in wanted and not shape_problems(resource):  # an unreadable one is not known
                    known[key] = resource
    return known
