"""Patient records for offline evaluation: from a Bundle, a sandbox story, a fixture case or a cohort entry.

The service reads a patient through its prefetch queries; offline, the whole record is at hand. To give the
answer the service would give, each query's search is applied to the record as a FHIR server would apply it —
the `code=` token list (a site's codes included) and the `status=` filter — and every supplied resource type
counts as read completely. Resources no query supplies (Practitioner, Organization, Location, Medication, …)
stay available to references, as the service's reference resolution would make them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from fhir_mappings.mappings import Mappings
from fhir_mappings.orders import OrderGroup
from fhir_mappings.record import Availability, PatientRecord, QueryOutcome

Resource = dict[str, Any]
ASSUMED_ORDERS_FILE = Path(__file__).with_name("assumed_orders.yaml")
EVALUATION_HOUR = 17  # "now" on an --as-of day: late afternoon UTC, as the fixture cases use


class InputError(ValueError):
    """A patient file cannot be read as a record; the message says why (no traceback for the user)."""


@dataclass
class PatientInput:
    """One patient's resources and, when the file says so, the orders being signed and the day it is written for."""

    patient_id: str
    resources: list[Resource]
    draft_orders: list[Resource] = field(default_factory=list)
    full_urls: dict[str, Resource] = field(default_factory=dict)
    user_id: str | None = None
    encounter_id: str | None = None
    as_of: date | None = None  # a story's anchor date
    source: str = ""
    label: str = ""  # a story id or case name, for tables


def evaluation_time(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, EVALUATION_HOUR, tzinfo=UTC)


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None


def _entries(bundle: Mapping[str, Any]) -> tuple[list[Resource], dict[str, Resource]]:
    resources: list[Resource] = []
    full_urls: dict[str, Resource] = {}
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            resources.append(resource)
            if isinstance(entry.get("fullUrl"), str):
                full_urls[entry["fullUrl"]] = resource
    return resources, full_urls


def _one_patient(resources: list[Resource], where: str, patient_id: str | None) -> str:
    ids = [r.get("id") for r in resources if r.get("resourceType") == "Patient"]
    if patient_id:
        if patient_id not in ids:
            raise InputError(f"{where}: no Patient/{patient_id} in the record")
        return patient_id
    if len(ids) != 1 or not isinstance(ids[0], str):
        found = "no Patient" if not ids else f"{len(ids)} Patients"
        raise InputError(f"{where}: {found}; a record holds exactly one patient (choose one with --patient)")
    return ids[0]


def from_document(doc: Any, where: str, patient_id: str | None = None) -> PatientInput:
    """A Bundle, a sandbox story / fixture base (`bundle` + `draft_orders`), or a list of resources."""
    if isinstance(doc, Mapping) and "bundle" in doc and isinstance(doc["bundle"], Mapping):
        resources, full_urls = _entries(doc["bundle"])
        anchor = doc.get("anchor_date")
        return PatientInput(
            patient_id=_one_patient(resources, where, patient_id or doc.get("patient_id")),
            resources=resources,
            draft_orders=copy.deepcopy(list(doc.get("draft_orders") or [])),
            full_urls=full_urls,
            user_id=doc.get("user_id"),
            encounter_id=doc.get("encounter_id"),
            as_of=date.fromisoformat(anchor) if isinstance(anchor, str) else None,
            source=where,
            label=str(doc.get("id") or Path(where).stem),
        )
    if isinstance(doc, Mapping) and doc.get("resourceType") == "Bundle":
        resources, full_urls = _entries(doc)
    elif isinstance(doc, list) and all(isinstance(r, Mapping) for r in doc):
        resources, full_urls = [dict(r) for r in doc], {}
    elif isinstance(doc, Mapping) and doc.get("resourceType") == "Patient":
        resources, full_urls = [dict(doc)], {}
    else:
        raise InputError(f"{where}: not a FHIR Bundle, a sandbox story or a list of resources")
    pid = _one_patient(resources, where, patient_id)
    return PatientInput(pid, resources, full_urls=full_urls, source=where, label=pid)


def load_patient(path: str | Path, patient_id: str | None = None) -> PatientInput:
    return from_document(read_json(path), str(path), patient_id)


def load_orders(path: str | Path) -> list[Resource]:
    """Draft orders from a resource, a Bundle of them or a list."""
    doc = read_json(path)
    if isinstance(doc, Mapping) and doc.get("resourceType") == "Bundle":
        orders, _ = _entries(doc)
    elif isinstance(doc, list):
        orders = [o for o in doc if isinstance(o, dict)]
    elif isinstance(doc, dict) and isinstance(doc.get("resourceType"), str):
        orders = [doc]
    else:
        raise InputError(f"{path}: not a draft order resource, a Bundle of them or a list")
    for order in orders:
        if not order.get("id"):
            raise InputError(f"{path}: every draft order needs an id ({order.get('resourceType')} has none)")
    return orders


# --- the service's queries, applied offline -------------------------------------------------------------
def _split(value: str, sep: str) -> list[str]:
    """Split on `sep` not escaped with a backslash (FHIR search escaping); parts stay escaped."""
    return re.split(rf"(?<!\\){re.escape(sep)}", value)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


@dataclass(frozen=True)
class _Search:
    resource_type: str
    codes: frozenset[tuple[str, str]] | None  # (system, code) tokens of `code=`, None when the query has none
    statuses: frozenset[str] | None

    def accepts(self, resource: Resource) -> bool:
        if self.statuses is not None and resource.get("status") not in self.statuses:
            return False
        if self.codes is not None:
            concept = resource.get("code")
            codings = concept.get("coding") if isinstance(concept, Mapping) else None
            found = {(c.get("system"), c.get("code")) for c in codings or [] if isinstance(c, Mapping)}
            if not found & self.codes:
                return False
        return True


def _searches(mappings: Mappings) -> list[_Search]:
    out = []
    for query in mappings.queries.queries.values():
        parts = urlsplit(query.template)
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        codes = None
        if "code" in params:
            tokens = set()
            for token in _split(params["code"], ","):
                parts = _split(token, "|")
                system, code = (parts[0], parts[-1]) if len(parts) > 1 else ("", parts[0])
                tokens.add((_unescape(system), _unescape(code)))
            codes = frozenset(tokens)
        statuses = frozenset(params["status"].split(",")) if "status" in params else None
        out.append(_Search(query.resource_type, codes, statuses))
    return out


def build_record(
    patient: PatientInput,
    mappings: Mappings,
    now: datetime,
    draft_orders: Iterable[Resource] | None = None,
    unavailable: Iterable[str] = (),
) -> PatientRecord:
    """The PatientRecord the service would have gathered for this patient (see the module docstring)."""
    searches = _searches(mappings)
    by_type: dict[str, list[_Search]] = {}
    for search in searches:
        by_type.setdefault(search.resource_type, []).append(search)
    missing = set(unavailable)
    kept = []
    for resource in patient.resources:
        rtype = resource.get("resourceType")
        if rtype in missing:
            continue
        rules = by_type.get(rtype)
        if rules and rtype != "Patient" and not any(s.accepts(resource) for s in rules):
            continue
        kept.append(resource)
    queries = {
        key: QueryOutcome(
            key,
            query.supplies,
            Availability.UNAVAILABLE if set(query.supplies) & missing else Availability.READ,
            "bundle",
        )
        for key, query in mappings.queries.queries.items()
    }
    return PatientRecord(
        patient_id=patient.patient_id,
        now=now,
        resources=kept,
        queries=queries,
        draft_orders=list(patient.draft_orders if draft_orders is None else draft_orders),
        user_id=patient.user_id,
        encounter_id=patient.encounter_id,
        references_resolvable=True,
        full_urls=patient.full_urls,
    )


# --- assumed orders ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AssumedOrder:
    id: str
    label: str
    resource: Resource


def assumed_orders() -> list[AssumedOrder]:
    doc = yaml.safe_load(ASSUMED_ORDERS_FILE.read_text(encoding="utf-8"))
    return [AssumedOrder(o["id"], o["label"], o["resource"]) for o in doc["orders"]]


def _fill(node: Any, values: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, str):
        return re.sub(r"\{(patient|date)\}", lambda m: values[m.group(1)], node)
    return node


def assumed_order(order: AssumedOrder, patient_id: str, day: date) -> Resource:
    return _fill(copy.deepcopy(order.resource), {"patient": patient_id, "date": day.isoformat()})


def choose_assumed(
    mappings: Mappings, patient: PatientInput, now: datetime, policy_id: str | None, kind: str = "auto"
) -> tuple[AssumedOrder, Resource, list[OrderGroup]] | None:
    """The assumed order for this patient: `kind` by id, or (auto) the first kind the policy evaluates on its
    criteria; None when no assumed order concerns the policy."""
    from fhir_mappings.engine import evaluate_policy  # here: records must not import the engine at module level

    candidates = [o for o in assumed_orders() if kind in ("auto", o.id)]
    if not candidates:
        raise InputError(f"unknown order kind {kind!r} (known: auto, {', '.join(o.id for o in assumed_orders())})")
    policy = mappings.policies.get(policy_id) if policy_id else None
    first: tuple[AssumedOrder, Resource, list[OrderGroup]] | None = None
    for candidate in candidates:
        resource = assumed_order(candidate, patient.patient_id, now.date())
        groups = mappings.triage([resource])
        if not groups:
            continue
        if policy is None:
            return candidate, resource, groups
        if groups[0].kind not in policy.applies_to:
            continue
        first = first or (candidate, resource, groups)
        record = build_record(patient, mappings, now, [resource])
        decision = evaluate_policy(policy, record, groups[0], coverage_ref=None, version=mappings.version)
        scope_ids = {s.id for s in policy.scope}
        if decision is not None and not (decision.criteria and decision.criteria[0].id in scope_ids):
            return candidate, resource, groups
        if kind != "auto":
            return candidate, resource, groups
    return first
