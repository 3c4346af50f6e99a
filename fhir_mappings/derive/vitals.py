"""Vital signs and clearances: blood pressure pairs in every shape EHRs send, documented specialist clearance.

Blood pressure arrives as a panel (85354-9, 55284-4 …) with systolic/diastolic components, as separate
systolic and diastolic Observations taken at the same instant, as panel members (`hasMember`), or as a
"160/95" string on the panel. Units must be mm[Hg] (or kPa, converted); a reading without a unit, with another
unit or a comparator is kept but uncertain. A clearance is an Observation (site code) whose result is read both
ways: a coded "No", valueBoolean false or "not cleared" is not a clearance.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fhir_mappings.derive.common import DONE_STATUSES, actor_roles, event_span, mention, status
from fhir_mappings.facts import DeriveFact, FactContext, Polarity, derivation, format_value, reference_of
from fhir_mappings.model import Bounds, Evidence, Fact
from fhir_mappings.reading.dates import DateSpan
from fhir_mappings.reading.values import Reading, own_value, readings, unit_factor
from fhir_mappings.record import as_list
from fhir_mappings.rules import Item

Resource = dict[str, Any]
_MM_HG = {"mm[Hg]": 1.0, "mmHg": 1.0, "mm Hg": 1.0, "millimeter of mercury": 1.0, "kPa": 7.50062}
_BP_STRING = re.compile(r"^\s*(\d{2,3}(?:\.\d+)?)\s*/\s*(\d{2,3}(?:\.\d+)?)\s*(mm\s*\[?hg\]?)?\s*$", re.IGNORECASE)


def _pressure(reading: Reading) -> tuple[float | Bounds | None, str | None]:
    """A systolic or diastolic value in mm[Hg], and why it is doubtful (None when it is not)."""
    number = reading.number()
    if number is None:
        return None, "no numeric value"
    factor = unit_factor(reading.unit, _MM_HG)
    if factor is None:
        return number, "no unit" if reading.unit is None else f"unit {reading.unit!r} is not mm[Hg]"
    if isinstance(number, Bounds):
        return Bounds(number.low * factor, number.high * factor), "a bound, not a measured value"
    return round(number * factor, 1), None


@derivation(
    "blood_pressures",
    params={"panel": "valueset", "systolic": "valueset", "diastolic": "valueset", "filter": "str"},
    reads=("Observation",),
)
def blood_pressures(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Blood pressure readings as systolic/diastolic pairs (fields `systolic`, `diastolic`, mm[Hg])."""
    status_filter = ctx.library.filters[params["filter"]]
    resolve = ctx.resolver()

    def test(vs: str) -> Any:
        return lambda concept: ctx.match(params[vs], [concept]) is not None

    is_panel, is_sys, is_dia = test("panel"), test("systolic"), test("diastolic")
    singles: dict[tuple[str, str], dict[str, Any]] = {}
    items: list[Item] = []
    in_panels: set[str] = set()
    for obs in ctx.record.of_type("Observation"):
        code = obs.get("code")
        verdict = ctx.verdict(status_filter, obs)  # computed once per request per filter
        if not isinstance(code, dict) or verdict is False:
            continue
        span = event_span(obs)
        if is_panel(code):
            values: dict[str, tuple[Any, str | None, str]] = {}
            for part, selects in (("systolic", is_sys), ("diastolic", is_dia)):
                for reading in readings(obs, selects, resolve):  # components, hasMember members
                    if part not in values:
                        value, doubt = _pressure(reading)
                        values[part] = (value, doubt, reading.path)
                        if "→" in reading.path:
                            in_panels.add(reading.holder.get("id", ""))
            text = own_value(obs).text
            if not values and text and (m := _BP_STRING.match(text)):
                values = {
                    "systolic": (float(m.group(1)), None, "valueString"),
                    "diastolic": (float(m.group(2)), None, "valueString"),
                }
            doubts = [d for _v, d, _p in values.values() if d]
            if verdict is None:
                doubts.append("status not final")
            items.append(_bp_item(obs, span, values, doubts))
            continue
        for part, selects in (("systolic", is_sys), ("diastolic", is_dia)):
            if selects(code):
                slot = singles.setdefault(
                    (span.text if span else "", "" if span and span.text else reference_of(obs)), {}
                )
                value, doubt = _pressure(own_value(obs))
                slot.setdefault("values", {})[part] = (value, doubt, "valueQuantity")
                slot.setdefault("resource", obs)
                slot.setdefault("others", []).extend([] if slot["resource"] is obs else [obs])
                slot["span"] = span
                slot.setdefault("doubts", []).extend([doubt] if doubt else [])
                if verdict is None:
                    slot["doubts"].append("status not final")
    for slot in singles.values():
        if slot["resource"].get("id") in in_panels:
            continue  # a member of a panel already read with it
        pair = _bp_item(slot["resource"], slot["span"], slot["values"], slot["doubts"])
        others = tuple(
            Evidence(reference_of(o), date=pair.evidence.date, note="the other half of the pair")
            for o in slot.get("others", [])
        )
        items.append(replace(pair, support=others))
    return ctx.make_fact(fact.name, items, ("Observation",))


def _show(value: Any) -> str:
    if isinstance(value, Bounds):
        return str(value)
    return format_value(value) or "?"


def _bp_item(
    obs: Resource, span: DateSpan | None, values: Mapping[str, tuple[Any, str | None, str]], doubts: list[str]
) -> Item:
    systolic = values.get("systolic", (None, None, ""))[0]
    diastolic = values.get("diastolic", (None, None, ""))[0]
    shown = f"{_show(systolic)}/{_show(diastolic)} mm[Hg]"
    return Item(
        Evidence(
            reference_of(obs),
            date=span.text if span else None,
            code="LOINC blood pressure",
            value=shown,
            note="; ".join(doubts) or None,
            path=", ".join(p for _v, _d, p in values.values() if p) or None,
        ),
        date=span.low if span else None,
        span=(span.low, span.high) if span and not span.exact else None,
        fields={"systolic": systolic, "diastolic": diastolic, "value": shown},
        certain=not doubts,
    )


@derivation(
    "specialist_clearances",
    params={"clearance": "valueset", "roles": "map", "answers_yes": "valuesets", "answers_no": "valuesets"},
    reads=("Observation", "Procedure", "Encounter"),
    optional=("answers_yes", "answers_no"),
)
def specialist_clearances(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Documented clearance for IV ketamine, with the specialties of who gave it (field `roles`; None when the
    performer cannot be read). An Observation with a clearance code counts when its result says yes; a "no" /
    false / "not cleared" result is no clearance; no result, or anything else, is uncertain. A consultation
    Procedure or Encounter whose note states the clearance is read too, as text-only evidence (it cannot lift
    an exclusion on its own: the card asks for the coded clearance and quotes it)."""
    # A clearance observation must say yes: one without a value is an unanswered clearance question, not a
    # clearance (lifting an exclusion needs positive evidence).
    polarity = Polarity(
        positive=tuple(params.get("answers_yes") or ("ans_yes", "ans_positive_words")),
        negative=tuple(params.get("answers_no") or ("ans_no", "ans_negative")),
    )
    items: list[Item] = []

    def roles_of(resource: Resource, actors: list[Any]) -> tuple[frozenset[str] | None, str]:
        value, found = actor_roles(ctx, resource, actors, params["roles"])
        return value, (f"by {', '.join(sorted(found))}" if found else "specialty of who cleared not identified")

    for obs in ctx.record.of_type("Observation"):
        code = obs.get("code")
        if not isinstance(code, dict) or status(obs) not in ("final", "amended", "corrected"):
            continue  # a preliminary (unsigned) clearance is not documented clearance
        match = ctx.match(params["clearance"], [dict(code)])
        if match is None:
            continue
        reading = own_value(obs)
        said = ctx.polarity(polarity, reading)
        if said.value is None and reading.text:
            # narrative result ("Not cleared - defer ketamine until EVAR"): a clearance it negates is none; one it
            # affirms stays undetermined (text-only)
            negated = [
                f
                for vs in (params["clearance"], *polarity.positive)
                if (f := ctx.registry.get(vs).find_in_text(reading.text)) is not None
            ]
            if negated and all(f.assertion.value == "negated" for f in negated):
                continue
        if said.value is False:
            continue  # documented as NOT cleared: no clearance
        roles, who = roles_of(obs, as_list(obs.get("performer")))
        uncertain = said.value is None
        items.append(
            ctx.item_for(
                obs,
                match,
                span=event_span(obs),
                fields={"roles": roles},
                note=f"{who}; {'cleared' if said.value else 'result undetermined'}: {said.how}",
                path="value[x]",
                certain=not uncertain,
            )
        )
    for resource in [*ctx.record.of_type("Procedure"), *ctx.record.of_type("Encounter")]:
        if status(resource) not in DONE_STATUSES[str(resource.get("resourceType"))]:
            continue
        said_text = mention(ctx, resource, [params["clearance"]])
        if said_text is None or said_text.said is False:
            continue
        actors = [p.get("actor") for p in as_list(resource.get("performer")) if isinstance(p, dict)] + [
            p.get("individual") for p in as_list(resource.get("participant")) if isinstance(p, dict)
        ]
        roles, who = roles_of(resource, actors)
        item = ctx.item_for(
            resource,
            said_text.match,
            span=event_span(resource),
            fields={"roles": roles},
            note=f"{who}; {said_text.note()}",
            path="note",
            certain=said_text.said is True,
        )
        items.append(
            Item(
                item.evidence,
                item.date,
                item.fields,
                item.codes,
                item.span,
                item.support,
                item.certain,
                text_only=said_text.match is None,
            )
        )
    return ctx.make_fact(fact.name, items, fact.reads)
