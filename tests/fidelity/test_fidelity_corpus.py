"""Clinical fidelity corpus (issue 8): complete patient records written from the policy texts, in the shapes US
EHRs really send, each with the outcome a utilization-management reviewer would give.

`test_record_decision` runs the engine on every record and compares outcome, phase/service, criterion statuses and
deciding evidence with the record's `expect`; the message names the record, its rationale (the policy sentence that
decides it) and every difference. A record is never marked xfail: a failing record is a misreading to fix.
`test_record_format` checks that every record is well-formed (keys, references inside the bundle, code syntax and
check digits, dates), and the corpus-level tests check its balance and its coverage of every criterion.
See README.md in this folder for the format and how to add a record.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_mappings.validation.codes import code_problem, luhn_ok
from tests.fidelity.corpus import (
    OPTIONAL_KEYS,
    OUTCOMES,
    POLICIES,
    REQUIRED_KEYS,
    STATUSES,
    decide,
    load_record,
    record_paths,
    target_order,
)

POLICY_DIR = Path(__file__).resolve().parents[2] / "fhir_mappings" / "policies"
PATHS = record_paths()
IDS = [p.stem for p in PATHS]

DRAFT_ORDER_TYPES = {
    "MedicationRequest",
    "ServiceRequest",
    "DeviceRequest",
    "NutritionOrder",
    "VisionPrescription",
    "CommunicationRequest",
    "Task",
}
PHASES = {"mgbhp-031": {"initial", "reauthorization"}, "uuhp-mp-054": set()}
SERVICES = {"mgbhp-031": set(), "uuhp-mp-054": {"eligibility-consultation", "integration-therapy"}}
# Scope rules whose decision is silence (no card): a record cannot name them in `expect.criteria`; records with
# outcome "none" probe them instead.
SILENT_SCOPES = {"non-psychiatric-indication", "evaluation-not-kap", "psychotherapy-not-post-kap"}


def policy_ids(policy: str) -> dict[str, set[str]]:
    """The `id:` values of a policy file by section (the only thing this corpus reads from the policy YAMLs)."""
    doc = yaml.safe_load((POLICY_DIR / f"{policy}.yaml").read_text(encoding="utf-8"))
    return {section: {item["id"] for item in doc.get(section) or []} for section in ("scope", "phases", "criteria")}


POLICY_IDS = {p: policy_ids(p) for p in POLICIES}


# --- the decision ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_record_decision(path: Path) -> None:
    record = load_record(path)
    expect = record["expect"]
    got = decide(record)
    decision = got.decision
    problems: list[str] = []
    if got.outcome != expect["outcome"]:
        problems.append(f"outcome {got.outcome} != expected {expect['outcome']}")
    if got.outcome in expect.get("never", []):
        problems.append(f"outcome {got.outcome} is one the policy rules out for this record (never: {expect['never']})")
    if decision is not None:
        if "phase" in expect and decision.phase != expect["phase"]:
            problems.append(f"phase {decision.phase} != expected {expect['phase']}")
        if "service" in expect and decision.service != expect["service"]:
            problems.append(f"service {decision.service} != expected {expect['service']}")
        results = {c.id: c for c in decision.criteria}
        for cid, status in expect.get("criteria", {}).items():
            result = results.get(cid)
            if result is None:
                problems.append(f"{cid}: not evaluated (expected {status}; phase {decision.phase})")
            elif result.status.value != status:
                why = result.explanation or result.missing or "-"
                problems.append(f"{cid}: {result.status.value} != expected {status} ({why})")
        for cid, refs in expect.get("evidence", {}).items():
            result = results.get(cid)
            shown = set(result.evidence_refs()) if result else set()
            missing = [r for r in refs if r not in shown]
            if missing:
                problems.append(f"{cid}: evidence lacks {missing} (shows {sorted(shown) or 'nothing'})")
    elif expect.get("criteria") or expect.get("evidence"):
        problems.append("no decision for the order, so no criterion could be checked")
    headline = decision.headline if decision else "(no decision)"
    assert not problems, (
        f"{path.stem}\n  {record['description']}\n  policy says: {record['rationale']}\n"
        f"  engine: {got.outcome} - {headline}\n  " + "\n  ".join(problems)
    )


# --- the format ------------------------------------------------------------------------------------------------
FHIR_DATE = re.compile(r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?)?$")
FHIR_DATETIME = re.compile(
    r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])(T([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d{1,9})?"
    r"(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00)))?)?)?$"
)
DATE_KEYS = {
    "birthDate",
    "onsetDateTime",
    "abatementDateTime",
    "recordedDate",
    "effectiveDateTime",
    "issued",
    "authoredOn",
    "performedDateTime",
    "whenHandedOver",
    "whenPrepared",
    "dateAsserted",
    "occurrenceDateTime",
    "dateTime",
    "authored",
    "start",
    "end",
}


def npi_valid(value: str) -> bool:
    """An NPI: 10 digits whose Luhn check digit is computed with the 80840 prefix (CMS)."""
    return bool(re.fullmatch(r"\d{10}", value)) and luhn_ok("80840" + value)


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def format_problems(record: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    keys = set(record)
    problems += [f"missing key {k}" for k in REQUIRED_KEYS if k not in keys]
    problems += [f"unexpected key {k}" for k in sorted(keys - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))]
    if problems:
        return problems
    policy = record["policy"]
    if policy not in POLICIES:
        return [f"unknown policy {policy}"]
    if not FHIR_DATE.match(record["now"]) or len(record["now"]) != 10:
        problems.append(f"now {record['now']!r} is not YYYY-MM-DD")
    for key in ("description", "rationale", "shape"):
        if not isinstance(record[key], str) or len(record[key].strip()) < 20:
            problems.append(f"{key} must be a sentence")
    if (
        not isinstance(record["class"], list)
        or not record["class"]
        or not all(isinstance(c, int) and 1 <= c <= 8 for c in record["class"])
    ):
        problems.append("class must be a non-empty list of issue-8 class numbers 1..8")

    bundle = record["bundle"]
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "collection":
        problems.append("bundle must be a collection Bundle")
    keyed: dict[str, dict[str, Any]] = {}
    full_urls: set[str] = set()
    for i, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource") or {}
        key = f"{resource.get('resourceType')}/{resource.get('id')}"
        if not resource.get("resourceType") or not resource.get("id"):
            problems.append(f"entry[{i}] has no resourceType/id")
            continue
        if key in keyed:
            problems.append(f"{key} appears twice in the bundle")
        keyed[key] = resource
        full_url = entry.get("fullUrl", "")
        if full_url and not full_url.endswith("/" + key):
            problems.append(f"entry[{i}] fullUrl {full_url} does not end with {key}")
        full_urls.add(full_url)
    orders = record["draft_orders"]
    order_keys = set()
    for order in orders:
        key = f"{order.get('resourceType')}/{order.get('id')}"
        order_keys.add(key)
        if order.get("resourceType") not in DRAFT_ORDER_TYPES:
            problems.append(f"draft order {key} is not an order-sign request type")
        if order.get("status") != "draft":
            problems.append(f"draft order {key} status must be draft")
        if key in keyed:
            problems.append(f"draft order {key} is also in the bundle (it would read as history)")
        subject = (order.get("subject") or {}).get("reference")
        if subject and subject != f"Patient/{record['patient_id']}":
            problems.append(f"draft order {key} subject {subject} is not the record's patient")
    if not orders:
        problems.append("no draft order")
    if f"Patient/{record['patient_id']}" not in keyed:
        problems.append("the bundle has no Patient/<patient_id>")
    if record["user_id"] not in keyed or not re.match(r"^(Practitioner|PractitionerRole)/", record["user_id"]):
        problems.append(f"user_id {record['user_id']} is not a Practitioner(Role) in the bundle")
    if record.get("encounter_id") and f"Encounter/{record['encounter_id']}" not in keyed:
        problems.append(f"encounter_id {record['encounter_id']} is not an Encounter in the bundle")
    if not any(k.startswith("Coverage/") for k in keyed) and record["expect"].get("outcome") != "no-policy":
        problems.append("no Coverage: the policy is routed from the patient's Coverage")

    for owner_key, resource in [*keyed.items(), *((f"{o['resourceType']}/{o['id']}", o) for o in orders)]:
        contained = {c.get("id") for c in resource.get("contained", []) if isinstance(c, dict)}
        for path, node in walk(resource):
            if isinstance(node, dict) and isinstance(node.get("reference"), str):
                ref = node["reference"]
                if ref.startswith("#"):
                    ok = ref[1:] in contained
                elif re.match(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$", ref):
                    ok = ref in keyed or ref in order_keys
                else:
                    ok = ref in full_urls
                if not ok:
                    problems.append(f"{owner_key} {path}: reference {ref} does not resolve inside the record")
            if isinstance(node, dict) and isinstance(node.get("system"), str) and "code" in node:
                problems += code_problems(owner_key, path, node["system"], str(node["code"]))
            is_npi = isinstance(node, dict) and node.get("system") == "http://hl7.org/fhir/sid/us-npi"
            if is_npi and "value" in node and not npi_valid(str(node["value"])):
                problems.append(f"{owner_key} {path}: NPI {node['value']} fails its check digit")
            key = path.rsplit(".", 1)[-1]
            if key in DATE_KEYS and isinstance(node, str) and not FHIR_DATETIME.match(node):
                problems.append(f"{owner_key} {path}: {node!r} is not a FHIR date/dateTime")

    problems += expect_problems(record, keyed, order_keys)
    return problems


def code_problems(owner: str, path: str, system: str, code: str) -> list[str]:
    """The same code checks `ketamine-cds mappings validate` applies (ICD-10-CM against the tabular list)."""
    problem = code_problem(system, code)
    return [f"{owner} {path}: {problem}"] if problem else []


def expect_problems(record: dict[str, Any], keyed: dict[str, Any], order_keys: set[str]) -> list[str]:
    problems: list[str] = []
    expect = record["expect"]
    policy = record["policy"]
    outcome = expect.get("outcome")
    if outcome not in OUTCOMES:
        return [f"expect.outcome {outcome!r} is not one of {OUTCOMES}"]
    never = expect.get("never", [])
    if not isinstance(never, list) or any(n not in OUTCOMES for n in never) or outcome in never:
        problems.append(f"expect.never {never} must list other outcomes")
    if outcome != "likely-authorized" and "likely-authorized" not in never:
        problems.append("a record the policy does not authorize must list likely-authorized in expect.never")
    ids = POLICY_IDS[policy]
    known = ids["scope"] | ids["criteria"]
    for cid, status in expect.get("criteria", {}).items():
        if cid not in known:
            problems.append(f"expect.criteria: {cid} is not an id of {policy}")
        if status not in STATUSES:
            problems.append(f"expect.criteria: {cid} status {status!r} is not one of {STATUSES}")
    for cid, refs in expect.get("evidence", {}).items():
        if cid not in known:
            problems.append(f"expect.evidence: {cid} is not an id of {policy}")
        problems += [
            f"expect.evidence: {r} is not in the record" for r in refs if r not in keyed and r not in order_keys
        ]
    if "phase" in expect and expect["phase"] not in PHASES[policy]:
        problems.append(f"expect.phase {expect['phase']} is not a phase of {policy}")
    if "service" in expect and expect["service"] not in SERVICES[policy]:
        problems.append(f"expect.service {expect['service']} is not a service of {policy}")
    if target_order(record) not in order_keys:
        problems.append(f"expect.order {target_order(record)} is not a draft order")
    extra = set(expect) - {"outcome", "never", "criteria", "evidence", "phase", "service", "order"}
    problems += [f"unexpected expect key {k}" for k in sorted(extra)]
    return problems


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_record_format(path: Path) -> None:
    record = load_record(path)
    problems = format_problems(record)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_format_checks_catch_malformed_records() -> None:
    """The format test can fail: a dangling reference, a bad check digit and a bad outcome are all reported."""
    record = load_record(PATHS[0])
    record["bundle"]["entry"][0]["resource"]["managingOrganization"] = {"reference": "Organization/nowhere"}
    record["draft_orders"][0]["reasonCode"] = [
        {"coding": [{"system": "http://snomed.info/sct", "code": "281000119104"}]}
    ]
    record["expect"]["outcome"] = "approved"
    problems = "\n".join(format_problems(record))
    assert "Organization/nowhere does not resolve" in problems
    assert "'281000119104' is not a SNOMED CT identifier" in problems
    assert "expect.outcome 'approved'" in problems


def test_check_digit_helpers() -> None:
    assert npi_valid("1234567893") and not npi_valid("1234567890") and not npi_valid("123456789")


# --- the corpus ------------------------------------------------------------------------------------------------
def test_corpus_size_and_balance() -> None:
    records = [load_record(p) for p in PATHS]
    assert len(records) >= 60, f"the corpus has {len(records)} records; issue 8 asks for at least 60"
    by_policy = Counter(r["policy"] for r in records)
    assert all(by_policy[p] >= 15 for p in POLICIES), by_policy
    negative = sum(r["expect"]["outcome"] != "likely-authorized" for r in records)
    assert 0.4 <= negative / len(records) <= 0.65, f"{negative} of {len(records)} records are not authorized"
    classes = Counter(c for r in records for c in r["class"])
    thin = {c: classes[c] for c in range(1, 9) if classes[c] < 3}
    assert not thin, f"issue-8 classes with fewer than 3 records: {thin}"


def test_corpus_covers_every_criterion() -> None:
    """Every criterion, exclusion and deciding scope rule of both policies is checked by at least one record."""
    named: dict[str, set[str]] = {p: set() for p in POLICIES}
    silent: dict[str, int] = Counter()
    for path in PATHS:
        record = load_record(path)
        named[record["policy"]].update(record["expect"].get("criteria", {}))
        if record["expect"]["outcome"] == "none":
            silent[record["policy"]] += 1
    for policy in POLICIES:
        ids = POLICY_IDS[policy]
        wanted = (ids["criteria"] | ids["scope"]) - SILENT_SCOPES
        missing = sorted(wanted - named[policy])
        assert not missing, f"{policy}: no record checks {missing}"
    assert silent["uuhp-mp-054"] >= 2, "MP-054's silent scope rules need records whose expected outcome is none"
