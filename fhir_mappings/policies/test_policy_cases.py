"""Policy fixture tests, in the spirit of OPA's `*_test.rego`: next to each policy file, a folder
`<policy>.cases/` holds a base patient (`base.json`) and one JSON file per case that patches it and states
the expected outcome, phase and criterion statuses. A failing case prints its description and the
criteria that differ, so an informaticist can read the test like the policy.

Case file keys: description, base (default base.json), now (ISO date, default the base's anchor_date),
set [{ref, path, value}] (dotted path; null deletes), remove [Type/id or Type/id-prefix*], add [resources]
(replace when Type/id exists), draft_orders (replaces the orders), order_set [{path, value}] (patch the
first draft order), add_orders [resources] (appended to the draft orders after order_set, e.g. an oral
antidepressant signed together with the ketamine), unavailable [resource types not read], expect {outcome,
phase, service (policies with `phase_name: service`, e.g. MP-054 "integration-therapy"), criteria {id: status},
case_by_case [criterion ids the decision must flag for individual case review], notes_contain [text],
notes_exclude [text no note may contain]}. Outcome "none" expects the policy to stay silent (a silent scope
rule: no decision at all). A scope rule that decides (e.g. not-covered) is reported as a criterion with the
rule's id and status not-met, so `criteria` can name it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fhir_mappings.mappings import Mappings, load_engine
from fhir_mappings.record import PatientRecord
from fhir_mappings.tools import cases
from fhir_mappings.tools.cases import Engines, case_files, check_case, evaluate_case

HERE = Path(__file__).parent
ENGINES = Engines(HERE.parent, base=load_engine())  # the cases' own format lives in fhir_mappings.tools.cases
CASES = case_files(HERE.parent)


def engine_for(cases_dir: Path) -> Mappings:
    """The shipped mappings, plus the folder's `site.yaml` (e.g. credentialed clinics) when it has one."""
    return ENGINES.for_folder(cases_dir)


def build_case(path: Path) -> tuple[dict[str, Any], PatientRecord, str]:
    return cases.build_case(path, engine_for(path.parent))


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name.removesuffix('.cases')}/{p.stem}" for p in CASES])
def test_policy_case(path: Path) -> None:
    evaluated = evaluate_case(path, ENGINES.for_folder(path.parent))
    problems = [
        f"{m.what}: {m.got} != expected {m.expected}" + (f" — {m.note}" if m.note else "")
        for m in check_case(evaluated.case, evaluated.decision)
    ]
    assert not problems, f"{evaluated.case['description']}\n  " + "\n  ".join(problems)


def test_every_policy_has_cases() -> None:
    engine = load_engine()
    for policy_id in engine.policies:
        assert (HERE / f"{policy_id}.cases" / "base.json").is_file(), f"{policy_id} has no fixture cases"
