"""Data-shape matrices (`<policy>.matrix.yaml`): every FHIR representation a criterion accepts or deliberately
rejects, as a test — plus two properties over generated combinations of them:

- representation invariance: any combination of *neutral* shapes (accepted shapes that give the base record's
  status) keeps the likely-authorized base record likely-authorized;
- safety: any combination that includes a *breaking* shape (one that makes a requirement not met / unknown,
  or makes an exclusion hold / unknown) is never likely-authorized.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_mappings.engine import evaluate_policy
from fhir_mappings.model import CriterionKind, Decision, Outcome
from fhir_mappings.policies.test_policy_cases import build_record, engine_for

HERE = Path(__file__).parent
MATRICES = sorted(HERE.glob("*.matrix.yaml"))
_PATCH_KEYS = {"set", "remove", "add", "order_set", "add_orders", "unavailable", "now", "draft_orders"}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _merge(patches: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for patch in patches:
        for key, value in patch.items():
            if key == "now":
                merged["now"] = value
            else:
                merged.setdefault(key, []).extend(copy.deepcopy(value))
    return merged


def shapes() -> list[tuple[str, str, dict[str, Any], Path]]:
    """(policy, criterion, shape with its full patch, cases folder) for every shape of every matrix. A criterion
    evaluated on another phase names a fixture case (`base_case`) whose patch is applied first."""
    out = []
    for path in MATRICES:
        doc = load(path)
        cases_dir = HERE / Path(doc["base"]).parent
        for criterion, spec in doc["criteria"].items():
            before = json.loads((cases_dir / spec["base_case"]).read_text()) if spec.get("base_case") else {}
            before = {k: v for k, v in before.items() if k in _PATCH_KEYS}
            for shape in spec["shapes"]:
                full = {**shape, "patch": _merge([before, shape["patch"]]), "own_patch": shape["patch"]}
                out.append((doc["policy"], criterion, full, cases_dir))
    return out


SHAPES = shapes()


def decide(policy_id: str, cases_dir: Path, patch: dict[str, Any]) -> Decision:
    engine = engine_for(cases_dir)
    record = build_record(copy.deepcopy(patch), cases_dir)
    groups = engine.classifier.classify(record.draft_orders)
    decision = evaluate_policy(engine.policies[policy_id], record, groups[0], coverage_ref="Coverage/m", version="m")
    assert decision is not None, "the policy fell silent"
    return decision


def test_matrices_are_well_formed() -> None:
    assert MATRICES, "no data-shape matrix found"
    for path in MATRICES:
        doc = load(path)
        engine = engine_for(HERE / Path(doc["base"]).parent)
        policy = engine.policies[doc["policy"]]
        known = {c.id for c in policy.criteria}
        assert set(doc["criteria"]) <= known, f"{path.name}: unknown criteria {set(doc['criteria']) - known}"
        ids: set[str] = set()
        for criterion, spec in doc["criteria"].items():
            assert spec.get("reader"), f"{path.name} {criterion}: say where the criterion's data is read"
            accepted = [s for s in spec["shapes"] if s["accepted"]]
            assert accepted, f"{path.name} {criterion}: no accepted shape"
            for shape in spec["shapes"]:
                key = f"{criterion}/{shape['id']}"
                assert key not in ids, f"{path.name}: duplicate shape {key}"
                ids.add(key)
                assert shape["status"] in ("met", "not-met", "unknown"), key
                assert shape.get("shape"), f"{key}: describe the FHIR shape"
                assert shape["accepted"] or shape.get("why"), f"{key}: a rejected shape says why"
                assert set(shape["patch"]) <= _PATCH_KEYS, f"{key}: unknown patch keys"
            if spec.get("base_case"):
                assert (HERE / Path(doc["base"]).parent / spec["base_case"]).is_file(), f"{criterion}: no base_case"


@pytest.mark.parametrize("policy_id", sorted({load(p)["policy"] for p in MATRICES}))
def test_every_criterion_of_the_policy_has_a_matrix(policy_id: str) -> None:
    path = next(p for p in MATRICES if load(p)["policy"] == policy_id)
    doc = load(path)
    engine = engine_for(HERE / Path(doc["base"]).parent)
    missing = [c.id for c in engine.policies[policy_id].criteria if c.id not in doc["criteria"]]
    assert not missing, f"{path.name}: criteria without a data-shape matrix: {missing}"


def test_the_base_record_is_likely_authorized() -> None:
    for path in MATRICES:
        doc = load(path)
        decision = decide(doc["policy"], HERE / Path(doc["base"]).parent, {})
        assert decision.outcome is Outcome.LIKELY_AUTHORIZED, (path.name, decision.headline)


@pytest.mark.parametrize(
    ("policy_id", "criterion", "shape", "cases_dir"),
    SHAPES,
    ids=[f"{p}/{c}/{s['id']}" for p, c, s, _ in SHAPES],
)
def test_shape_gives_the_status_the_matrix_says(
    policy_id: str, criterion: str, shape: dict[str, Any], cases_dir: Path
) -> None:
    decision = decide(policy_id, cases_dir, shape["patch"])
    result = next((c for c in decision.criteria if c.id == criterion), None)
    assert result is not None, f"{criterion} not evaluated (phase {decision.phase})"
    assert result.status.value == shape["status"], (
        f"{shape['shape']}: {result.status.value} != {shape['status']} — {result.explanation}"
        f" | evidence: {[(e.reference, e.note) for e in result.evidence[:4]]}"
    )
    if "outcome" in shape:
        assert decision.outcome.value == shape["outcome"]
    if _breaking(decision, criterion, shape["status"]):
        assert decision.outcome is not Outcome.LIKELY_AUTHORIZED


def _base_status(decision: Decision, criterion: str) -> str:
    kind = next(c.kind for c in decision.criteria if c.id == criterion)
    return "met" if kind is CriterionKind.REQUIREMENT else "not-met"


def _breaking(decision: Decision, criterion: str, status: str) -> bool:
    return status != _base_status(decision, criterion)


def _targets(patch: dict[str, Any]) -> set[str]:
    refs = {c["ref"] for c in patch.get("set", [])} | set(patch.get("remove", []))
    refs |= {f"{r['resourceType']}/{r['id']}" for r in patch.get("add", [])}
    if patch.get("order_set") or patch.get("add_orders") or patch.get("draft_orders"):
        refs.add("<orders>")
    if patch.get("unavailable"):
        refs.add("<unavailable>")
    return refs


def _combinable(pool: list[tuple[str, dict[str, Any]]]) -> st.SearchStrategy[list[tuple[str, dict[str, Any]]]]:
    """Subsets of shapes from different criteria whose patches touch different resources."""

    def disjoint(chosen: list[tuple[str, dict[str, Any]]]) -> bool:
        seen: set[str] = set()
        criteria: set[str] = set()
        for criterion, shape in chosen:
            targets = _targets(shape["patch"])
            if criterion in criteria or targets & seen:
                return False
            criteria.add(criterion)
            seen |= targets
        return True

    return st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique_by=lambda s: s[1]["id"]).filter(disjoint)


def _pools(policy_id: str) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]], Path]:
    path = next(p for p in MATRICES if load(p)["policy"] == policy_id)
    doc = load(path)
    cases_dir = HERE / Path(doc["base"]).parent
    base = decide(policy_id, cases_dir, {})
    neutral, breaking = [], []
    for criterion, spec in doc["criteria"].items():
        if spec.get("base_case"):
            continue  # evaluated on another phase's record: not combinable with the base's shapes
        for shape in spec["shapes"]:
            if not shape["patch"]:
                continue
            (breaking if _breaking(base, criterion, shape["status"]) else neutral).append((criterion, shape))
    return neutral, breaking, cases_dir


POLICY_IDS = sorted({load(p)["policy"] for p in MATRICES})


@pytest.mark.parametrize("policy_id", POLICY_IDS)
def test_any_combination_of_neutral_shapes_stays_likely_authorized(policy_id: str) -> None:
    neutral, _breaking_shapes, cases_dir = _pools(policy_id)

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much])
    @given(_combinable(neutral))
    def check(chosen: list[tuple[str, dict[str, Any]]]) -> None:
        decision = decide(policy_id, cases_dir, _merge([s["patch"] for _, s in chosen]))
        assert decision.outcome is Outcome.LIKELY_AUTHORIZED, (
            [s["id"] for _, s in chosen],
            decision.headline,
        )

    check()


@pytest.mark.parametrize("policy_id", POLICY_IDS)
def test_no_combination_with_a_breaking_shape_is_likely_authorized(policy_id: str) -> None:
    neutral, breaking, cases_dir = _pools(policy_id)

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much])
    @given(st.sampled_from(breaking), _combinable(neutral) | st.just([]))
    def check(bad: tuple[str, dict[str, Any]], others: list[tuple[str, dict[str, Any]]]) -> None:
        chosen = [bad] + [
            o for o in others if o[0] != bad[0] and not (_targets(o[1]["patch"]) & _targets(bad[1]["patch"]))
        ]
        decision = decide(policy_id, cases_dir, _merge([s["patch"] for _, s in chosen]))
        assert decision.outcome is not Outcome.LIKELY_AUTHORIZED, ([s["id"] for _, s in chosen], decision.headline)

    check()
