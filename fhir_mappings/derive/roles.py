"""Who and where: practitioner specialties (through PractitionerRole), the order's requester and performer,
the patient's care relationships, psychiatric evaluations, and where the ordered service takes place.

A role counts only when its specialty is the one the policy names: the value sets hold specialties (NUCC
taxonomy, SNOMED practitioner roles), so a family nurse practitioner is not a psychiatric APRN. The place and
the treating clinician of the ordered service come from the order itself — performer, locationCode,
locationReference, the infusion ServiceRequest signed with it — never from the encounter in which the order
was signed (that is where the prescriber is, not where the infusion happens).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fhir_mappings.derive.common import DONE_STATUSES, actor_roles, event_span, mention, status, valueset_ids
from fhir_mappings.facts import DeriveFact, FactContext, derivation, reference_of
from fhir_mappings.model import Evidence, Fact, FactState
from fhir_mappings.reading.dates import parse_span
from fhir_mappings.record import as_list, reference_key
from fhir_mappings.rules import Item
from fhir_mappings.valuesets import CodeMatch

Resource = dict[str, Any]


@dataclass
class RoleLookup:
    """Specialties of whoever a reference points to, with the evidence and whether we could tell."""

    labels: dict[str, CodeMatch] = field(default_factory=dict)
    evidence: list[Evidence] = field(default_factory=list)
    known: bool = False  # False: the practitioner or their roles could not be read
    doubtful: set[str] = field(default_factory=set)  # labels whose licence is recorded as expired / not yet valid


def in_force(element: Mapping[str, Any], today: Any) -> bool:
    """A PractitionerRole or qualification is in force when it is not inactive and its period (if any) has
    begun and not ended (a licence that expired, training that starts next month: not in force)."""
    if element.get("active") is False:
        return False
    period = element.get("period")
    if not isinstance(period, dict):
        return True
    start, end = parse_span(period.get("start")), parse_span(period.get("end"))
    if start is not None and start.low > today:
        return False
    return not (end is not None and end.high < today)


def _roles_by_practitioner(ctx: FactContext) -> dict[str, list[Resource]]:
    cache = getattr(ctx, "_roles_index", None)
    if cache is None:
        cache = {}
        for role in ctx.record.of_type("PractitionerRole"):
            ref = (
                (role.get("practitioner") or {}).get("reference")
                if isinstance(role.get("practitioner"), dict)
                else None
            )
            key = reference_key(ref) if isinstance(ref, str) else None
            if key:
                cache.setdefault(key, []).append(role)
        ctx._roles_index = cache  # type: ignore[attr-defined]
    return cache


def _role_concepts(role: Resource) -> list[dict[str, Any]]:
    return [c for c in as_list(role.get("specialty")) + as_list(role.get("code")) if isinstance(c, dict)]


def lookup_roles(
    ctx: FactContext, reference: Any, role_sets: Mapping[str, str], within: Resource | None = None
) -> RoleLookup:
    """Which of `role_sets` (label -> value set) the referenced practitioner/role has.

    A PractitionerRole is read directly (specialty, code); a Practitioner through its PractitionerRoles in the
    record and its qualifications. Unknown when the reference cannot be resolved, or when a Practitioner's
    roles were never fetchable (prefetch-only call without a FHIR server). An inactive role does not count.
    """
    result = RoleLookup()
    target = ctx.record.resolve(reference, within=within)
    if target is None:
        return result
    concepts: list[tuple[Resource, dict[str, Any]]] = []
    rtype = target.get("resourceType")
    qualifications: set[int] = set()
    lapsed: list[dict[str, Any]] = []  # qualifications recorded as expired or not yet valid
    practitioner: Resource | None = None
    if rtype == "PractitionerRole":
        # a role that has ended (or not begun) says nothing about what the practitioner is now: unknown
        result.known = in_force(target, ctx.today)
        if result.known:
            concepts += [(target, c) for c in _role_concepts(target)]
        practitioner = (
            ctx.record.resolve(target.get("practitioner"), within=target) if target.get("practitioner") else None
        )
    elif rtype == "Practitioner":
        key = reference_of(target)
        roles = [r for r in _roles_by_practitioner(ctx).get(key, []) if in_force(r, ctx.today)]
        lookup_failed = f"PractitionerRole?practitioner={target.get('id')}" in ctx.record.unresolved_references
        result.known = bool(roles) or (ctx.record.references_resolvable and not lookup_failed)
        for role in roles:
            concepts += [(role, c) for c in _role_concepts(role)]
        practitioner = target
    else:
        return result
    if practitioner is not None and practitioner.get("resourceType") == "Practitioner":
        for qualification in as_list(practitioner.get("qualification")):
            code = qualification.get("code") if isinstance(qualification, dict) else None
            if not isinstance(code, dict):
                continue
            if in_force(qualification, ctx.today):
                concepts.append((practitioner, dict(code)))
                qualifications.add(id(concepts[-1][1]))
            else:
                lapsed.append(dict(code))
    for label, vs_id in role_sets.items():
        for holder, concept in concepts:
            match = ctx.match(vs_id, [concept])
            if match is not None:
                if match.via == "text" and id(concept) in qualifications:
                    # A licence is named in Practitioner.qualification.code text: there is no standard code for
                    # LCSW / LPC / LMFT licences, so the name is the standard shape (not text-only evidence).
                    match = replace(match, via="qualification-text")
                result.labels[label] = match
                result.evidence.append(
                    Evidence(reference_of(holder), code=match.label(), display=match.display, note=f"{label} role")
                )
                break
        current = [c for h, c in concepts if id(c) in qualifications and ctx.match(vs_id, [c]) is not None]
        if label in result.labels and not current and ctx.match(vs_id, lapsed) is not None:
            result.doubtful.add(label)  # the licence this role needs is on record as expired / not yet valid
    return result


def role_items(
    ctx: FactContext, references: Iterable[tuple[Any, Resource | None, str]], role_sets: Mapping[str, str]
) -> tuple[list[Item], bool]:
    """Items for every role label found on the given references; also whether all were knowable."""
    items: list[Item] = []
    all_known = True
    for reference, holder, how in references:
        lookup = lookup_roles(ctx, reference, role_sets, within=holder)
        all_known = all_known and lookup.known
        for label, match in lookup.labels.items():
            ev = next(e for e in lookup.evidence if e.note == f"{label} role")
            doubt = "; licence on record is expired or not yet valid" if label in lookup.doubtful else ""
            items.append(
                Item(
                    evidence=Evidence(ev.reference, code=ev.code, display=ev.display, note=f"{how}: {label}{doubt}"),
                    date=ctx.today,
                    fields={"role": label, "via": how},
                    text_only=match.via == "text",
                    certain=label not in lookup.doubtful,
                )
            )
    return items, all_known


def order_people(ctx: FactContext, element: str) -> list[tuple[Any, Resource | None, str]]:
    refs: list[tuple[Any, Resource | None, str]] = []
    if ctx.group is None:
        return refs
    for order in ctx.group.orders:
        for ref in as_list(order.resource.get(element)):
            actor = ref.get("actor") if isinstance(ref, dict) and "actor" in ref else ref
            if isinstance(actor, dict):
                refs.append((actor, order.resource, f"{order.ref} {element}"))
    return refs


def people_fact(name: str, items: list[Item], known: bool) -> Fact:
    if items:
        return Fact(name, FactState.PRESENT, tuple(items), tuple(i.evidence for i in items), "", known)
    return Fact(
        name, FactState.ABSENT if known else FactState.UNAVAILABLE, (), (), "" if known else "roles unknown", known
    )


@derivation("order_requester_roles", params={"roles": "map"}, reads=("PractitionerRole",))
def order_requester_roles(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Specialties of the ordering clinician (the draft order's requester, else the signing user: in order-sign
    the user who signs is the one ordering)."""
    refs = order_people(ctx, "requester")
    if not refs and ctx.record.user_id:
        refs = [({"reference": ctx.record.user_id}, None, "signing user (context.userId)")]
    items, known = role_items(ctx, refs, params["roles"])
    return people_fact(fact.name, items, known and bool(refs))


@derivation("order_performer_roles", params={"roles": "map"}, reads=("PractitionerRole",))
def order_performer_roles(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Specialties of who will perform/monitor the ordered service (ServiceRequest/MedicationRequest.performer)."""
    refs = order_people(ctx, "performer")
    items, known = role_items(ctx, refs, params["roles"])
    return people_fact(fact.name, items, known and bool(refs))


# --- where ----------------------------------------------------------------------------------------------------
@derivation(
    "order_setting",
    params={
        "facility_classes": "valueset",
        "home_classes": "valueset",
        "facility_location_types": "valueset",
        "home_location_types": "valueset",
    },
    reads=(),
    optional=("facility_classes", "home_location_types"),
)
def order_setting(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Where the ordered service happens (facility = hospital/office, or home), from the order itself:
    ServiceRequest.locationCode, locationReference → Location.type, and the performer's PractitionerRole
    locations (a role with several locations does not say which: uncertain). The encounter the order was
    signed in is deliberately not read."""
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, (), (), "no order")
    items: list[Item] = []
    unresolved = False

    def classify(resource: Resource, concept: Mapping[str, Any], how: str, *, certain: bool = True) -> None:
        choices = [("facility", params["facility_location_types"]), ("home", params["home_classes"])]
        if params.get("home_location_types"):
            choices.append(("home", params["home_location_types"]))
        for setting, vs in choices:
            match = ctx.match(vs, [concept])
            if match is not None:
                items.append(
                    Item(
                        Evidence(reference_of(resource), code=match.label(), display=match.display, note=how),
                        date=ctx.today,
                        fields={"setting": setting},
                        certain=certain,
                        text_only=match.via == "text",
                    )
                )
                return

    def location(ref: Any, holder: Resource, how: str) -> None:
        nonlocal unresolved
        target = ctx.record.resolve(ref, within=holder)
        if target is None:
            unresolved = True
            return
        if target.get("resourceType") != "Location":
            return
        for concept in as_list(target.get("type")):
            if isinstance(concept, dict):
                classify(target, concept, how)

    for order in ctx.group.orders:
        res = order.resource
        for concept in as_list(res.get("locationCode")):
            if isinstance(concept, dict):
                classify(res, concept, "order locationCode")
        for ref in as_list(res.get("locationReference")):
            location(ref, res, "order locationReference")
        for ref in as_list(res.get("performer")):
            performer = ctx.record.resolve(ref, within=res)
            if performer is None:
                continue
            if performer.get("resourceType") == "PractitionerRole":
                roles = [performer]
            elif performer.get("resourceType") == "Practitioner":
                roles = [
                    r
                    for r in _roles_by_practitioner(ctx).get(reference_of(performer), [])
                    if r.get("active") is not False
                ]
            else:
                continue
            before = len(items)
            for role in roles:
                for loc in as_list(role.get("location")):
                    location(loc, role, "performer's location")
            found = items[before:]
            if len({i.get("setting") for i in found}) > 1:
                # the role works in places of different kinds (an office and patients' homes): which one is
                # not said, so none of them decides
                items[before:] = [replace(i, certain=False) for i in found]
    if items:
        return Fact(fact.name, FactState.PRESENT, tuple(items), tuple(i.evidence for i in items), "", not unresolved)
    return Fact(fact.name, FactState.UNAVAILABLE, (), (), "the order states no place of administration", False)


# --- care and evaluations -------------------------------------------------------------------------------------
@derivation("care_relationships", params={"roles": "map"}, reads=("Encounter", "CareTeam"))
def care_relationships(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Clinicians of the given roles caring for the patient: participants of encounters that took place (dated
    by the encounter) and members of an active CareTeam (dated today: the team is current; a member whose
    participation period has ended does not count)."""
    items: list[Item] = []
    # The same few clinicians take part in many encounters: their roles are looked up once per resolved
    # practitioner (a lookup depends on nothing else), keyed by the id of the record's resource.
    by_target: dict[int, RoleLookup] = {}
    for encounter in ctx.record.of_type("Encounter"):
        if status(encounter) not in DONE_STATUSES["Encounter"]:
            continue
        span = event_span(encounter)
        for participant in as_list(encounter.get("participant")):
            individual = participant.get("individual") if isinstance(participant, dict) else None
            if not isinstance(individual, dict):
                continue
            target = ctx.record.resolve(individual, within=encounter)
            if target is None:
                continue  # lookup_roles finds no role for what cannot be resolved
            lookup = by_target.get(id(target))
            if lookup is None:
                lookup = by_target[id(target)] = lookup_roles(ctx, individual, params["roles"], within=encounter)
            for label, match in lookup.labels.items():
                items.append(
                    ctx.item_for(encounter, match, span=span, fields={"role": label}, note=f"{label} encounter")
                )
    for team in ctx.record.of_type("CareTeam"):
        if status(team) not in ("active", None):
            continue
        for participant in as_list(team.get("participant")):
            member = participant.get("member") if isinstance(participant, dict) else None
            if not isinstance(member, dict):
                continue
            period = participant.get("period") if isinstance(participant.get("period"), dict) else {}
            ended = period.get("end") if isinstance(period, dict) else None
            if isinstance(ended, str) and ended[:10] < ctx.today.isoformat():
                continue
            lookup = lookup_roles(ctx, member, params["roles"], within=team)
            for label, match in lookup.labels.items():
                items.append(
                    ctx.item_for(team, match, when=ctx.today, fields={"role": label}, note=f"{label} on care team")
                )
    return ctx.make_fact(fact.name, items, fact.reads)


@derivation(
    "evaluations_by_role",
    params={"codes": "valueset", "roles": "map", "candidacy": "valuesets"},
    reads=("Procedure", "Encounter"),
    optional=("candidacy",),
)
def evaluations_by_role(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Completed evaluations (Procedure.code or Encounter.type in `codes`) with the role of who performed them
    (field `roles`: set of labels; None when the performer could not be read) and whether they document the
    determination in `candidacy` (field `candidacy`: True coded or affirmed in the note / reason; False when
    the text negates it — "not a candidate for IV ketamine"; None when it is uncertain or hypothetical —
    "would be a candidate once cleared" — or not mentioned at all). The same
    evaluation recorded as a Procedure and as its Encounter is one item, reading both."""
    candidacy_sets = valueset_ids(params.get("candidacy"))
    sources: list[tuple[Resource, list[Any], list[Any]]] = []
    for proc in ctx.record.of_type("Procedure"):
        if status(proc) == "completed":
            actors = [p.get("actor") for p in as_list(proc.get("performer")) if isinstance(p, dict)]
            sources.append((proc, [proc.get("code")], actors))
    for enc in ctx.record.of_type("Encounter"):
        if status(enc) in ("finished", "in-progress", "arrived"):
            actors = [p.get("individual") for p in as_list(enc.get("participant")) if isinstance(p, dict)]
            sources.append((enc, as_list(enc.get("type")), actors))
    linked: dict[str, Resource] = {}
    for resource, _c, _a in sources:
        if resource.get("resourceType") == "Procedure" and isinstance(resource.get("encounter"), dict):
            key = reference_key(str(resource["encounter"].get("reference", "")))
            if key:
                linked[key] = resource
    items: list[Item] = []
    for resource, concepts, actors in sources:
        match = ctx.match(params["codes"], [c for c in concepts if isinstance(c, dict)])
        if match is None:
            continue
        if resource.get("resourceType") == "Encounter" and reference_of(resource) in linked:
            continue  # its Procedure is the same evaluation (and is read with it)
        companions = [resource]
        if resource.get("resourceType") == "Procedure" and isinstance(resource.get("encounter"), dict):
            encounter = ctx.record.resolve(resource["encounter"], within=resource)
            if encounter is not None:
                companions.append(encounter)
                actors = actors + [
                    p.get("individual") for p in as_list(encounter.get("participant")) if isinstance(p, dict)
                ]
        role_field, roles = actor_roles(ctx, resource, actors, params["roles"])
        candidacy: bool | None = None
        candidacy_note = ""
        if candidacy_sets:
            said = [m for m in (mention(ctx, r, candidacy_sets) for r in companions) if m is not None]
            positive = [m for m in said if m.said is True]
            decided = positive or [m for m in said if m.said is False] or [m for m in said if m.said is None]
            if decided:
                candidacy, candidacy_note = decided[0].said, decided[0].note()
            else:
                candidacy, candidacy_note = None, "candidacy not mentioned"
        notes = [f"by {', '.join(sorted(roles))}" if roles else ("performer not identified" if not actors else "")]
        notes.append(candidacy_note)
        items.append(
            ctx.item_for(
                resource,
                match,
                span=event_span(resource),
                fields={"roles": role_field, "candidacy": candidacy},
                note="; ".join(n for n in notes if n) or None,
            )
        )
    return ctx.make_fact(fact.name, items, fact.reads)
