"""Medication doses and supplies, read from FHIR Dosage, Ratio strengths and supply quantities.

A daily dose is known only when the record states it: a dose quantity in a mass unit (or in tablets /
capsules with a known strength) and a schedule (timing.repeat frequency / period, or a timing code such as
BID). "As needed" doses, missing schedules and unknown units give None — never a default. Durations accept
UCUM time units only (d, wk, mo, a …); an unknown unit is None, not days.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from fhir_mappings.record import as_list

_MASS_MG = {"mg": 1.0, "g": 1000.0, "ug": 0.001, "mcg": 0.001, "µg": 0.001, "milligram": 1.0, "gram": 1000.0}
_UNIT_DOSE = {
    "{tbl}", "tbl", "tab", "tabs", "tablet", "tablets", "{tablet}", "{tablets}", "cap", "caps", "capsule",
    "capsules", "{capsule}", "{cap}", "1", "{each}", "each", "ea",
}  # fmt: skip
# UCUM time units (and the spellings EHRs write) -> days. An unknown unit is not days.
_DAYS = {
    "d": 1.0, "day": 1.0, "days": 1.0, "wk": 7.0, "week": 7.0, "weeks": 7.0, "mo": 30.4375, "month": 30.4375,
    "months": 30.4375, "a": 365.25, "year": 365.25, "years": 365.25, "h": 1 / 24, "hour": 1 / 24,
    "hours": 1 / 24, "min": 1 / 1440,
}  # fmt: skip
# HL7 v3 GTSAbbreviation timing codes (http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation) -> per day.
_TIMING_CODES = {
    "QD": 1, "QOD": 0.5, "AM": 1, "PM": 1, "QAM": 1, "QPM": 1, "QHS": 1, "HS": 1, "BID": 2, "TID": 3,
    "QID": 4, "Q4H": 6, "Q6H": 4, "Q8H": 3, "Q12H": 2, "Q24H": 1, "WK": 1 / 7, "MO": 1 / 30.4375,
}  # fmt: skip
_STRENGTH = re.compile(r"(\d+(?:\.\d+)?)\s*MG\b", re.IGNORECASE)


def duration_days(quantity: Any, *, unitless_is_days: bool = False) -> float | None:
    """A Duration / Quantity as days. `unitless_is_days` for elements that are days by definition
    (MedicationDispense.daysSupply); otherwise a missing or unknown unit gives None."""
    if not isinstance(quantity, dict):
        return None
    value = quantity.get("value")
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        return None
    unit = quantity.get("code") or quantity.get("unit")
    if not isinstance(unit, str) or not unit.strip():
        return float(value) if unitless_is_days else None
    factor = _DAYS.get(unit.strip()) or _DAYS.get(unit.strip().lower())
    return float(value) * factor if factor else None


def strength_mg(names: Iterable[str | None], medication: Mapping[str, Any] | None = None) -> float | None:
    """The strength of one unit (tablet, capsule) in mg: the Medication's ingredient strength (a Ratio of mg per
    1 unit), else the single "NN MG" in a product name (RxNorm SCD/SBD names carry it). Several strengths
    (combination products) or none: None."""
    if isinstance(medication, dict):
        for ingredient in as_list(medication.get("ingredient")):
            ratio = ingredient.get("strength") if isinstance(ingredient, dict) else None
            if isinstance(ratio, dict):
                mg = mass_mg(ratio.get("numerator"))
                denominator = ratio.get("denominator")
                per = denominator.get("value", 1) if isinstance(denominator, dict) else 1
                if mg is not None and isinstance(per, int | float) and per == 1:
                    return mg
    for name in names:
        if isinstance(name, str):
            found = {float(m) for m in _STRENGTH.findall(name)}
            if len(found) == 1:
                return found.pop()
    return None


def mass_mg(quantity: Any) -> float | None:
    """A Quantity in a mass unit, in mg; None for any other unit."""
    if not isinstance(quantity, dict):
        return None
    value = quantity.get("value")
    unit = quantity.get("code") or quantity.get("unit")
    if not isinstance(value, int | float) or isinstance(value, bool) or not isinstance(unit, str):
        return None
    factor = _MASS_MG.get(unit.strip()) or _MASS_MG.get(unit.strip().lower())
    return float(value) * factor if factor else None


def _dose_mg(dose: Any, strength: float | None) -> float | None:
    mg = mass_mg(dose)
    if mg is not None:
        return mg
    if not isinstance(dose, dict) or strength is None:
        return None
    value = dose.get("value")
    unit = dose.get("code") or dose.get("unit") or "1"
    if isinstance(value, int | float) and not isinstance(value, bool) and str(unit).strip().lower() in _UNIT_DOSE:
        return float(value) * strength
    return None


def per_day(timing: Any) -> float | None:
    """Scheduled administrations per day from a Timing: repeat.frequency per period (periodUnit), a timing
    code (BID, Q8H …), or repeat.when alone (once a day). None without a schedule."""
    if not isinstance(timing, dict):
        return None
    repeat = timing.get("repeat") if isinstance(timing.get("repeat"), dict) else {}
    period, unit = repeat.get("period"), repeat.get("periodUnit")
    frequency = repeat.get("frequency", 1 if period is not None else None)
    if isinstance(frequency, int | float) and isinstance(period, int | float) and period > 0:
        days = _DAYS.get(str(unit))
        if days:
            return float(frequency) / (float(period) * days)
    code = timing.get("code")
    for coding in as_list(code.get("coding")) if isinstance(code, dict) else []:
        if isinstance(coding, dict) and str(coding.get("code", "")).upper() in _TIMING_CODES:
            return float(_TIMING_CODES[str(coding["code"]).upper()])
    if repeat.get("when") and frequency in (None, 1):
        return float(len(as_list(repeat["when"])))
    return None


def daily_dose_mg(dosages: Iterable[Any], strength: float | None) -> float | None:
    """The total scheduled daily dose in mg over a resource's dosage instructions (split doses add up); None
    when any instruction lacks a readable dose or schedule, or is "as needed"."""
    total = 0.0
    found = False
    for dosage in dosages:
        if not isinstance(dosage, dict):
            continue
        if dosage.get("asNeededBoolean") is True or dosage.get("asNeededCodeableConcept") is not None:
            return None
        dose = None
        for dose_rate in as_list(dosage.get("doseAndRate")):
            if not isinstance(dose_rate, dict):
                continue
            if dose_rate.get("doseQuantity") is not None:
                dose = _dose_mg(dose_rate["doseQuantity"], strength)
            elif isinstance(dose_rate.get("doseRange"), dict):
                dose = _dose_mg(dose_rate["doseRange"].get("low"), strength)  # the least it can be
            if dose is not None:
                break
        times = per_day(dosage.get("timing"))
        if dose is None or times is None:
            return None
        total += dose * times
        found = True
    return round(total, 3) if found else None


def supply_daily_mg(quantity: Any, days_supply: float | None, strength: float | None) -> float | None:
    """Average daily dose from a dispense: quantity (in tablets/capsules × strength, or in mg) / days supplied."""
    if not days_supply or days_supply <= 0 or not isinstance(quantity, dict):
        return None
    total = _dose_mg(quantity, strength)
    return round(total / days_supply, 3) if total is not None else None
