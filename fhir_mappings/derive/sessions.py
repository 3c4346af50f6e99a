"""MP-054 (ketamine-assisted psychotherapy): KAP and integration sessions, the clinic and its clinicians.

A session is one event however it is recorded — a Procedure, an Encounter typed by its CPT code, or both
(linked through Procedure.encounter, or on the same day): counted once. The KAP session an integration session
follows is a ketamine administration of psychiatric purpose (see `ketamine`); one of undetermined purpose makes
the timing undetermined, one of another purpose (anaesthesia, the emergency department) is not a KAP session.
Dates must be full days: a partial date cannot say whether a session was 1–3 days after the KAP session.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

from fhir_mappings.derive.common import coded_events, mention, occurrence_item, occurrences, valueset_ids
from fhir_mappings.derive.order_facts import order_date
from fhir_mappings.derive.roles import in_force, people_fact, role_items
from fhir_mappings.facts import DeriveFact, FactContext, derivation, format_value, reference_of
from fhir_mappings.model import Evidence, Fact, FactState
from fhir_mappings.record import as_list, reference_key
from fhir_mappings.rules import Item

Resource = dict[str, Any]


@derivation("sessions", params={"codes": "valuesets"}, reads=("Procedure", "Encounter"))
def sessions(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Sessions that took place, coded in one of `codes` on a Procedure or an Encounter's type, one item per event
    (the same session recorded twice counts once; the other records are cited as support)."""
    items: list[Item] = []
    for occurrence in occurrences(coded_events(ctx, valueset_ids(params["codes"]))):
        items.append(
            occurrence_item(
                occurrence, fields={"exact_date": occurrence.day}, text_only=occurrence.matches[0].via == "text"
            )
        )
    return ctx.make_fact(fact.name, items, fact.reads)


@derivation(
    "integration_timing",
    params={"kap_sessions": "fact", "sessions": "fact", "course_gap_days": "int", "justification": "valuesets"},
    reads=("Procedure", "Encounter", "MedicationAdministration"),
)
def integration_timing(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Where this integration session falls relative to the KAP session(s) and earlier integration sessions.

    One item (evidence: the latest KAP session before the session date; support: the integration sessions
    already on record in this KAP course) with fields: days_after_kap (session date − latest KAP session),
    sessions_in_course (integration sessions already on record since the start of the current KAP course),
    first_session_days_after_kap (of an earlier session after the latest KAP session; None if this is the
    first), same_day_session (another integration session already on the session date), justification (the
    order names a clinical justification: True / False / None when the text is uncertain). The item is
    uncertain when a ketamine administration of undetermined purpose, or a partially dated one, lies between
    the latest KAP session and this session. ABSENT without a KAP session.
    """
    session_date, session_text = order_date(ctx)
    kap_fact = ctx.fact(params["kap_sessions"])
    all_kap = [i for i in kap_fact.value or () if isinstance(i, Item) and i.date and i.date <= session_date]
    kap = sorted(
        (i for i in all_kap if i.get("psychiatric") is True and i.span is None), key=lambda i: i.date or date.min
    )
    if not kap:
        undetermined = [i for i in all_kap if i.get("psychiatric") is None or i.span is not None]
        return Fact(
            fact.name,
            FactState.ABSENT if kap_fact.complete and not undetermined else FactState.UNAVAILABLE,
            (),
            tuple(i.evidence for i in undetermined),
            "no KAP session on record" if not undetermined else "ketamine on record, purpose or date undetermined",
            kap_fact.complete and not undetermined,
        )
    latest = kap[-1]
    assert latest.date is not None
    doubtful = [i for i in all_kap if i not in kap and (i.latest_date or date.min) >= latest.date]
    course_start = latest.date
    for item in reversed(kap[:-1]):
        if item.date and (course_start - item.date).days <= params["course_gap_days"]:
            course_start = item.date
        else:
            break
    own_ids = {o.ref for o in ctx.group.orders} if ctx.group else set()
    # a psychotherapy record that is the KAP dosing session itself (recorded with it) is not an integration session
    own_ids |= {e.reference for i in all_kap for e in (i.evidence, *i.support)}
    sessions_fact = ctx.fact(params["sessions"])
    earlier = sorted(
        (
            s
            for s in sessions_fact.value or ()
            if isinstance(s, Item)
            and s.date
            and (s.latest_date or s.date) >= course_start
            and s.evidence.reference not in own_ids
        ),
        key=lambda s: s.date or date.min,
    )
    after_latest = [s for s in earlier if s.date and s.date >= latest.date]
    first_after = None
    if after_latest:
        first = after_latest[0]
        first_after = (first.date - latest.date).days if first.span is None and first.date else None
    same_day = [s for s in earlier if s.date == session_date and s.span is None]
    order = ctx.group.primary.resource if ctx.group else {}
    said = mention(ctx, order, valueset_ids(params["justification"]))
    justification = said.said if said is not None else False
    prior = "; ".join(f"{s.evidence.reference} on {s.evidence.date}" for s in earlier)
    days_after = (session_date - latest.date).days
    hours_after = _hours_between(ctx, latest, order)
    item = Item(
        Evidence(
            latest.evidence.reference,
            date=latest.evidence.date,
            code=latest.evidence.code,
            display=f"KAP session {latest.date.isoformat()}; this session {session_date.isoformat()}",
            value=f"{days_after} days after the KAP session",
            note=f"integration sessions already on record since {course_start}: {prior or 'none'}"
            + (f"; justification {said.note()}" if said is not None else ""),
        ),
        date=session_date,
        support=tuple(s.evidence for s in earlier) + tuple(i.evidence for i in doubtful),
        # an earlier session dated only by month or year may be the same day or the first after the KAP session:
        # then how many sessions came before, and when, is not decided
        # … and when sessions or KAP sessions could not all be read, more of them may be on record
        certain=not doubtful
        and not any(s.span is not None for s in earlier)
        and sessions_fact.complete
        and kap_fact.complete,
        fields={
            "days_after_kap": days_after,
            "sessions_in_course": len(earlier),
            "first_session_days_after_kap": first_after,
            "same_day_session": bool(same_day),
            "justification": justification,
            "hours_after_kap": hours_after,
        },
    )
    return Fact(fact.name, FactState.PRESENT, (item,), (item.evidence, *item.support), session_text)


def _hours_between(ctx: FactContext, kap: Item, order: Mapping[str, Any]) -> float | None:
    """Hours from the KAP dosing to the ordered session, when both carry a time of day (None otherwise)."""
    from datetime import datetime

    def instant(value: Any) -> datetime | None:
        if not isinstance(value, str) or "T" not in value:
            return None
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return when if when.tzinfo is not None else None

    dosed = None
    for evidence in (kap.evidence, *kap.support):
        record = ctx.record.get(evidence.reference) or {}
        for key in ("effectiveDateTime", "performedDateTime"):
            dosed = dosed or instant(record.get(key))
        for key in ("effectivePeriod", "performedPeriod", "period"):
            period = record.get(key)
            if isinstance(period, dict):
                dosed = dosed or instant(period.get("start"))
    start = instant(order.get("occurrenceDateTime"))
    if start is None and isinstance(order.get("occurrencePeriod"), dict):
        start = instant(order["occurrencePeriod"].get("start"))
    if dosed is None or start is None:
        return None
    return round((start - dosed).total_seconds() / 3600, 2)


def _organisations_of_order(ctx: FactContext) -> tuple[list[Resource], bool]:
    """Organizations and Locations where the ordered service happens (performer, its role's organization and
    locations, locationReference) and whether every reference resolved — never the signing encounter's."""
    found: list[Resource] = []
    resolved = True
    if ctx.group is None:
        return found, False

    def take(ref: Any, within: Resource | None) -> None:
        nonlocal resolved
        if not isinstance(ref, dict):
            return
        target = ctx.record.resolve(ref, within=within)
        if target is None:
            resolved = False
            return
        rtype = target.get("resourceType")
        if rtype in ("Organization", "Location"):
            found.append(target)
            if rtype == "Location":
                take(target.get("managingOrganization"), target)
        elif rtype == "PractitionerRole":
            take(target.get("organization"), target)
            for loc in as_list(target.get("location")):
                take(loc, target)
        elif rtype == "Encounter":
            take(target.get("serviceProvider"), target)
            for loc in as_list(target.get("location")):
                take(loc.get("location") if isinstance(loc, dict) else None, target)

    for order in ctx.group.orders:
        res = order.resource
        for key in ("performer", "locationReference"):
            for ref in as_list(res.get(key)):
                take(ref, res)
        # the encounter the order is signed in is where the ordering happens, not where the session does
    unique = {reference_of(r): r for r in found}
    return list(unique.values()), resolved


@derivation("clinic_credentialing", params={"clinics": "valueset"}, reads=())
def clinic_credentialing(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Whether the Organization/Location performing the service is on the site's credentialed-clinic list
    (identifiers system|value). Field `credentialed` is None when the site has configured no list."""
    places, resolved = _organisations_of_order(ctx)
    configured = len(ctx.registry.get(params["clinics"])) > 0
    # A Location without identifiers of its own, managed by an Organization that is among the places, is that
    # clinic's site: the Organization's identifiers decide.
    place_refs = {reference_of(p) for p in places}
    places = [
        p
        for p in places
        if not (
            p.get("resourceType") == "Location"
            and not p.get("identifier")
            and isinstance(p.get("managingOrganization"), dict)
            and reference_key(str(p["managingOrganization"].get("reference", ""))) in place_refs
        )
    ]
    items: list[Item] = []
    for place in places:
        match = None
        for ident in as_list(place.get("identifier")):
            if isinstance(ident, dict) and ident.get("system") and ident.get("value"):
                match = ctx.match(
                    params["clinics"], [{"coding": [{"system": ident["system"], "code": ident["value"]}]}]
                )
                if match:
                    break
        identified = any(
            isinstance(i, dict) and i.get("system") and i.get("value") for i in as_list(place.get("identifier"))
        )
        # Only an identified clinic can be "not on the list"; a place without identifiers is simply unknown.
        credentialed = True if match else (False if configured and identified else None)
        items.append(
            Item(
                Evidence(
                    reference_of(place),
                    display=place.get("name"),
                    code=match.label() if match else None,
                    note="credentialed clinic"
                    if match
                    else (
                        "not on the credentialed list"
                        if credentialed is False
                        else ("no identifier" if configured else "no credentialed-clinic list configured")
                    ),
                ),
                date=ctx.today,
                fields={"credentialed": credentialed},
            )
        )
    if items:
        return Fact(fact.name, FactState.PRESENT, tuple(items), tuple(i.evidence for i in items), "", resolved)
    return Fact(fact.name, FactState.UNAVAILABLE, (), (), "no clinic identified on the order", False)


@derivation("clinic_roles", params={"roles": "map", "kap_sessions": "fact"}, reads=())
def clinic_roles(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Qualified clinicians at the clinic: PractitionerRoles of the performing organization in the record,
    and the performers of the latest KAP session (who monitored the member)."""
    places, _ = _organisations_of_order(ctx)
    org_refs = {reference_of(p) for p in places}
    refs: list[tuple[Any, Resource | None, str]] = []
    for role in ctx.record.of_type("PractitionerRole"):
        org = (role.get("organization") or {}).get("reference")
        if isinstance(org, str) and reference_key(org) in org_refs:
            refs.append(({"reference": reference_of(role)}, None, "clinic staff"))
    kap = [
        i
        for i in ctx.fact(params["kap_sessions"]).value or ()
        if isinstance(i, Item) and i.date and i.get("psychiatric") is not False
    ]
    if kap:
        latest = max(kap, key=lambda i: i.date or date.min)
        # A KAP session is often several records (the dosing Procedure, the MedicationAdministration, the
        # Encounter): the item cites them all; read every record's performers / participants.
        records = [ctx.record.get(e.reference) for e in (latest.evidence, *latest.support)]
        # the visit the dosing happened in (MedicationAdministration.context / Procedure.encounter) names its staff
        records += [
            ctx.record.resolve(r.get(key), within=r)
            for r in list(records)
            if r is not None
            for key in ("context", "encounter")
            if isinstance(r.get(key), dict)
        ]
        seen: set[str] = set()
        for session in records:
            if session is None or reference_of(session) in seen:
                continue
            seen.add(reference_of(session))
            for performer in as_list((session or {}).get("performer")) + as_list((session or {}).get("participant")):
                if not isinstance(performer, dict):
                    continue
                actor = performer.get("actor") or performer.get("individual")
                if isinstance(actor, dict):
                    refs.append((actor, session, "KAP session monitor"))
    items, known = role_items(ctx, refs, params["roles"])
    return people_fact(fact.name, items, known and bool(refs))


@derivation("performer_training", params={"training": "valueset"}, reads=())
def performer_training(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """KAP / psychedelic-assisted therapy training of the practitioner performing the order: a
    Practitioner.qualification whose code is in `training` (code or text)."""
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, ())
    items: list[Item] = []
    known = False
    for order in ctx.group.orders:
        for ref in as_list(order.resource.get("performer")):
            target = ctx.record.resolve(ref, within=order.resource)
            if target is not None and target.get("resourceType") == "PractitionerRole":
                target = ctx.record.resolve(target.get("practitioner"), within=target)
            if target is None or target.get("resourceType") != "Practitioner":
                continue
            known = True
            for qualification in as_list(target.get("qualification")):
                code = qualification.get("code") if isinstance(qualification, dict) else None
                if not isinstance(code, dict) or not in_force(qualification, ctx.today):
                    continue  # not yet obtained, or expired
                match = ctx.match(params["training"], [dict(code)])
                if match is not None:
                    items.append(
                        Item(
                            Evidence(
                                reference_of(target),
                                code=match.label(),
                                display=format_value(code),
                                note="qualification",
                            ),
                            date=ctx.today,
                        )
                    )
    if items:
        return Fact(fact.name, FactState.PRESENT, tuple(items), tuple(i.evidence for i in items), "", True)
    return Fact(
        fact.name,
        FactState.ABSENT if known else FactState.UNAVAILABLE,
        (),
        (),
        "" if known else "performer not identified",
        known,
    )


@derivation(
    "evaluations_mentioning", params={"codes": "valueset", "mentions": "valuesets"}, reads=("Procedure", "Encounter")
)
def evaluations_mentioning(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Completed evaluations (Procedure.code / Encounter.type in `codes`) whose reason, notes or code text
    name one of the `mentions` value sets — e.g. a 90791 consultation "for ketamine-assisted psychotherapy".
    Read with ConText: "KAP not discussed" is no such evaluation; "may consider KAP" is an uncertain one.
    An evaluation recorded as a Procedure and its Encounter is one item."""
    mentions = valueset_ids(params["mentions"])
    items: list[Item] = []
    for occurrence in occurrences(coded_events(ctx, [params["codes"]])):
        said = [m for m in (mention(ctx, r, mentions, topic=True) for r in occurrence.records) if m is not None]
        positive = [m for m in said if m.said is True]
        undecided = [m for m in said if m.said is None]
        if not positive and not undecided:
            continue
        chosen = (positive or undecided)[0]
        note = f"mentions ketamine-assisted psychotherapy ({chosen.note()})"
        items.append(occurrence_item(occurrence, note, certain=bool(positive)))
    return ctx.make_fact(fact.name, items, fact.reads)
