"""Valid order-sign requests to start from: the MGB 031 base patient (likely authorized from a complete
prefetch), the same order with nothing prefetched (for FHIR fallback), and a non-ketamine order (triage)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path
from typing import Any

from fhir_mappings.mappings import load_engine
from tests.harness import order_sign_request

BASE_CASE = Path(__file__).parents[2] / "fhir_mappings/policies/mgbhp-031.cases/base.json"


@cache
def base_case() -> dict[str, Any]:
    return json.loads(BASE_CASE.read_text())


def anchor_now() -> datetime:
    anchor = date.fromisoformat(base_case()["anchor_date"])
    return datetime(anchor.year, anchor.month, anchor.day, 17, 0, tzinfo=UTC)


def resources() -> list[dict[str, Any]]:
    return [copy.deepcopy(e["resource"]) for e in base_case()["bundle"]["entry"]]


def _searchset(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in items]}


def full_prefetch() -> dict[str, Any]:
    """Every discovery prefetch key, answered from the base patient's resources."""
    queries = load_engine().queries.queries
    pool = resources()
    prefetch: dict[str, Any] = {}
    used: set[int] = set()
    for key, query in queries.items():
        if query.is_read:
            found = [r for r in pool if r["resourceType"] == query.resource_type]
            prefetch[key] = found[0] if found else None
            used.update(id(r) for r in found[:1])
        else:
            items = [r for r in pool if r["resourceType"] in query.supplies]
            prefetch[key] = _searchset(items)
            used.update(id(r) for r in items)
    # Resources reached by reference (practitioners, organizations, locations) come as included entries.
    extra = [r for r in pool if id(r) not in used]
    prefetch["coverage"]["entry"].extend({"resource": r, "search": {"mode": "include"}} for r in extra)
    return prefetch


def hook_request(
    *,
    prefetch: dict[str, Any] | None = None,
    fhir_server: str | None = None,
    access_token: str | None = "ehr-access-token-123",
    draft_orders: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    case = base_case()
    orders = copy.deepcopy(case["draft_orders"]) if draft_orders is None else draft_orders
    return order_sign_request(
        orders,
        patient_id=case["patient_id"],
        user_id=case["user_id"],
        encounter_id=case["encounter_id"],
        prefetch=prefetch,
        fhir_server=fhir_server,
        access_token=access_token,
    )


def non_ketamine_order() -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": "amox-1",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{base_case()['patient_id']}"},
        "requester": {"reference": "Practitioner/prac-1"},
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "308182"}]
        },
    }
