"""Prior ketamine: administrations and their purpose, courses and whether they helped, dosing notes.

Ketamine given for anaesthesia, procedural sedation, analgesia or in the emergency department is not a
psychiatric ketamine course: it must not make a request a reauthorization, nor count for or against
exclusion 6, nor be "the KAP session" an integration session follows. Each administration's purpose is read
from its stated indication, what it is part of (an anaesthesia procedure), the encounter it happened in
(emergency class), a KAP-session code, and the dose (an anaesthetic mg/kg). When it cannot be told, the item
says so (field `psychiatric` None) and rules treat it as undecided — never as a psychiatric course.

One administration is often recorded several times (the infusion Procedure and its MedicationAdministration,
an Encounter typed by the session code): records of the same day, or linked to each other, are one event.
A MedicationStatement of ketamine (reported history) is a course with an unknown number of administrations.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta
from typing import Any

from fhir_mappings.derive.common import DONE_STATUSES, Occurrence, occurrences, purpose_of, status, valueset_ids
from fhir_mappings.facts import DeriveFact, FactContext, derivation, reference_of
from fhir_mappings.model import Evidence, Fact, FactState
from fhir_mappings.orders import OrderKind
from fhir_mappings.reading.dates import first_span
from fhir_mappings.reading.dosage import mass_mg
from fhir_mappings.record import as_list, reference_key
from fhir_mappings.rules import Item
from fhir_mappings.valuesets import CodeMatch

Resource = dict[str, Any]


def _kilograms(item: Item) -> float | None:
    value = item.get("value")
    unit = str(item.get("unit") or "").strip().lower()
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    factor = {"kg": 1.0, "[lb_av]": 0.45359237, "lb": 0.45359237, "lbs": 0.45359237, "g": 0.001}.get(unit)
    return float(value) * factor if factor else None


def latest_weight_kg(ctx: FactContext, fact_name: str | None) -> tuple[float | None, Item | None]:
    if not fact_name:
        return None, None
    weights = [i for i in ctx.fact(fact_name).value or () if isinstance(i, Item) and i.date and i.certain]
    if not weights:
        return None, None
    latest = max(weights, key=lambda i: i.date or date.min)
    return _kilograms(latest), latest


def _purpose(
    ctx: FactContext,
    records: list[Resource],
    params: Mapping[str, Any],
    weight_kg: float | None,
) -> tuple[bool | None, str]:
    """Psychiatric (True), another purpose (False) or undetermined (None), over every record of one event."""
    psychiatric = valueset_ids(params.get("psychiatric"))
    verdicts: list[tuple[bool, str]] = []
    for record in records:
        said, why = purpose_of(ctx, record, psychiatric)
        if said is not None:
            verdicts.append((said, why))
        codes = [c for c in [record.get("code"), *as_list(record.get("type"))] if isinstance(c, dict)]
        session = ctx.match(params["session_codes"], codes) if codes else None
        if session is not None and session.via != "text":
            verdicts.append((True, "KAP session code"))
        for ref in as_list(record.get("partOf")):
            parent = ctx.record.resolve(ref, within=record)
            pcode = parent.get("code") if isinstance(parent, dict) else None
            if params.get("other_procedures") and isinstance(pcode, dict):
                found = ctx.match(params["other_procedures"], [pcode])
                if found is not None:
                    verdicts.append((False, f"part of {found.label()}"))
        for key in ("context", "encounter"):
            encounter = ctx.record.resolve(record.get(key), within=record) if record.get(key) else None
            if encounter is None or encounter.get("resourceType") != "Encounter":
                continue
            cls = encounter.get("class")
            emergency = params.get("emergency_classes")
            if emergency and isinstance(cls, dict) and ctx.match(emergency, [{"coding": [dict(cls)]}]) is not None:
                verdicts.append((False, "given in an emergency encounter"))
            types = [c for c in as_list(encounter.get("type")) if isinstance(c, dict)]
            if params.get("other_procedures") and types:
                found = ctx.match(params["other_procedures"], types)
                if found is not None:
                    verdicts.append((False, f"during {found.label()}"))
        threshold = params.get("anaesthetic_mg_per_kg")
        dosage = record.get("dosage") if isinstance(record.get("dosage"), dict) else None
        if threshold and weight_kg and dosage is not None:
            mg = mass_mg(dosage.get("dose"))
            if mg is not None and mg / weight_kg >= float(threshold):
                verdicts.append((False, f"{mg / weight_kg:.2f} mg/kg: an anaesthetic dose"))
    values = {v for v, _ in verdicts}
    if len(values) == 1:
        return values.pop(), "; ".join(sorted({w for _, w in verdicts}))
    if values:
        return None, "conflicting purpose: " + "; ".join(sorted({w for _, w in verdicts}))
    return None, "purpose not stated (no indication, setting or session code)"


def _route_iv(ctx: FactContext, records: list[Resource], params: Mapping[str, Any], infusion: bool) -> bool | None:
    routes: list[bool] = [True] if infusion else []
    for record in records:
        dosage = record.get("dosage") if isinstance(record.get("dosage"), dict) else {}
        route = dosage.get("route") if isinstance(dosage, dict) else None
        if isinstance(route, dict):
            routes.append(ctx.match(params["route_iv"], [route]) is not None)
    if not routes:
        return None
    return True if all(routes) else (False if not any(routes) else None)


@derivation(
    "ketamine_administrations",
    params={
        "ketamine": "valueset",
        "infusion_codes": "valueset",
        "session_codes": "valueset",
        "route_iv": "valueset",
        "psychiatric": "valuesets",
        "other_procedures": "valueset",
        "emergency_classes": "valueset",
        "anaesthetic_mg_per_kg": "number",
        "body_weight": "fact",
    },
    reads=("MedicationAdministration", "Procedure", "Encounter", "MedicationStatement"),
    optional=("psychiatric", "other_procedures", "emergency_classes", "anaesthetic_mg_per_kg", "body_weight"),
)
def ketamine_administrations(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Ketamine given before, one item per event (fields: iv, psychiatric, source, administrations — 1, or
    None for a reported course). Events of another purpose (psychiatric False) are left out: they are not
    treatment history; undetermined ones stay, flagged."""
    weight_kg, _ = latest_weight_kg(ctx, params.get("body_weight"))
    records: list[tuple[Resource, CodeMatch]] = []
    infusions: set[str] = set()
    # An encounter whose session or administration is recorded as not done is a visit where nothing was given.
    not_done = {
        key
        for rtype in ("Procedure", "MedicationAdministration")
        for r in ctx.record.of_type(rtype)
        if status(r) in ("not-done", "stopped", "entered-in-error")
        for ref in as_list(r.get("encounter")) + as_list(r.get("context"))
        if isinstance(ref, dict) and (key := reference_key(str(ref.get("reference", ""))))
    }
    for admin in ctx.record.of_type("MedicationAdministration"):
        if status(admin) not in DONE_STATUSES["MedicationAdministration"]:
            continue
        match = ctx.match(params["ketamine"], ctx.medication_concepts(admin))
        if match is not None:
            records.append((admin, match))
    for rtype, concepts_of in (
        ("Procedure", lambda r: [r.get("code")]),
        ("Encounter", lambda r: as_list(r.get("type"))),
    ):
        for resource in ctx.record.of_type(rtype):
            if status(resource) not in DONE_STATUSES[rtype] or reference_of(resource) in not_done:
                continue
            concepts = [c for c in concepts_of(resource) if isinstance(c, dict)]
            session = ctx.match(params["session_codes"], concepts)
            if session is not None and not (rtype == "Encounter" and session.via == "text"):
                # An Encounter is a session only when its type is coded as one: a visit named "KAP dosing
                # session visit" says what was planned, not that ketamine was given.
                records.append((resource, session))
                continue
            infusion = ctx.match(params["infusion_codes"], concepts)
            if infusion is None:
                continue
            named = concepts + [
                c for c in as_list(resource.get("usedCode")) + as_list(resource.get("reasonCode"))
                if isinstance(c, dict)
            ]  # fmt: skip
            if ctx.match(params["ketamine"], named) is not None:
                records.append((resource, infusion))
                infusions.add(reference_of(resource))
    items: list[Item] = []
    excluded: list[str] = []
    for occurrence in occurrences(records):
        psychiatric, why = _purpose(ctx, occurrence.records, params, weight_kg)
        if psychiatric is False:
            excluded.append(f"{reference_of(occurrence.primary)} ({why})")
            continue
        iv = _route_iv(ctx, occurrence.records, params, any(reference_of(r) in infusions for r in occurrence.records))
        items.append(_administration_item(ctx, occurrence, psychiatric, why, iv, 1))
    for statement in ctx.record.of_type("MedicationStatement"):
        if status(statement) in ("entered-in-error", "not-taken", "intended", "unknown"):
            continue
        match = ctx.match(params["ketamine"], ctx.medication_concepts(statement))
        if match is None:
            continue
        psychiatric, why = _purpose(ctx, [statement], params, weight_kg)
        if psychiatric is False:
            excluded.append(f"{reference_of(statement)} ({why})")
            continue
        occurrence = Occurrence(span=first_span(statement, ("effectivePeriod.start", "effectiveDateTime"))[0])
        occurrence.records.append(statement)
        occurrence.matches.append(match)
        iv = _route_iv(ctx, [statement], params, False)
        end, _ = first_span(statement, ("effectivePeriod.end",))
        items.append(_administration_item(ctx, occurrence, psychiatric, why, iv, None, end.high if end else None))
    detail = ("not psychiatric (left out): " + ", ".join(excluded[:6])) if excluded else ""
    return ctx.make_fact(fact.name, items, fact.reads, detail=detail)


def _administration_item(
    ctx: FactContext,
    occurrence: Occurrence,
    psychiatric: bool | None,
    why: str,
    iv: bool | None,
    administrations: int | None,
    end: date | None = None,
) -> Item:
    primary = occurrence.primary
    evidence = occurrence.evidence(f"purpose: {why}")
    span = occurrence.span
    return Item(
        evidence=evidence[0],
        date=span.low if span else None,
        span=(span.low, span.high) if span and not span.exact else None,
        support=evidence[1:],
        fields={
            "iv": iv,
            "psychiatric": psychiatric,
            "kap": psychiatric is True,  # never undetermined: a psychiatric purpose shown, or not
            "source": str(primary.get("resourceType")),
            "administrations": administrations,
            "end": end,
        },
    )


@derivation(
    "ketamine_courses",
    params={
        "administrations": "fact",
        "course_gap_days": "int",
        "scores": "facts",
        "baseline_window_days": "int",
        "min_relative_improvement": "number",
        "cgi_improvement": "fact",
        "cgi_improved_max": "number",
        "functional_improvement": "fact",
        "followup_window_days": "int",
    },
    reads=("MedicationAdministration", "Procedure", "Observation"),
)
def ketamine_courses(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Courses of ketamine (administrations less than `course_gap_days` apart; a reported course stands alone)
    and whether each helped (field `improved`), how many administrations it had (None: not known) and whether
    it was psychiatric (True only if every administration was; None if any was undetermined).

    Improved = on some rating scale the latest score after the course started is at least
    `min_relative_improvement` (fraction) below the baseline (the latest score in the `baseline_window_days`
    before the first dose); or a CGI-Improvement score ≤ `cgi_improved_max` after the start; or a documented
    functional improvement after the start. Not improved = at least one scale has a baseline and a follow-up
    and none of the above holds. Otherwise unknown. Only certain, dated scores count.
    """
    administrations = [
        i for i in ctx.fact(params["administrations"]).value or () if isinstance(i, Item) and i.date is not None
    ]
    administrations.sort(key=lambda i: i.date or date.min)
    courses: list[list[Item]] = []
    for admin in administrations:
        previous = courses[-1][-1] if courses else None
        if (
            previous is not None
            and admin.get("administrations") == 1
            and previous.get("administrations") == 1
            and admin.date
            and previous.latest_date
            and (admin.date - previous.latest_date).days <= params["course_gap_days"]
        ):
            courses[-1].append(admin)
        else:
            courses.append([admin])

    def certain(fact_name: str) -> list[Item]:
        return [i for i in ctx.fact(fact_name).value or () if isinstance(i, Item) and i.date and i.certain]

    scales = {name: certain(name) for name in params["scores"]}
    cgi = certain(params["cgi_improvement"])
    functional = [i for i in certain(params["functional_improvement"]) if i.get("positive") is True]
    items: list[Item] = []
    for course in courses:
        start = course[0].date
        end = course[-1].get("end") or course[-1].latest_date
        assert start is not None and end is not None
        improved: bool | None = None
        notes: list[str] = []
        scored: list[Evidence] = []  # the scores that decide whether the course helped
        pairs = 0
        follow_until = end + timedelta(days=params["followup_window_days"])
        for name, scores in scales.items():
            baseline = [
                s
                for s in scores
                if start - timedelta(days=params["baseline_window_days"]) <= (s.date or start) <= start
            ]
            follow = [s for s in scores if start < (s.date or start) <= follow_until]
            if not baseline or not follow:
                continue
            b = max(baseline, key=lambda s: s.date or date.min)
            f = max(follow, key=lambda s: s.date or date.min)
            bv, fv = b.get("value"), f.get("value")
            if not isinstance(bv, int | float) or not isinstance(fv, int | float) or bv <= 0:
                continue
            pairs += 1
            scored += [b.evidence, f.evidence]
            change = (bv - fv) / bv
            notes.append(f"{name}: {bv:g} → {fv:g} ({change * 100:+.0f} % improvement)")
            if change >= params["min_relative_improvement"]:
                improved = True
        for item in cgi:
            value = item.get("value")
            if (
                item.date
                and start < item.date <= follow_until
                and isinstance(value, int | float)
                and value <= params["cgi_improved_max"]
            ):
                improved = True
                scored.append(item.evidence)
                notes.append(f"CGI-I {value:g} on {item.evidence.date}")
        for item in functional:
            if item.date and start < item.date <= follow_until:
                improved = True
                scored.append(item.evidence)
                notes.append(f"functional improvement documented {item.evidence.date}")
        if improved is None and pairs:
            improved = False
        purposes = {i.get("psychiatric") for i in course}
        psychiatric = True if purposes == {True} else None
        counts = [i.get("administrations") for i in course]
        count = None if any(c is None for c in counts) else sum(counts)
        first = course[0]
        shown = f"{count} administrations" if count is not None else "number of administrations not recorded"
        items.append(
            Item(
                Evidence(
                    first.evidence.reference,
                    date=first.evidence.date,
                    display=f"ketamine course {start.isoformat()} → {end.isoformat()}, {shown}",
                    note="; ".join(notes) or "no rating-scale pair around the course",
                ),
                date=end,
                support=(*scored, *(i.evidence for i in course[1:12])),
                fields={
                    "start": start,
                    "end": end,
                    "administrations": count,
                    "improved": improved,
                    "psychiatric": psychiatric,
                },
            )
        )
    return ctx.make_fact(fact.name, items, fact.reads)


@derivation(
    "ketamine_dose_notes",
    params={
        "body_weight": "fact",
        "mg_per_kg": "number",
        "minutes": "int",
        "tolerance": "number",
        "max_per_week": "int",
    },
    reads=("Observation",),
)
def ketamine_dose_notes(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Informational dosing notes for an IV ketamine order (never a block): dose vs mg/kg × latest weight,
    infusion length, and frequency per week in induction."""
    from fhir_mappings.reading.dosage import per_day

    notes: list[str] = []
    evidence: list[Evidence] = []
    if ctx.group is None or ctx.group.kind is not OrderKind.KETAMINE_ADMINISTRATION:
        return Fact(fact.name, FactState.ABSENT, ())
    order = ctx.group.primary.resource
    kg, weight = latest_weight_kg(ctx, params["body_weight"])
    for dosage in as_list(order.get("dosageInstruction")):
        if not isinstance(dosage, dict):
            continue
        for dose_rate in as_list(dosage.get("doseAndRate")):
            dose = dose_rate.get("doseQuantity") if isinstance(dose_rate, dict) else None
            mg = mass_mg(dose)
            if mg is None:
                continue
            if kg and weight is not None:
                per_kg = mg / kg
                target = params["mg_per_kg"]
                if abs(per_kg - target) > target * params["tolerance"]:
                    notes.append(
                        f"Dose {mg:g} mg is {per_kg:.2f} mg/kg at {kg:g} kg (latest weight {weight.evidence.date}); "
                        f"the policy's induction dose is {target:g} mg/kg over {params['minutes']} minutes."
                    )
                    evidence.append(weight.evidence)
            else:
                notes.append(
                    f"Dose {mg:g} mg could not be checked against {params['mg_per_kg']:g} mg/kg: "
                    "no body weight on record (in a known unit)."
                )
        timing = dosage.get("timing") if isinstance(dosage.get("timing"), dict) else {}
        repeat = timing.get("repeat") if isinstance(timing.get("repeat"), dict) else {}
        duration = _minutes(repeat.get("duration"), repeat.get("durationUnit"))
        if duration is not None and duration != params["minutes"]:
            notes.append(
                f"Infusion over {duration:g} minutes; the policy's starting dose is given over "
                f"{params['minutes']} minutes."
            )
        daily = per_day(timing)
        per_week = daily * 7 if daily is not None else None
        if per_week is not None and per_week > params["max_per_week"] + 1e-9:
            notes.append(
                f"Frequency {per_week:g} per week exceeds the induction schedule of "
                f"2–{params['max_per_week']} per week (weeks 1–4)."
            )
    if not notes:
        return Fact(fact.name, FactState.ABSENT, ())
    return Fact(fact.name, FactState.PRESENT, tuple(notes), tuple(evidence))


def _minutes(value: Any, unit: Any) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    factor = {"s": 1 / 60, "min": 1, "h": 60}.get(str(unit))
    return float(value) * factor if factor else None
