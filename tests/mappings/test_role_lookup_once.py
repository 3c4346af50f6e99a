"""care_relationships looks each clinician's roles up once: pinned against a lookup per encounter participant."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_mappings.derive.common import DONE_STATUSES, status
from fhir_mappings.derive.roles import lookup_roles
from fhir_mappings.facts import DeriveFact, FactContext
from fhir_mappings.mappings import load_engine
from fhir_mappings.record import Availability, PatientRecord, QueryOutcome, as_list

NUCC = "http://nucc.org/provider-taxonomy"
SPECIALTIES = ["2084P0800X", "207Q00000X", "363LP0808X", "999999999X"]  # psychiatry, family medicine, PMHNP, none

encounters_strategy = st.lists(
    st.tuples(
        st.sampled_from(["finished", "cancelled", "in-progress"]),
        st.lists(st.sampled_from(["Practitioner/p0", "Practitioner/p1", "PractitionerRole/r2", "Practitioner/p9"])),
    ),
    max_size=6,
)


def _record(encounters: list[tuple[str, list[str]]], specialties: list[str]) -> PatientRecord:
    resources: list[dict[str, Any]] = [
        {"resourceType": "Practitioner", "id": "p0"},
        {"resourceType": "Practitioner", "id": "p1"},
        {"resourceType": "PractitionerRole", "id": "r0", "practitioner": {"reference": "Practitioner/p0"},
         "specialty": [{"coding": [{"system": NUCC, "code": specialties[0]}]}]},
        {"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": "Practitioner/p1"},
         "specialty": [{"coding": [{"system": NUCC, "code": specialties[1]}]}]},
        {"resourceType": "PractitionerRole", "id": "r2", "practitioner": {"reference": "Practitioner/p1"},
         "specialty": [{"coding": [{"system": NUCC, "code": specialties[2]}]}]},
    ]  # fmt: skip
    for n, (state, participants) in enumerate(encounters):
        resources.append(
            {
                "resourceType": "Encounter",
                "id": f"e{n}",
                "status": state,
                "period": {"start": f"2025-12-{n + 1:02d}"},
                "participant": [{"individual": {"reference": ref}} for ref in participants],
            }
        )
    types = load_engine().queries.supplied_types()
    queries = {t: QueryOutcome(t, (t,), Availability.READ, "prefetch") for t in types}
    now = datetime(2026, 1, 15, 17, tzinfo=UTC)
    return PatientRecord(patient_id="p", now=now, resources=resources, queries=queries, references_resolvable=True)


@settings(max_examples=100, deadline=None)
@given(encounters_strategy, st.lists(st.sampled_from(SPECIALTIES), min_size=3, max_size=3))
def test_care_relationships_match_a_lookup_per_participant(
    encounters: list[tuple[str, list[str]]], specialties: list[str]
) -> None:
    record = _record(encounters, specialties)
    for policy in load_engine().policies.values():
        definition = policy.library.facts.get("care_relationships")
        if not isinstance(definition, DeriveFact):
            continue
        ctx = FactContext(policy.library, record)
        roles = definition.params["roles"]
        expected = []
        for encounter in record.of_type("Encounter"):
            if status(encounter) not in DONE_STATUSES["Encounter"]:
                continue
            for participant in as_list(encounter.get("participant")):
                lookup = lookup_roles(ctx, participant["individual"], roles, within=encounter)
                expected += [(f"Encounter/{encounter['id']}", label, m.label()) for label, m in lookup.labels.items()]
        fact = FactContext(policy.library, record).fact("care_relationships")
        found = [(i.evidence.reference, i.get("role"), i.evidence.code) for i in fact.value or ()]
        assert sorted(found) == sorted(expected)
