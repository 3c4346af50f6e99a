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

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_mappings.engine import evaluate_policy
from fhir_mappings.mappings import Mappings, SiteConfig, load_engine
from fhir_mappings.record import Availability, PatientRecord, QueryOutcome

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


def _set_path(resource: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node: Any = resource
    for part in parts[:-1]:
        key: Any = int(part) if part.isdigit() else part
        if isinstance(node, dict) and key not in node:
            node[key] = {}
        node = node[key]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is None:
        if isinstance(node, dict):
            node.pop(last, None)
        else:
            del node[last]
    else:
        node[last] = value


def build_case(path: Path) -> tuple[dict[str, Any], PatientRecord, str]:
    case = json.loads(path.read_text())
    return case, build_record(case, path.parent), path.parent.name.removesuffix(".cases")


def build_record(case: dict[str, Any], cases_dir: Path) -> PatientRecord:
    """The base record of a `.cases` folder with a case's patch applied (set / remove / add / draft_orders /
    order_set / add_orders / unavailable / now)."""
    path = cases_dir / "case.json"
    base = json.loads((path.parent / case.get("base", "base.json")).read_text())
    resources = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}": copy.deepcopy(e["resource"])
        for e in base["bundle"]["entry"]
    }
    for pattern in case.get("remove", []):
        for key in [k for k in resources if k == pattern or (pattern.endswith("*") and k.startswith(pattern[:-1]))]:
            del resources[key]
    for resource in case.get("add", []):
        resources[f"{resource['resourceType']}/{resource['id']}"] = resource
    for change in case.get("set", []):
        _set_path(resources[change["ref"]], change["path"], change["value"])
    orders = copy.deepcopy(case.get("draft_orders", base["draft_orders"]))
    for change in case.get("order_set", []):
        _set_path(orders[0], change["path"], change["value"])
    orders.extend(copy.deepcopy(case.get("add_orders", [])))
    now = datetime.fromisoformat(case.get("now", base["anchor_date"]) + "T17:00:00+00:00")
    engine = engine_for(path.parent)
    unavailable = set(case.get("unavailable", []))
    queries = {
        t: QueryOutcome(t, (t,), Availability.UNAVAILABLE if t in unavailable else Availability.READ, "prefetch")
        for t in engine.queries.supplied_types()
    }
    record = PatientRecord(
        patient_id=base["patient_id"],
        now=now,
        resources=[r for k, r in resources.items() if k.split("/")[0] not in unavailable],
        queries=queries,
        draft_orders=orders,
        user_id=base.get("user_id"),
        encounter_id=base.get("encounter_id"),
        references_resolvable=True,
    )
    return record


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name.removesuffix('.cases')}/{p.stem}" for p in CASES])
def test_policy_case(path: Path) -> None:
    case, record, policy_id = build_case(path)
    engine = engine_for(path.parent)
    groups = engine.classifier.classify(record.draft_orders)
    assert groups, f"{path.name}: no ketamine-related draft order"
    decision = evaluate_policy(
        engine.policies[policy_id], record, groups[0], coverage_ref="Coverage/case", version="test"
    )
    expect = case["expect"]
    if expect["outcome"] == "none" or decision is None:
        assert (decision is None) == (expect["outcome"] == "none"), (
            f"{case['description']}\n  outcome {decision.outcome.value if decision else 'none (silent)'} "
            f"!= expected {expect['outcome']}"
        )
        return
    statuses = {c.id: c.status.value for c in decision.criteria}
    problems = []
    if decision.outcome.value != expect["outcome"]:
        problems.append(f"outcome {decision.outcome.value} != expected {expect['outcome']} ({decision.headline})")
    if "phase" in expect and decision.phase != expect["phase"]:
        problems.append(f"phase {decision.phase} != expected {expect['phase']}")
    if "service" in expect and decision.service != expect["service"]:
        problems.append(f"service {decision.service} != expected {expect['service']}")
    for cid, status in expect.get("criteria", {}).items():
        if cid not in statuses:
            problems.append(f"criterion {cid} not evaluated (phase {decision.phase})")
        elif statuses[cid] != status:
            result = next(c for c in decision.criteria if c.id == cid)
            problems.append(f"{cid}: {statuses[cid]} != expected {status} — {result.explanation or result.missing}")
    for cid in expect.get("case_by_case", []):
        result = next((c for c in decision.criteria if c.id == cid), None)
        if result is None or not result.case_by_case:
            problems.append(f"{cid}: not flagged for case-by-case review")
    for cid in expect.get("lifted", []):
        result = next((c for c in decision.criteria if c.id == cid), None)
        if result is None or not result.cleared_by:
            problems.append(f"{cid}: not lifted by a clearance")
    for text in expect.get("notes_contain", []):
        if not any(text in note for note in decision.notes):
            problems.append(f"no note containing {text!r} in {decision.notes}")
    for text in expect.get("notes_exclude", []):
        if any(text in note for note in decision.notes):
            problems.append(f"a note contains {text!r}: {decision.notes}")
    assert not problems, f"{case['description']}\n  " + "\n  ".join(problems)


def test_every_policy_has_cases() -> None:
    engine = load_engine()
    for policy_id in engine.policies:
        assert (HERE / f"{policy_id}.cases" / "base.json").is_file(), f"{policy_id} has no fixture cases"


def test_every_rule_branch_is_reached_by_a_case() -> None:
    """Criterion coverage stays complete: a new criterion or branch (met, not-met, unknown, lifted, case-by-case)
    comes with a fixture case that reaches it (`ketamine-cds mappings test` lists what is uncovered)."""
    from fhir_mappings.tools.cases import run_cases

    _results, coverage = run_cases(HERE.parent)
    assert coverage.uncovered() == [], coverage.uncovered()
