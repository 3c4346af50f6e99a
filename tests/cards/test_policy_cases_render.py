"""Every shipped policy case, decided by the real engine, renders to a conformant response in CRD 2.0 and 2.2.

The hand-built decisions in the other tests pin the rendering rules; this one catches what the engine
really produces (evidence notes, scope rules, services) that hand-built decisions might not anticipate.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from cards import CRD_VERSIONS, build_response, conformance_problems
from cards.config import CARD_TYPE_SYSTEMS
from cards.coverage import COVERAGE_INFORMATION_URL
from cards.text import md_cell
from fhir_mappings.engine import evaluate_policy
from fhir_mappings.model import Decision
from fhir_mappings.policies.test_policy_cases import CASES, build_case, engine_for

HOOK = "5b1e9a42-1f0c-4c8e-9e57-6a0d2b3c4d5e"
TODAY = date(2026, 1, 15)
IDS = [f"{p.parent.name.removesuffix('.cases')}/{p.stem}" for p in CASES]


def decide(path: Path) -> tuple[dict[str, Any], Any, Decision | None]:
    case, record, policy_id = build_case(path)
    engine = engine_for(path.parent)
    groups = engine.classifier.classify(record.draft_orders)
    decision = evaluate_policy(
        engine.policies[policy_id], record, groups[0], coverage_ref="Coverage/case", version="test"
    )
    return case, record, decision


def render(record: Any, decision: Decision | None, version: str) -> dict[str, Any]:
    return build_response(
        [decision] if decision else [],
        record.draft_orders,
        hook_instance=HOOK,
        patient_id=record.patient_id,
        user_id=record.user_id or "Practitioner/case",
        today=TODAY,
        crd_version=version,
    )


def ci_parts(action: dict[str, Any]) -> list[dict[str, Any]]:
    [extension] = [e for e in action["resource"]["extension"] if e["url"] == COVERAGE_INFORMATION_URL]
    return extension["extension"]


def codes(parts: list[dict[str, Any]], url: str) -> list[str]:
    return [p["valueCode"] for p in parts if p["url"] == url]


@pytest.mark.parametrize("version", CRD_VERSIONS)
@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_case_renders_conformant(path: Path, version: str) -> None:
    _case, record, decision = decide(path)
    response = render(record, decision, version)
    assert conformance_problems(response, record.draft_orders, crd_version=version) == []
    if decision is None:
        assert response == {"cards": [], "systemActions": []}
        return
    [card] = response["cards"]
    assert len(card["summary"]) <= 139
    assert card["source"]["topic"]["system"] == CARD_TYPE_SYSTEMS[version]
    assert len(response["systemActions"]) == len(decision.order_refs)
    for criterion in decision.criteria:
        if criterion.missing and criterion.status.value == "unknown":
            assert md_cell(criterion.missing) in card["detail"]


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_case_in_22_differs_from_20_only_where_22_says(path: Path) -> None:
    """Same cards apart from the card-type system; the 2.2 extension adds to the 2.0 one, changing codes only
    for data that could not be read (the cases that say `unavailable`)."""
    case, record, decision = decide(path)
    if decision is None:
        return
    old, new = render(record, decision, "2.0"), render(record, decision, "2.2")
    for card in new["cards"]:
        card["source"]["topic"]["system"] = CARD_TYPE_SYSTEMS["2.0"]
    assert new["cards"] == old["cards"]
    for before, after in zip(old["systemActions"], new["systemActions"], strict=True):
        was, now = ci_parts(before), ci_parts(after)
        unread = bool(case.get("unavailable")) and decision.outcome.value == "documentation-needed"
        assert ("indeterminate" in codes(now, "covered") + codes(now, "doc-needed")) == unread
        if not unread:
            for url in ("covered", "pa-needed", "doc-needed", "doc-purpose", "info-needed"):
                assert codes(now, url) == codes(was, url), url
        links = [p for p in now if p["url"] == "detail"]
        assert links and all(
            {"category", "code", "value", "qualification"} == {e["url"] for e in link["extension"]} for link in links
        )
        expiry = [p["valueDate"] for p in now if p["url"] == "expiry-date"]
        if decision.outcome.value in ("likely-authorized", "documentation-needed") and decision.authorization_days:
            assert expiry == [(TODAY + timedelta(days=decision.authorization_days - 1)).isoformat()]
        else:
            assert expiry == []
        assert [p for p in was if p["url"] in ("expiry-date", "detail")] == []


def test_unreadable_medications_make_the_22_assertion_indeterminate_with_a_technical_reason() -> None:
    path = next(p for p in CASES if p.stem == "medications-unavailable")
    _case, record, decision = decide(path)
    [action] = render(record, decision, "2.2")["systemActions"]
    parts = ci_parts(action)
    # the prior-ketamine exclusion could not be read: an exclusion that holds would mean not covered
    assert codes(parts, "covered") == ["indeterminate"]
    assert codes(parts, "pa-needed") == ["auth-needed"]  # MGB 031 requires prior authorization whatever the data
    assert codes(parts, "doc-needed") == ["indeterminate"] and codes(parts, "doc-purpose") == []
    [reason] = [p["valueCodeableConcept"] for p in parts if p["url"] == "reason"]
    assert reason["coding"] == [
        {
            "system": "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp",
            "code": "technical",
            "display": "Technical issues",
        }
    ]
    assert "MedicationStatement" in reason["text"] and "could not be read" in reason["text"]
    assert "coverage not determined" in action["description"]
    # the same case in 2.0: documentation needed, as before
    [action20] = render(record, decision, "2.0")["systemActions"]
    assert codes(ci_parts(action20), "doc-needed") == ["clinical"]
