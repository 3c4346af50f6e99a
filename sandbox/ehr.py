"""An EHR simulator: fires CDS Hooks 2.0 `order-sign` calls at the service exactly as an EHR would.

It discovers the service, fills the advertised prefetch templates by querying the FHIR server (or sends no
prefetch at all, to exercise the service's own FHIR fetching), signs a fresh client JWT per call, and reads
the answer back: the `ketamine-cds.decision` card extension says, per draft order, which policy decided what.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal

import requests
from requests.adapters import HTTPAdapter

from sandbox.fhir_server import fhir_session
from sandbox.includes import complete_includes
from sandbox.scenarios import Scenario
from sandbox.signing import SandboxKey, sign_cds_jwt

Mode = Literal["prefetch", "fallback"]
MODES: tuple[Mode, ...] = ("prefetch", "fallback")
DEFAULT_SERVICE_ID = "ketamine-prior-auth"
DEFAULT_ISSUER = "https://ehr.sandbox.ketamine-cds.invalid"
DECISION_EXTENSION = "ketamine-cds.decision"
COVERAGE_INFORMATION_URL = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
FHIR_TOKEN_LIFETIME = 300
FHIR_SCOPE = "patient/*.read user/*.read"
CLIENT_SUBJECT = "ketamine-cds"  # the OAuth client id of the CDS service at the EHR's auth server

_TOKEN = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_READ = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
_USER_TOKENS = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}


class EhrError(RuntimeError):
    """The simulated EHR could not do its part (discovery failed, service not advertised, ...)."""


@dataclass(frozen=True)
class ObservedDecision:
    """One order's outcome as the service reported it in a card's `ketamine-cds.decision` extension."""

    order: str
    policy: str | None
    outcome: str | None
    phase: str | None
    summary: str = ""

    def describe(self) -> str:
        parts = [self.policy or "(no policy)", self.outcome or "(no outcome)"]
        if self.phase:
            parts.append(self.phase)
        return " ".join(parts)


@dataclass
class FireResult:
    """What one hook call returned and how long the service took to answer it."""

    scenario_id: str
    mode: Mode
    status: int  # HTTP status; 0 when the service could not be reached
    response: dict[str, Any] | None
    latency_ms: float
    decisions: list[ObservedDecision] = field(default_factory=list)
    prefetch_keys: tuple[str, ...] = ()  # keys sent in `prefetch` (empty in fallback mode)
    error: str | None = None  # transport error or non-JSON body, PHI-free

    @property
    def outcomes(self) -> dict[str, list[ObservedDecision]]:
        """Decisions grouped by draft order reference."""
        grouped: dict[str, list[ObservedDecision]] = {}
        for decision in self.decisions:
            grouped.setdefault(decision.order, []).append(decision)
        return grouped

    def outcome_text(self) -> str:
        """Short `order: policy outcome phase` list for result tables."""
        if self.error or self.status != 200:
            return f"HTTP {self.status}" + (f" ({self.error})" if self.error else "")
        if not self.decisions:
            cards = (self.response or {}).get("cards") or []
            return "no cards" if not cards else f"{len(cards)} card(s), no decision"
        return "; ".join(decision.describe() for decision in self.decisions)


class EhrSimulator:
    """Plays the EHR side of CDS Hooks against one service and one FHIR server."""

    def __init__(
        self,
        service_base: str,
        fhir_base: str,
        *,
        fhir_token: str | None,
        key: SandboxKey,
        issuer: str = DEFAULT_ISSUER,
        service_id: str = DEFAULT_SERVICE_ID,
        timeout: float = 30.0,
    ) -> None:
        self.service_base = normalize_service_base(service_base)
        self.fhir_base = fhir_base.rstrip("/")
        self.fhir_token = fhir_token
        self.key = key
        self.issuer = issuer
        self.service_id = service_id
        self.timeout = timeout
        self._fhir = fhir_session(self.fhir_base, fhir_token)
        self._fhir.mount("http://", HTTPAdapter(pool_maxsize=16))
        self._fhir.mount("https://", HTTPAdapter(pool_maxsize=16))
        self._service = requests.Session()  # keep-alive to the service, as an EHR's pooled client would
        self._discovery: dict[str, Any] | None = None

    @property
    def discovery_url(self) -> str:
        return f"{self.service_base}/cds-services"

    @property
    def hook_url(self) -> str:
        return f"{self.discovery_url}/{self.service_id}"

    def close(self) -> None:
        self._fhir.close()
        self._service.close()

    def __enter__(self) -> EhrSimulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ discovery

    def discover(self) -> dict[str, Any]:
        """GET the discovery document (with a JWT, although discovery may be open) and check our service is in it."""
        try:
            response = self._service.get(
                self.discovery_url,
                headers={"Authorization": f"Bearer {self._jwt(self.discovery_url)}", "Accept": "application/json"},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise EhrError(f"discovery at {self.discovery_url} failed: {exc}") from exc
        if response.status_code != 200:
            raise EhrError(f"discovery at {self.discovery_url} answered HTTP {response.status_code}")
        try:
            document = response.json()
        except ValueError as exc:
            raise EhrError(f"discovery at {self.discovery_url} did not return JSON") from exc
        services = document.get("services") if isinstance(document, dict) else None
        if not isinstance(services, list) or not any(
            isinstance(service, dict) and service.get("id") == self.service_id for service in services
        ):
            raise EhrError(f"discovery at {self.discovery_url} does not list service {self.service_id!r}")
        self._discovery = document
        return document

    def service_entry(self) -> dict[str, Any]:
        """Our service's discovery entry (discovering once, lazily)."""
        document = self._discovery or self.discover()
        return next(service for service in document["services"] if service.get("id") == self.service_id)

    def prefetch_templates(self) -> dict[str, str]:
        templates = self.service_entry().get("prefetch") or {}
        return {key: value for key, value in templates.items() if isinstance(value, str)}

    # ------------------------------------------------------------------ requests

    def build_request(self, scenario: Scenario, *, mode: Mode, today: date | None = None) -> dict[str, Any]:
        """The exact body an EHR would POST for this scenario: draft orders dated `today`, prefetch per `mode`."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        current = scenario.shifted(today or date.today())
        context: dict[str, Any] = {"userId": current.user_id, "patientId": current.patient_id}
        if current.encounter_id:
            context["encounterId"] = current.encounter_id
        context["draftOrders"] = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": order} for order in current.draft_orders],
        }
        body: dict[str, Any] = {
            "hook": "order-sign",
            "hookInstance": str(uuid.uuid4()),
            "fhirServer": self.fhir_base,
        }
        if self.fhir_token:
            body["fhirAuthorization"] = {
                "access_token": self.fhir_token,
                "token_type": "Bearer",
                "expires_in": FHIR_TOKEN_LIFETIME,
                "scope": FHIR_SCOPE,
                "subject": CLIENT_SUBJECT,
                "patient": current.patient_id,
            }
        body["context"] = context
        if mode == "prefetch":
            body["prefetch"] = self.build_prefetch(context)
        return body

    def build_prefetch(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """Run every resolvable template against the FHIR server, in parallel, with EHR semantics.

        Unresolvable token → key omitted; read answered 404/410 → `null`; any other failure → key omitted;
        searches send their first page only (the service follows `next`).
        """
        queries = {key: resolve_template(template, context) for key, template in self.prefetch_templates().items()}
        runnable = {key: query for key, query in queries.items() if query is not None}
        if not runnable:
            return {}
        with ThreadPoolExecutor(max_workers=min(8, len(runnable))) as pool:
            results = dict(zip(runnable, pool.map(self._prefetch_one, runnable.values()), strict=True))
        return {key: value for key, value in results.items() if value is not _OMIT}

    def _prefetch_one(self, query: str) -> Any:
        is_read = "?" not in query and _READ.match(query) is not None
        try:
            response = self._fhir.get(f"{self.fhir_base}/{query}", timeout=self.timeout)
        except requests.RequestException:
            return _OMIT
        if is_read and response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            return _OMIT
        try:
            resource = response.json()
        except ValueError:
            return _OMIT
        if not isinstance(resource, dict):
            return _OMIT
        if not is_read and resource.get("resourceType") != "Bundle":
            return _OMIT
        if not is_read:  # a conformant EHR's search: includes assembled where the server ignores them
            complete_includes(resource, query, self._read_json, self.fhir_base)
        return resource

    def _read_json(self, query: str) -> Any:
        """One more GET for an include (a read or a search); None when it cannot be had."""
        try:
            response = self._fhir.get(f"{self.fhir_base}/{query}", timeout=self.timeout)
            return response.json() if response.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None

    def fire(self, scenario: Scenario, mode: Mode = "prefetch", today: date | None = None) -> FireResult:
        """Sign, POST, time the round trip (perf_counter around the POST only) and extract the decisions."""
        body = self.build_request(scenario, mode=mode, today=today)
        headers = {
            "Authorization": f"Bearer {self._jwt(self.hook_url)}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        prefetch_keys = tuple(body.get("prefetch", {}))
        started = time.perf_counter()
        try:
            response = self._service.post(self.hook_url, json=body, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            latency_ms = (time.perf_counter() - started) * 1000
            return FireResult(scenario.id, mode, 0, None, latency_ms, prefetch_keys=prefetch_keys, error=str(exc))
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            payload = response.json()
        except ValueError:
            payload, error = None, f"non-JSON body ({response.headers.get('Content-Type', 'no content type')})"
        else:
            error = None if isinstance(payload, dict) else "JSON body is not an object"
            payload = payload if isinstance(payload, dict) else None
        decisions = extract_decisions(payload, scenario.order_refs) if response.status_code == 200 else []
        return FireResult(
            scenario_id=scenario.id,
            mode=mode,
            status=response.status_code,
            response=payload,
            latency_ms=latency_ms,
            decisions=decisions,
            prefetch_keys=prefetch_keys,
            error=error,
        )

    def _jwt(self, audience: str) -> str:
        return sign_cds_jwt(self.key, iss=self.issuer, aud=audience)

    # Convenience: the module-level helpers, reachable from an instance.
    @staticmethod
    def check(scenario: Scenario, result: FireResult) -> list[str]:
        return check(scenario, result)

    @staticmethod
    def render_cards(response: Mapping[str, Any] | None) -> str:
        return render_cards(response)


class _Omit:
    """Marker for a prefetch key the EHR leaves out (distinct from JSON null)."""


_OMIT = _Omit()


def normalize_service_base(url: str) -> str:
    """Accept the service root or its discovery URL (with or without trailing slash); return the root."""
    url = url.rstrip("/")
    return url[: -len("/cds-services")] if url.endswith("/cds-services") else url


def resolve_template(template: str, context: Mapping[str, Any]) -> str | None:
    """Fill CDS Hooks 2.0 prefetch tokens from the context; None when any token cannot be resolved."""
    user_type, _, user_id = str(context.get("userId", "")).partition("/")
    values: dict[str, str] = {}
    for name, value in context.items():
        if isinstance(value, str | int | float | bool) and value != "":
            values[f"context.{name}"] = str(value)
    for token, resource_type in _USER_TOKENS.items():
        if user_type == resource_type and user_id:
            values[token] = user_id
    unresolved = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal unresolved
        token = match.group(1)
        if token not in values:
            unresolved = True
            return match.group(0)
        return values[token]

    filled = _TOKEN.sub(substitute, template)
    return None if unresolved else filled


def extract_decisions(response: Mapping[str, Any] | None, draft_order_refs: Iterable[str]) -> list[ObservedDecision]:
    """Per-order decisions from the cards' `ketamine-cds.decision` extensions.

    A decision that names no orders is about the whole request and is attributed to every draft order.
    """
    decisions: list[ObservedDecision] = []
    all_orders = list(draft_order_refs)
    cards = (response or {}).get("cards")
    for card in cards if isinstance(cards, list) else []:
        extension = card.get("extension") if isinstance(card, dict) else None
        decision = extension.get(DECISION_EXTENSION) if isinstance(extension, dict) else None
        if not isinstance(decision, dict):
            continue
        orders = decision.get("orders") or all_orders
        for order in orders:
            decisions.append(
                ObservedDecision(
                    order=str(order),
                    policy=decision.get("policy"),
                    outcome=decision.get("outcome"),
                    phase=decision.get("phase"),
                    summary=str(card.get("summary", "")),
                )
            )
    return decisions


def check(scenario: Scenario, result: FireResult) -> list[str]:
    """Mismatches between what the scenario expects and what the service answered; empty means it matched."""
    if result.error and result.response is None:
        return [f"HTTP {result.status}: {result.error}"]
    if result.status != 200:
        return [f"HTTP {result.status}: {_error_text(result.response)}"]
    response = result.response or {}
    cards = response.get("cards")
    if not isinstance(cards, list):
        return ["response has no `cards` array"]
    problems: list[str] = []
    if scenario.expect_no_cards:
        if cards:
            summaries = "; ".join(str(card.get("summary", "?")) for card in cards if isinstance(card, dict))
            problems.append(f"expected no cards, got {len(cards)}: {summaries}")
        if response.get("systemActions"):
            problems.append(f"expected no system actions, got {len(response['systemActions'])}")
        return problems

    accounted: set[int] = set()
    for expected in scenario.expected:
        for_order = [(index, d) for index, d in enumerate(result.decisions) if d.order == expected.order]
        same_policy = [(index, d) for index, d in for_order if d.policy == expected.policy]
        want = f"{expected.order}: expected {expected.describe()}"
        if not for_order:
            problems.append(f"{want}, got no decision card")
            continue
        if not same_policy:
            problems.append(f"{want}, got {', '.join(d.describe() for _, d in for_order)}")
            accounted.update(index for index, _ in for_order)
            continue
        accounted.update(index for index, _ in same_policy)
        if len(same_policy) > 1:
            problems.append(f"{want}, got {len(same_policy)} decisions under that policy")
        decision = same_policy[0][1]
        if decision.outcome != expected.outcome or (expected.phase and decision.phase != expected.phase):
            problems.append(f"{want}, got {decision.describe()}")

    if scenario.has_expectations:
        for index, decision in enumerate(result.decisions):
            if index in accounted:
                continue
            if decision.order not in scenario.order_refs:
                problems.append(f"decision for {decision.order}, which is not a draft order: {decision.describe()}")
            else:
                problems.append(f"unexpected decision for {decision.order}: {decision.describe()}")
    return problems


def _error_text(response: Mapping[str, Any] | None) -> str:
    if not response:
        return "(no JSON body)"
    if response.get("resourceType") == "OperationOutcome":
        return "; ".join(str(issue.get("diagnostics", issue.get("code", "?"))) for issue in response.get("issue", []))
    for key in ("error", "message", "detail"):
        if key in response:
            return str(response[key])[:500]
    return str(response)[:500]


# ---------------------------------------------------------------------- rendering


def render_cards(response: Mapping[str, Any] | None) -> str:
    """Cards and system actions as readable text, the way a clinician (and a developer panel) would see them."""
    if response is None:
        return "(no JSON response)"
    lines: list[str] = []
    cards = response.get("cards") or []
    if not cards:
        lines.append("(no cards)")
    for number, card in enumerate(cards, start=1):
        lines.extend(_render_card(number, card))
    actions = response.get("systemActions") or []
    if actions:
        lines.append(f"system actions ({len(actions)}):")
        for action in actions:
            lines.extend(_render_action(action))
    return "\n".join(lines)


def _render_card(number: int, card: Mapping[str, Any]) -> list[str]:
    indicator = str(card.get("indicator", "?")).upper()
    lines = [f"{number}. [{indicator}] {card.get('summary', '(no summary)')}"]
    source = card.get("source") or {}
    source_text = str(source.get("label", "(no source label)"))
    if source.get("url"):
        source_text += f" <{source['url']}>"
    lines.append(f"     source: {source_text}")
    decision = (card.get("extension") or {}).get(DECISION_EXTENSION)
    if isinstance(decision, dict):
        parts = [decision.get("policy") or "(no policy)", decision.get("outcome") or "?"]
        if decision.get("phase"):
            parts.append(decision["phase"])
        orders = ", ".join(decision.get("orders") or []) or "all orders"
        lines.append(f"     decision: {' · '.join(parts)} · {orders}")
    if card.get("detail"):
        lines.append("     detail:")
        lines.extend(f"       | {line}".rstrip() for line in str(card["detail"]).splitlines())
    for link in card.get("links") or []:
        lines.append(f"     link: {link.get('label', '?')} <{link.get('url', '?')}> ({link.get('type', '?')})")
    suggestions = card.get("suggestions") or []
    if suggestions:
        lines.append(f"     suggestions ({card.get('selectionBehavior', 'no selectionBehavior')}):")
        for suggestion in suggestions:
            recommended = " [recommended]" if suggestion.get("isRecommended") else ""
            lines.append(f"       - {suggestion.get('label', '?')}{recommended}")
    reasons = card.get("overrideReasons") or []
    if reasons:
        labels = ", ".join(str(reason.get("display") or reason.get("code", "?")) for reason in reasons)
        lines.append(f"     override reasons: {labels}")
    return lines


def _render_action(action: Mapping[str, Any]) -> list[str]:
    resource = action.get("resource") or {}
    target = action.get("resourceId") or (
        f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}" if resource else "?"
    )
    lines = [f"  - {action.get('type', '?')} {target}: {action.get('description', '(no description)')}"]
    for extension in resource.get("extension") or []:
        if extension.get("url") == COVERAGE_INFORMATION_URL:
            lines.append(f"      coverage-information: {coverage_information_text(extension)}")
    return lines


def coverage_information_text(extension: Mapping[str, Any]) -> str:
    """`covered=… pa-needed=… doc-needed=… reason="…"` from a CRD coverage-information extension."""
    values: dict[str, list[str]] = {}
    for part in extension.get("extension") or []:
        name = part.get("url")
        if name in ("covered", "pa-needed", "doc-needed") and "valueCode" in part:
            values.setdefault(name, []).append(str(part["valueCode"]))
        elif name == "reason" and isinstance(part.get("valueCodeableConcept"), dict):
            concept = part["valueCodeableConcept"]
            codings = concept.get("coding") or [{}]
            text = concept.get("text") or codings[0].get("display") or codings[0].get("code") or "?"
            values.setdefault("reason", []).append(f'"{text}"')
    ordered = [name for name in ("covered", "pa-needed", "doc-needed", "reason") if name in values]
    return " ".join(f"{name}={','.join(values[name])}" for name in ordered) or "(empty)"
