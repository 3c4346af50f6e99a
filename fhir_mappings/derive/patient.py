"""The patient: age on the evaluation date, bounded when the birth date is partial."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

from fhir_mappings.facts import DeriveFact, FactContext, derivation, reference_of
from fhir_mappings.model import Evidence, Fact, FactState, exact_or_bounds
from fhir_mappings.reading.dates import parse_span
from fhir_mappings.record import Availability


def _age(born: date, today: date) -> int:
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


@derivation("age_years", params={}, reads=("Patient",))
def age_years(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Age in completed years on the evaluation date, from Patient.birthDate. A birth year or month alone gives
    the age as bounds (born in 2008: 17 or 18 on 2026-06-01), and a threshold is decided only at both."""
    patients = ctx.record.of_type("Patient")
    patient = next((p for p in patients if p.get("id") == ctx.record.patient_id), patients[0] if patients else None)
    born = parse_span(patient.get("birthDate")) if patient else None
    if patient is None or born is None:
        state = FactState.UNAVAILABLE if ctx.availability("Patient") is not Availability.READ else FactState.ABSENT
        return Fact(fact.name, state, None, (), "no Patient.birthDate")
    youngest, oldest = _age(born.high, ctx.today), _age(born.low, ctx.today)
    value = exact_or_bounds(youngest, oldest)
    shown = f"{youngest} years" if youngest == oldest else f"{youngest}–{oldest} years (partial birth date)"
    evidence = Evidence(reference_of(patient), date=patient.get("birthDate"), value=shown, note="birthDate")
    return Fact(fact.name, FactState.PRESENT, value, (evidence,))
