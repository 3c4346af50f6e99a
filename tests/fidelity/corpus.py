"""Loading and deciding the fidelity corpus: one complete patient record per JSON file in `records/`.

The records were written from the policy texts (shared/policies/*.txt), in the shapes US EHRs and US Core
profiles really produce, blind to how the engine reads data. This module only turns a record into the engine's
inputs (site configuration, `PatientRecord`, draft orders) and returns the decision for the order the record is
about; the tests in `test_fidelity_corpus.py` compare it with the record's `expect`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fhir_mappings.mappings import Mappings, SiteConfig, load_engine
from fhir_mappings.model import Decision
from fhir_mappings.record import Availability, PatientRecord, QueryOutcome

RECORDS_DIR = Path(__file__).parent / "records"
OUTCOMES = (
    "likely-authorized",
    "documentation-needed",
    "criteria-not-met",
    "blocked",
    "not-covered",
    "not-applicable",
    "plan-variation",
    "no-policy",
    "none",  # the service stays silent for this order (no decision, no card)
)
POLICIES = ("mgbhp-031", "uuhp-mp-054")
STATUSES = ("met", "not-met", "unknown")
REQUIRED_KEYS = (
    "description",
    "policy",
    "now",
    "patient_id",
    "user_id",
    "bundle",
    "draft_orders",
    "expect",
    "rationale",
    "class",
    "shape",
)
OPTIONAL_KEYS = ("encounter_id", "site")
# The instant every record is decided at: the record's `now` date, 17:00 UTC (as the policy fixture cases do).
DECISION_TIME = "T17:00:00+00:00"


def record_paths() -> list[Path]:
    return sorted(RECORDS_DIR.glob("*.json"))


def load_record(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@functools.cache
def _engine_for(site_json: str) -> Mappings:
    site = json.loads(site_json)
    return Mappings.load(SiteConfig.from_mapping(site)) if site else load_engine()


def engine_for(record: dict[str, Any]) -> Mappings:
    """The shipped mappings plus the record's site configuration (loaded once per distinct configuration)."""
    return _engine_for(json.dumps(record.get("site") or {}, sort_keys=True))


def bundle_resources(record: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    entries = record["bundle"].get("entry", [])
    resources = [e["resource"] for e in entries]
    full_urls = {e["fullUrl"]: e["resource"] for e in entries if e.get("fullUrl")}
    return resources, full_urls


def patient_record(record: dict[str, Any], engine: Mappings) -> PatientRecord:
    """The record as the service would hold it after a complete prefetch: every query read, nothing unavailable."""
    resources, full_urls = bundle_resources(record)
    queries = {t: QueryOutcome(t, (t,), Availability.READ, "prefetch") for t in sorted(engine.queries.supplied_types())}
    return PatientRecord(
        patient_id=record["patient_id"],
        now=datetime.fromisoformat(record["now"] + DECISION_TIME),
        resources=resources,
        queries=queries,
        draft_orders=record["draft_orders"],
        user_id=record.get("user_id"),
        encounter_id=record.get("encounter_id"),
        references_resolvable=True,
        full_urls=full_urls,
    )


def target_order(record: dict[str, Any]) -> str:
    """`Type/id` of the draft order the expectation is about: `expect.order`, else the first draft order."""
    order = record["expect"].get("order")
    if order:
        return str(order)
    first = record["draft_orders"][0]
    return f"{first['resourceType']}/{first['id']}"


@dataclass(frozen=True)
class Outcome:
    """What the engine answered for the record's target order."""

    outcome: str  # a Decision outcome value, or "none" when no decision covers the order
    decision: Decision | None


def decide(record: dict[str, Any]) -> Outcome:
    engine = engine_for(record)
    rec = patient_record(record, engine)
    groups = engine.triage(record["draft_orders"])
    decisions = engine.decide(rec, groups) if groups else []
    wanted = target_order(record)
    for decision in decisions:
        if wanted in decision.order_refs:
            return Outcome(decision.outcome.value, decision)
    return Outcome("none", None)
