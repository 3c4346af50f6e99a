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
case_by_case [criterion ids the decision must flag for individual case review], lifted [exclusion ids that hold
but are lifted by a clearance on record], notes_contain [text],
notes_exclude [text no note may contain]}. Outcome "none" expects the policy to stay silent (a silent scope
rule: no decision at all). A scope rule that decides (e.g. not-covered) is reported as a criterion with the
rule's id and status not-met, so `criteria` can name it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fhir_mappings.engine import evaluate_policy
from fhir_mappings.mappings import Mappings, SiteConfig, load_engine
from fhir_mappings.record import PatientRecord
from fhir_mappings.tools.cases import check_case, record_from_case, run_cases

HERE = Path(__file__).parent
_SITE_ENGINES: dict[Path, Mappings] = {}


def engine_for(cases_dir: Path) -> Mappings:
    """The shipped mappings, plus the folder's `site.yaml` (e.g. credentialed clinics) when it has one."""
    site = cases_dir / "site.yaml"
    if not site.is_file():
        return load_engine()
    if site not in _SITE_ENGINES:
        _SITE_ENGINES[site] = Mappings.load(SiteConfig.from_file(site))
    return _SITE_ENGINES[site]


CASES = sorted(p for d in HERE.glob("*.cases") for p in d.glob("*.json") if p.name != "base.json")


def build_case(path: Path) -> tuple[dict[str, Any], PatientRecord, str]:
    case = json.loads(path.read_text())
    return case, build_record(case, path.parent), path.parent.name.removesuffix(".cases")


def build_record(case: dict[str, Any], cases_dir: Path) -> PatientRecord:
    """The base record of a `.cases` folder with a case's patch applied — read exactly as the tools read it."""
    return record_from_case(case, cases_dir, engine_for(cases_dir))


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name.removesuffix('.cases')}/{p.stem}" for p in CASES])
def test_policy_case(path: Path) -> None:
    case, record, policy_id = build_case(path)
    engine = engine_for(path.parent)
    groups = engine.classifier.classify(record.draft_orders)
    assert groups, f"{path.name}: no ketamine-related draft order"
    decision = evaluate_policy(
        engine.policies[policy_id], record, groups[0], coverage_ref="Coverage/case", version="test"
    )
    problems = [f"{m.what}: {m.got} != expected {m.expected}" + (f" — {m.note}" if m.note else "")
                for m in check_case(case, decision)]  # fmt: skip
    assert not problems, f"{case['description']}\n  " + "\n  ".join(problems)


def test_every_policy_has_cases() -> None:
    engine = load_engine()
    for policy_id in engine.policies:
        assert (HERE / f"{policy_id}.cases" / "base.json").is_file(), f"{policy_id} has no fixture cases"


def test_every_rule_branch_is_reached_by_a_case() -> None:
    """Criterion coverage stays complete: a new criterion or branch (met, not-met, unknown, lifted, case-by-case)
    comes with a fixture case that reaches it (`ketamine-cds mappings test` lists what is uncovered)."""
    _results, coverage = run_cases(HERE.parent)
    assert coverage.uncovered() == [], coverage.uncovered()
