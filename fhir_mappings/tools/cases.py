"""Policy fixture cases (`policies/<policy>.cases/*.json`) and criterion coverage, for `mappings test`.

The case format (see `policies/test_policy_cases.py`, which runs the same cases under pytest): a folder next to
each policy holds a base patient (`base.json`) and one JSON file per case that patches it and states the
expected outcome, phase/service and criterion statuses. An informaticist adds a case by adding a file.

Coverage counts, for every criterion, which rule branches the cases reach — met, not-met, unknown, lifted
(an exclusion cleared by documentation), case-by-case — so a branch no case exercises is visible.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fhir_mappings.engine import evaluate_policy
from fhir_mappings.facts import FactContext
from fhir_mappings.mappings import MAPPINGS_DIR, Mappings, SiteConfig
from fhir_mappings.model import CriterionKind, CriterionResult, Decision
from fhir_mappings.orders import OrderGroup
from fhir_mappings.policy import Policy
from fhir_mappings.record import Availability, PatientRecord, QueryOutcome

BRANCHES = ("met", "not-met", "unknown", "lifted", "case-by-case")


class CaseError(ValueError):
    """A case file cannot be built (bad JSON, a patch naming a resource the base lacks, ...)."""


def case_files(directory: Path = MAPPINGS_DIR) -> list[Path]:
    policies = Path(directory) / "policies"
    return sorted(p for d in policies.glob("*.cases") for p in d.glob("*.json") if p.name != "base.json")


class Engines:
    """The mapping set of one directory, plus each case folder's `site.yaml` where it has one."""

    def __init__(self, directory: Path = MAPPINGS_DIR, base: Mappings | None = None) -> None:
        self.directory = Path(directory)
        self._base = base
        self._sites: dict[Path, Mappings] = {}

    def for_folder(self, folder: Path) -> Mappings:
        site = folder / "site.yaml"
        if not site.is_file():
            if self._base is None:
                self._base = Mappings.load(None, self.directory)
            return self._base
        if site not in self._sites:
            self._sites[site] = Mappings.load(SiteConfig.from_file(site), self.directory)
        return self._sites[site]


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


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CaseError(f"{path.name}: cannot read: {exc}") from None


def build_case(path: Path, engine: Mappings) -> tuple[dict[str, Any], PatientRecord, str]:
    """(case, record, policy id) — the base patient with the case's patches applied."""
    case = _read(path)
    try:
        record = record_from_case(case, path.parent, engine)
    except CaseError as exc:
        raise CaseError(f"{path.name}: {exc}") from None
    return case, record, path.parent.name.removesuffix(".cases")


def record_from_case(case: dict[str, Any], cases_dir: Path, engine: Mappings) -> PatientRecord:
    """The base patient of a `.cases` folder with a case's patch applied (set / remove / add / draft_orders /
    order_set / add_orders / unavailable / now): the one reading of the case format, for the tools and pytest."""
    base_name = case.get("base", "base.json")
    base = _read(cases_dir / base_name)
    try:
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
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CaseError(f"the patch does not fit the base patient ({type(exc).__name__}: {exc})") from None
    unavailable = set(case.get("unavailable", []))
    queries = {
        t: QueryOutcome(t, (t,), Availability.UNAVAILABLE if t in unavailable else Availability.READ, "prefetch")
        for t in engine.queries.supplied_types()
    }
    return PatientRecord(
        patient_id=base["patient_id"],
        now=now,
        resources=[r for k, r in resources.items() if k.split("/")[0] not in unavailable],
        queries=queries,
        draft_orders=orders,
        user_id=base.get("user_id"),
        encounter_id=base.get("encounter_id"),
        references_resolvable=True,
    )


@dataclass
class EvaluatedCase:
    case: dict[str, Any]
    decision: Decision | None  # None: the policy stays silent (a silent scope rule)
    policy_id: str
    record: PatientRecord
    group: OrderGroup


def evaluate_case(path: Path, engine: Mappings) -> EvaluatedCase:
    case, record, policy_id = build_case(path, engine)
    if policy_id not in engine.policies:
        raise CaseError(f"{path.parent.name}: no policy {policy_id!r} in the mapping set")
    groups = engine.classifier.classify(record.draft_orders)
    if not groups:
        raise CaseError(f"{path.name}: no ketamine-related draft order")
    policy = engine.policies[policy_id]
    decision = evaluate_policy(policy, record, groups[0], coverage_ref="Coverage/case", version=engine.version)
    return EvaluatedCase(case, decision, policy_id, record, groups[0])


def silent_scope(policy: Policy, evaluated: EvaluatedCase) -> str | None:
    """The silent scope rule that ended the evaluation without a decision."""
    ctx = FactContext(policy.library, evaluated.record, evaluated.group)
    return next((s.id for s in policy.scope if s.when.evaluate(ctx).value is True), None)


@dataclass(frozen=True)
class Mismatch:
    what: str  # "outcome", "phase", "service", a criterion id, "case_by_case", "notes"
    expected: str
    got: str
    note: str = ""


def check_case(case: dict[str, Any], decision: Decision | None) -> list[Mismatch]:
    """Differences between what the case expects and what the policy decided (empty: the case passes)."""
    expect = case.get("expect") or {}
    got_outcome = decision.outcome.value if decision else "none"
    if expect.get("outcome") == "none" or decision is None:
        if got_outcome != expect.get("outcome"):
            return [Mismatch("outcome", str(expect.get("outcome")), got_outcome, decision.headline if decision else "")]
        return []
    out: list[Mismatch] = []
    if got_outcome != expect.get("outcome"):
        out.append(Mismatch("outcome", str(expect.get("outcome")), got_outcome, decision.headline))
    for key in ("phase", "service"):
        if key in expect and getattr(decision, key) != expect[key]:
            out.append(Mismatch(key, str(expect[key]), str(getattr(decision, key))))
    results = {c.id: c for c in decision.criteria}
    for cid, status in (expect.get("criteria") or {}).items():
        result = results.get(cid)
        if result is None:
            out.append(Mismatch(cid, status, "not evaluated", f"phase {decision.phase or decision.service}"))
        elif result.status.value != status:
            out.append(Mismatch(cid, status, result.status.value, result.explanation or result.missing))
    for cid in expect.get("case_by_case", []):
        result = results.get(cid)
        if result is None or not result.case_by_case:
            out.append(Mismatch(cid, "case-by-case", "not flagged"))
    for cid in expect.get("lifted", []):
        result = results.get(cid)
        if result is None or not result.cleared_by:
            out.append(Mismatch(cid, "lifted", "not lifted"))
    for text in expect.get("notes_contain", []):
        if not any(text in note for note in decision.notes):
            out.append(Mismatch("notes", f"a note containing {text!r}", "; ".join(decision.notes) or "no notes"))
    for text in expect.get("notes_exclude", []):
        if any(text in note for note in decision.notes):
            out.append(Mismatch("notes", f"no note containing {text!r}", "; ".join(decision.notes)))
    return out


def branch_of(result: CriterionResult) -> str:
    if result.case_by_case:
        return "case-by-case"
    if result.cleared_by:
        return "lifted"
    return result.status.value


def branches_of(policy: Policy) -> dict[str, tuple[str, ...]]:
    """The rule branches each criterion (and scope rule) can take, from its definition."""
    out: dict[str, tuple[str, ...]] = {}
    for scope in policy.scope:
        out[scope.id] = ("applies",)
    for c in policy.criteria:
        branches = ["met"]
        if (c.kind is CriterionKind.REQUIREMENT and c.not_met_when is not None) or c.kind is CriterionKind.EXCLUSION:
            branches.append("not-met")
        branches.append("unknown")
        if c.lifted_by is not None:
            branches.append("lifted")
        if c.case_by_case_when is not None:
            branches.append("case-by-case")
        out[c.id] = tuple(branches)
    return out


@dataclass
class CaseResult:
    policy: str
    name: str
    description: str
    mismatches: list[Mismatch] = field(default_factory=list)
    error: str | None = None
    outcome: str | None = None
    reached: dict[str, str] = field(default_factory=dict)  # criterion / scope id -> branch

    @property
    def passed(self) -> bool:
        return self.error is None and not self.mismatches

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy,
            "case": self.name,
            "description": self.description,
            "passed": self.passed,
            "outcome": self.outcome,
        }
        if self.error:
            out["error"] = self.error
        if self.mismatches:
            out["mismatches"] = [m.__dict__ for m in self.mismatches]
        return out


@dataclass
class Coverage:
    branches: dict[str, dict[str, tuple[str, ...]]]  # policy -> criterion -> possible branches
    counts: dict[str, dict[str, dict[str, int]]]  # policy -> criterion -> branch -> cases reaching it

    def totals(self) -> tuple[int, int]:
        total = sum(len(b) for crit in self.branches.values() for b in crit.values())
        covered = sum(
            1
            for policy, crit in self.branches.items()
            for cid, branches in crit.items()
            for b in branches
            if self.counts[policy][cid].get(b, 0) > 0
        )
        return covered, total

    @property
    def percent(self) -> float:
        covered, total = self.totals()
        return 100.0 * covered / total if total else 100.0

    def uncovered(self) -> list[tuple[str, str, str]]:
        return [
            (policy, cid, b)
            for policy, crit in self.branches.items()
            for cid, branches in crit.items()
            for b in branches
            if self.counts[policy][cid].get(b, 0) == 0
        ]

    def to_json(self) -> dict[str, Any]:
        covered, total = self.totals()
        return {
            "covered": covered,
            "total": total,
            "percent": round(self.percent, 1),
            "criteria": {
                policy: {
                    cid: {b: self.counts[policy][cid].get(b, 0) for b in branches} for cid, branches in crit.items()
                }
                for policy, crit in self.branches.items()
            },
            "uncovered": [{"policy": p, "criterion": c, "branch": b} for p, c, b in self.uncovered()],
        }


def run_cases(directory: Path = MAPPINGS_DIR, paths: Iterable[Path] | None = None) -> tuple[list[CaseResult], Coverage]:
    engines = Engines(directory)
    results: list[CaseResult] = []
    counts: dict[str, dict[str, dict[str, int]]] = {}
    branches: dict[str, dict[str, tuple[str, ...]]] = {}
    for path in paths if paths is not None else case_files(directory):
        policy_id = path.parent.name.removesuffix(".cases")
        result = CaseResult(policy_id, path.stem, "")
        try:
            engine = engines.for_folder(path.parent)
            evaluated = evaluate_case(path, engine)
            case, decision, policy_id = evaluated.case, evaluated.decision, evaluated.policy_id
            result.description = str(case.get("description", ""))
            result.mismatches = check_case(case, decision)
            result.outcome = decision.outcome.value if decision else "none"
            policy = engine.policies[policy_id]
            branches.setdefault(policy_id, branches_of(policy))
            per = counts.setdefault(policy_id, {cid: {} for cid in branches[policy_id]})
            if decision is None:
                silent = silent_scope(policy, evaluated)
                if silent is not None:
                    result.reached[silent] = "applies"
                    per[silent]["applies"] = per[silent].get("applies", 0) + 1
            else:
                scope_ids = {s.id for s in policy.scope}
                for c in decision.criteria:
                    branch = "applies" if c.id in scope_ids else branch_of(c)
                    result.reached[c.id] = branch
                    if c.id in per:
                        per[c.id][branch] = per[c.id].get(branch, 0) + 1
        except Exception as exc:  # a broken case is reported as a row, never as a traceback
            result.error = f"{type(exc).__name__}: {exc}"
        results.append(result)
    return results, Coverage(branches, counts)
