"""Every shipped policy case, decided by the real engine, renders to a conformant response.

The hand-built decisions in the other tests pin the rendering rules; this one catches what the engine
really produces (evidence notes, scope rules, services) that hand-built decisions might not anticipate.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from cards import build_response, conformance_problems
from cards.text import md_cell
from fhir_mappings.engine import evaluate_policy
from fhir_mappings.policies.test_policy_cases import CASES, build_case, engine_for

HOOK = "5b1e9a42-1f0c-4c8e-9e57-6a0d2b3c4d5e"


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name.removesuffix('.cases')}/{p.stem}" for p in CASES])
def test_case_renders_conformant(path: Path) -> None:
    _case, record, policy_id = build_case(path)
    engine = engine_for(path.parent)
    groups = engine.classifier.classify(record.draft_orders)
    decision = evaluate_policy(
        engine.policies[policy_id], record, groups[0], coverage_ref="Coverage/case", version="test"
    )
    response = build_response(
        [decision] if decision else [],
        record.draft_orders,
        hook_instance=HOOK,
        patient_id=record.patient_id,
        user_id=record.user_id or "Practitioner/case",
        today=date(2026, 1, 15),
    )
    assert conformance_problems(response, record.draft_orders) == []
    if decision is None:
        assert response == {"cards": [], "systemActions": []}
        return
    [card] = response["cards"]
    assert len(card["summary"]) <= 139
    assert len(response["systemActions"]) == len(decision.order_refs)
    for criterion in decision.criteria:
        if criterion.missing and criterion.status.value == "unknown":
            assert md_cell(criterion.missing) in card["detail"]
