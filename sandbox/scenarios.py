"""Scenario files: one clinical story per JSON file, its FHIR data, the orders being signed and the expected advice.

A scenario is written as if today were its `anchor_date`; `Scenario.shifted(today)` moves every full date and
dateTime by the same number of days so that policy windows ("within 30 days", "6 weeks") keep their meaning
whenever the sandbox runs. The file format is documented in `sandbox/patients/README.md`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from cds_service.hook_request import ORDER_TYPES
from fhir_mappings.model import Outcome

PATIENTS_DIR = Path(__file__).resolve().parent / "patients"
BACKGROUND_SUBDIR = "background"

# Request resources that can appear in order-sign `draftOrders` (R4 + the types Da Vinci CRD adds).
REQUEST_RESOURCE_TYPES = frozenset(ORDER_TYPES)  # what the service accepts as draft orders, one definition
USER_RESOURCE_TYPES = ("Practitioner", "PractitionerRole")
PHASES = frozenset({"initial", "reauthorization"})
OUTCOMES = frozenset(outcome.value for outcome in Outcome)

_REQUIRED_KEYS = ("id", "title", "description", "anchor_date", "patient_id", "user_id", "draft_orders", "bundle")
_OPTIONAL_KEYS = ("encounter_id", "expected", "expect_no_cards", "background", "tags")
_EXPECTED_KEYS = frozenset({"order", "policy", "outcome", "phase"})

# FHIR `id` datatype: 1-64 of [A-Za-z0-9-.]
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_FULL_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})$")
# dateTime / instant with a time part; the zone is kept verbatim (FHIR requires one when a time is given,
# a missing zone is tolerated and kept missing).
_DATE_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2})(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)$")

# Values under these keys are never shifted, even when they look like dates: they name things rather than
# say when something happened. `value` is skipped only inside an `identifier`.
NEVER_SHIFTED_KEYS = frozenset(
    {
        "id",
        "reference",
        "system",
        "code",
        "url",
        "fullUrl",
        "version",
        "versionId",
        "display",
        "text",
        "div",
        # string-typed choice elements: a string that merely looks like a date is not a date
        "valueString",
        "valueCode",
        "valueId",
        "valueUri",
        "valueUrl",
        "valueCanonical",
        "valueMarkdown",
        "valueOid",
        "valueUuid",
        "valueBase64Binary",
        "data",
    }
)


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and every problem found."""


@dataclass(frozen=True)
class ExpectedDecision:
    """What the service must decide for one draft order under one policy."""

    order: str  # "MedicationRequest/sc-mgb-la-ket"
    policy: str | None  # "mgbhp-031"; None only for outcomes without a policy ("no-policy")
    outcome: str  # one of fhir_mappings.model.Outcome
    phase: str | None = None  # checked only when given

    def describe(self) -> str:
        parts = [self.policy or "(no policy)", self.outcome]
        if self.phase:
            parts.append(self.phase)
        return " ".join(parts)


@dataclass(frozen=True, eq=False)
class Scenario:
    """One story: the patient's record (a transaction bundle), the orders being signed and the expected advice."""

    id: str
    title: str
    description: str
    anchor_date: date
    patient_id: str
    user_id: str
    encounter_id: str | None
    draft_orders: list[dict[str, Any]]
    expected: tuple[ExpectedDecision, ...]
    expect_no_cards: bool
    background: bool
    tags: tuple[str, ...]
    bundle: dict[str, Any]
    source: Path | None = field(default=None, compare=False)

    @property
    def order_refs(self) -> list[str]:
        """Relative references of the draft orders, the form decisions and expectations use."""
        return [f"{order['resourceType']}/{order['id']}" for order in self.draft_orders]

    @property
    def has_expectations(self) -> bool:
        return bool(self.expected) or self.expect_no_cards

    def resource_refs(self) -> list[str]:
        """`Type/id` of every resource the bundle writes."""
        return [f"{entry['resource']['resourceType']}/{entry['resource']['id']}" for entry in self.bundle["entry"]]

    def shifted(self, today: date) -> Scenario:
        """A copy whose bundle and draft orders read as if written today (pure: self is not changed)."""
        days = (today - self.anchor_date).days
        return replace(
            self,
            anchor_date=today,
            bundle=shift_dates(self.bundle, days),
            draft_orders=shift_dates(self.draft_orders, days),
        )


# ---------------------------------------------------------------- date shifting


def shift_date_string(value: str, days: int) -> str:
    """Shift a full date or a dateTime/instant by whole days, keeping precision, time and zone as written.

    Partial dates (`YYYY`, `YYYY-MM`) and anything that is not a date come back unchanged.
    """
    if days == 0:
        return value
    match = _FULL_DATE.match(value) or _DATE_TIME.match(value)
    if match is None:
        return value
    try:
        shifted_day = date.fromisoformat(match.group(1)) + timedelta(days=days)
    except ValueError:  # 2026-02-30 and the like: not a date, leave it for validation to complain about
        return value
    rest = match.group(2) if match.re is _DATE_TIME else ""
    return shifted_day.isoformat() + rest


def shift_dates(data: Any, days: int) -> Any:
    """Deep copy of a FHIR JSON structure with every full date / dateTime / instant moved by `days` days."""
    return _shift(data, days, parent_key=None)


def _shift(node: Any, days: int, parent_key: str | None) -> Any:
    if isinstance(node, dict):
        shifted: dict[str, Any] = {}
        for key, value in node.items():
            if key in NEVER_SHIFTED_KEYS or (key == "value" and parent_key == "identifier"):
                shifted[key] = _deep_copy(value)
            else:
                shifted[key] = _shift(value, days, parent_key=key)
        return shifted
    if isinstance(node, list):
        # list items belong to the key that holds the list (identifier: [ {value: ...} ])
        return [_shift(item, days, parent_key=parent_key) for item in node]
    if isinstance(node, str):
        return shift_date_string(node, days)
    return node


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _deep_copy(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_deep_copy(item) for item in node]
    return node


# ---------------------------------------------------------------- loading and validation


def load_scenario(path: str | Path, *, background_default: bool = False) -> Scenario:
    """Read and validate one scenario file; raises ScenarioError listing every problem in it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read scenario JSON: {exc}") from exc
    problems: list[str] = []
    scenario = _parse(data, path, background_default, problems)
    if problems or scenario is None:
        raise ScenarioError(_format_problems(path, problems))
    return scenario


def load_all(directory: str | Path | None = None, include_background: bool = True) -> list[Scenario]:
    """Every scenario under `directory` (default: sandbox/patients) and its `background/` folder, sorted by id.

    All files are checked before raising, so one run reports every broken file; ids must be unique across files.
    """
    root = Path(directory) if directory is not None else PATIENTS_DIR
    if not root.is_dir():
        raise ScenarioError(f"{root}: scenario directory does not exist")
    files: list[tuple[Path, bool]] = [(path, False) for path in sorted(root.glob("*.json"))]
    if include_background and (root / BACKGROUND_SUBDIR).is_dir():
        files += [(path, True) for path in sorted((root / BACKGROUND_SUBDIR).glob("*.json"))]
    scenarios: list[Scenario] = []
    errors: list[str] = []
    for path, in_background_dir in files:
        try:
            scenarios.append(load_scenario(path, background_default=in_background_dir))
        except ScenarioError as exc:
            errors.append(str(exc))
    seen: dict[str, Path | None] = {}
    for scenario in scenarios:
        if scenario.id in seen:
            errors.append(f"{scenario.source}: duplicate scenario id {scenario.id!r} (also in {seen[scenario.id]})")
        seen[scenario.id] = scenario.source
    if errors:
        raise ScenarioError("\n".join(errors))
    return sorted(scenarios, key=lambda scenario: scenario.id)


def find_scenario(scenario_id: str, scenarios: Iterable[Scenario]) -> Scenario:
    """The scenario with this id, or a ScenarioError naming the ids that exist."""
    by_id = {scenario.id: scenario for scenario in scenarios}
    if scenario_id not in by_id:
        known = ", ".join(sorted(by_id)) or "none"
        raise ScenarioError(f"no scenario with id {scenario_id!r}; known ids: {known}")
    return by_id[scenario_id]


def lint(scenarios: Iterable[Scenario]) -> list[str]:
    """Cross-file warnings that are legal but usually mistakes.

    - a relative reference (`Type/id`) that no loaded bundle writes (fine for a server that already holds it);
    - the same resource written by two files with different content (the later load silently wins).
    """
    scenarios = list(scenarios)
    written: dict[str, tuple[str, dict[str, Any]]] = {}
    warnings: list[str] = []
    for scenario in scenarios:
        for entry in scenario.bundle["entry"]:
            resource = entry["resource"]
            ref = f"{resource['resourceType']}/{resource['id']}"
            if ref in written and written[ref][1] != resource and written[ref][0] != scenario.id:
                warnings.append(f"{scenario.id}: {ref} is also written, differently, by {written[ref][0]}")
            written.setdefault(ref, (scenario.id, resource))
    for scenario in scenarios:
        local = set(scenario.order_refs)
        for ref in sorted(set(_relative_references([scenario.bundle, scenario.draft_orders]))):
            if ref not in written and ref not in local:
                warnings.append(f"{scenario.id}: reference {ref} is not written by any scenario")
        if scenario.user_id not in written:
            warnings.append(f"{scenario.id}: user_id {scenario.user_id} is not written by any scenario")
    return warnings


def _format_problems(path: Path, problems: list[str]) -> str:
    return f"{path}: invalid scenario:\n" + "\n".join(f"  - {problem}" for problem in problems)


def _parse(data: Any, path: Path, background_default: bool, problems: list[str]) -> Scenario | None:
    if not isinstance(data, dict):
        problems.append("top level must be a JSON object")
        return None
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        problems.append(f"missing required key(s): {', '.join(missing)}")
    unknown = [key for key in data if key not in _REQUIRED_KEYS + _OPTIONAL_KEYS and not key.startswith("_")]
    if unknown:
        problems.append(f"unknown key(s): {', '.join(unknown)} (comments go in keys starting with '_')")
    if missing:
        return None

    scenario_id = data["id"]
    if not isinstance(scenario_id, str) or not _FHIR_ID.match(scenario_id):
        problems.append(f"id {scenario_id!r} must be 1-64 characters of A-Z a-z 0-9 - .")
    elif path.stem != scenario_id:
        problems.append(f"file name must be the id: expected {scenario_id}.json")
    for key in ("title", "description"):
        if not isinstance(data[key], str) or not data[key].strip():
            problems.append(f"{key} must be a non-empty string")
    anchor = _parse_date(data["anchor_date"], problems)
    patient_id = data["patient_id"]
    if not isinstance(patient_id, str) or not _FHIR_ID.match(patient_id):
        problems.append(f"patient_id {patient_id!r} must be a plain FHIR id (no 'Patient/' prefix)")
    user_id = data["user_id"]
    if not isinstance(user_id, str) or not _is_relative_ref(user_id, USER_RESOURCE_TYPES):
        problems.append(f"user_id {user_id!r} must be 'Practitioner/<id>' or 'PractitionerRole/<id>'")
    encounter_id = data.get("encounter_id")
    if encounter_id is not None and (not isinstance(encounter_id, str) or not _FHIR_ID.match(encounter_id)):
        problems.append(f"encounter_id {encounter_id!r} must be null or a plain FHIR id")
    flags = {key: data.get(key, default) for key, default in (("expect_no_cards", False), ("background", None))}
    for key, value in flags.items():
        if value is not None and not isinstance(value, bool):
            problems.append(f"{key} must be true or false")
    background = flags["background"] if isinstance(flags["background"], bool) else background_default
    if background_default and flags["background"] is False:
        problems.append("files under background/ cannot set background: false")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) and tag for tag in tags):
        problems.append("tags must be a list of non-empty strings")
        tags = []

    draft_orders = _check_draft_orders(data["draft_orders"], patient_id, problems)
    order_refs = [f"{order.get('resourceType')}/{order.get('id')}" for order in draft_orders]
    expected = _check_expected(data.get("expected", []), order_refs, problems)
    expect_no_cards = flags["expect_no_cards"] is True
    if expect_no_cards and expected:
        problems.append("expect_no_cards is true but expected lists decisions")
    if not background and not expected and not expect_no_cards:
        problems.append("a story scenario must list `expected` decisions or set expect_no_cards: true")
    bundle = _check_bundle(data["bundle"], patient_id, order_refs, encounter_id, problems)

    if problems or anchor is None or bundle is None:
        return None
    return Scenario(
        id=scenario_id,
        title=data["title"],
        description=data["description"],
        anchor_date=anchor,
        patient_id=patient_id,
        user_id=user_id,
        encounter_id=encounter_id,
        draft_orders=draft_orders,
        expected=tuple(expected),
        expect_no_cards=expect_no_cards,
        background=background,
        tags=tuple(tags),
        bundle=bundle,
        source=path,
    )


def _parse_date(raw: Any, problems: list[str]) -> date | None:
    if isinstance(raw, str) and _FULL_DATE.match(raw):
        try:
            return date.fromisoformat(raw)
        except ValueError:
            pass
    problems.append(f"anchor_date {raw!r} must be a full date YYYY-MM-DD")
    return None


def _is_relative_ref(value: str, types: Iterable[str]) -> bool:
    resource_type, _, resource_id = value.partition("/")
    return resource_type in types and bool(_FHIR_ID.match(resource_id))


def _check_draft_orders(raw: Any, patient_id: Any, problems: list[str]) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        problems.append("draft_orders must be a non-empty list of request resources")
        return []
    orders: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, order in enumerate(raw):
        where = f"draft_orders[{index}]"
        if not isinstance(order, dict):
            problems.append(f"{where} must be a FHIR resource object")
            continue
        resource_type = order.get("resourceType")
        if resource_type not in REQUEST_RESOURCE_TYPES:
            problems.append(
                f"{where} is a {resource_type!r}, not a request resource ({', '.join(sorted(REQUEST_RESOURCE_TYPES))})"
            )
            continue
        order_id = order.get("id")
        if not isinstance(order_id, str) or not _FHIR_ID.match(order_id):
            problems.append(f"{where} needs an id (CRD: draft orders SHALL have one)")
            continue
        ref = f"{resource_type}/{order_id}"
        if ref in seen:
            problems.append(f"{where}: duplicate draft order {ref}")
        seen.add(ref)
        subject = order.get("for" if resource_type == "Task" else "subject")
        subject_ref = subject.get("reference") if isinstance(subject, dict) else None
        if subject_ref is not None and subject_ref != f"Patient/{patient_id}":
            problems.append(f"{where}: subject {subject_ref!r} is not the scenario patient Patient/{patient_id}")
        orders.append(order)
    return orders


def _check_expected(raw: Any, order_refs: list[str], problems: list[str]) -> list[ExpectedDecision]:
    if not isinstance(raw, list):
        problems.append("expected must be a list")
        return []
    expected: list[ExpectedDecision] = []
    for index, item in enumerate(raw):
        where = f"expected[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where} must be an object")
            continue
        unknown = set(item) - _EXPECTED_KEYS
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        order, policy, outcome, phase = (item.get(key) for key in ("order", "policy", "outcome", "phase"))
        if order not in order_refs:
            problems.append(f"{where}: order {order!r} is not among the draft orders ({', '.join(order_refs)})")
        if policy is not None and (not isinstance(policy, str) or not _SLUG.match(policy)):
            problems.append(f"{where}: policy {policy!r} must be a policy id like 'mgbhp-031' (or null)")
        if policy is None and outcome not in (Outcome.NO_POLICY.value, Outcome.NOT_APPLICABLE.value):
            problems.append(f"{where}: policy may be null only for outcome no-policy or not-applicable")
        if outcome not in OUTCOMES:
            problems.append(f"{where}: outcome {outcome!r} must be one of {', '.join(sorted(OUTCOMES))}")
        if phase is not None and phase not in PHASES:
            problems.append(f"{where}: phase {phase!r} must be one of {', '.join(sorted(PHASES))}")
        if isinstance(order, str) and isinstance(outcome, str):
            expected.append(ExpectedDecision(order=order, policy=policy, outcome=outcome, phase=phase))
    keys = [(item.order, item.policy) for item in expected]
    for key in {key for key in keys if keys.count(key) > 1}:
        problems.append(f"expected lists {key[0]} under policy {key[1]} more than once")
    return expected


def _check_bundle(
    raw: Any, patient_id: Any, order_refs: list[str], encounter_id: Any, problems: list[str]
) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or raw.get("resourceType") != "Bundle" or raw.get("type") != "transaction":
        problems.append("bundle must be a FHIR Bundle of type transaction")
        return None
    entries = raw.get("entry")
    if not isinstance(entries, list) or not entries:
        problems.append("bundle.entry must be a non-empty list")
        return None
    written: set[str] = set()
    full_urls: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"bundle.entry[{index}]"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            problems.append(f"{where} has no resource")
            continue
        resource_type, resource_id = resource["resourceType"], resource.get("id")
        if not isinstance(resource_id, str) or not _FHIR_ID.match(resource_id):
            problems.append(f"{where} ({resource_type}) needs an id: entries are PUT so loading is repeatable")
            continue
        if resource_id.isdigit():
            problems.append(f"{where}: id {resource_id!r} is all digits (HAPI refuses client-assigned numeric ids)")
        request = entry.get("request")
        expected_url = f"{resource_type}/{resource_id}"
        if not isinstance(request, dict) or request.get("method") != "PUT" or request.get("url") != expected_url:
            problems.append(f"{where} needs request {{'method': 'PUT', 'url': '{expected_url}'}}")
        if expected_url in written:
            problems.append(f"{where}: {expected_url} is written twice")
        if expected_url in order_refs:
            problems.append(f"{where}: {expected_url} is also a draft order; draft orders are not stored in the record")
        written.add(expected_url)
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str):
            full_urls.add(full_url)
    for ref in _references(entries):
        if ref.startswith("urn:uuid:") and ref not in full_urls:
            problems.append(f"bundle: reference {ref} matches no entry fullUrl")
    if isinstance(patient_id, str) and f"Patient/{patient_id}" not in written:
        problems.append(f"bundle does not write the scenario patient Patient/{patient_id}")
    if isinstance(encounter_id, str) and f"Encounter/{encounter_id}" not in written:
        problems.append(f"bundle does not write the context encounter Encounter/{encounter_id}")
    return raw


def _references(node: Any) -> Iterator[str]:
    """Every `reference` string value anywhere below node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def _relative_references(node: Any) -> Iterator[str]:
    for ref in _references(node):
        resource_type, _, resource_id = ref.partition("/")
        if resource_type[:1].isupper() and resource_id and "/" not in resource_id and "://" not in ref:
            yield ref
