"""Helpers every topic module uses: status, dates, reasons and purpose, one event recorded several times."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from fhir_mappings.facts import FactContext, reference_of
from fhir_mappings.model import Evidence
from fhir_mappings.reading.dates import DateSpan, first_span
from fhir_mappings.record import as_list, reference_key
from fhir_mappings.rules import Item
from fhir_mappings.valuesets import CodeMatch

Resource = dict[str, Any]

# Where each resource type dates the event it records (first path with a date wins).
EVENT_DATE_PATHS: dict[str, tuple[str, ...]] = {
    "Procedure": ("performedDateTime", "performedPeriod.start"),
    "Encounter": ("period.start",),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod.start"),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod.start", "dateAsserted"),
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
    "ServiceRequest": ("occurrenceDateTime", "occurrencePeriod.start", "authoredOn"),
    "MedicationRequest": ("authoredOn",),
}
DONE_STATUSES: dict[str, frozenset[str]] = {
    "Procedure": frozenset({"completed", "in-progress"}),
    "Encounter": frozenset({"finished", "in-progress", "arrived", "onleave"}),
    "MedicationAdministration": frozenset({"completed", "in-progress"}),
}


def status(resource: Mapping[str, Any]) -> str | None:
    value = resource.get("status")
    return value if isinstance(value, str) else None


def event_span(resource: Mapping[str, Any]) -> DateSpan | None:
    """The (possibly partial) date of the event a resource records."""
    span, _ = first_span(resource, EVENT_DATE_PATHS.get(str(resource.get("resourceType")), ()))
    return span


def reasons(ctx: FactContext, resource: Resource) -> tuple[list[tuple[dict[str, Any], Resource]], bool]:
    """The indications a resource states, each with the resource that holds it: reasonCode (the resource
    itself), and the code of each reasonReference (Condition, Observation, Procedure …) resolved in the
    record; also whether every reference resolved."""
    found = [(c, resource) for c in as_list(resource.get("reasonCode")) if isinstance(c, dict)]
    resolved = True
    for ref in as_list(resource.get("reasonReference")):
        target = ctx.record.resolve(ref, within=resource)
        if target is None:
            resolved = False
        elif isinstance(target.get("code"), dict):
            found.append((target["code"], target))
    return found, resolved


def reason_concepts(ctx: FactContext, resource: Resource) -> tuple[list[dict[str, Any]], bool]:
    """The indication concepts a resource states (see `reasons`), and whether every reference resolved."""
    found, resolved = reasons(ctx, resource)
    return [concept for concept, _ in found], resolved


def purpose_of(
    ctx: FactContext, resource: Resource, target_sets: Sequence[str], other_sets: Sequence[str] = ()
) -> tuple[bool | None, str]:
    """Is the resource given / done for the target purpose (e.g. a psychiatric indication)? True when a stated
    reason is in `target_sets`; False when reasons are stated and none is (or one is in `other_sets` and none
    in the targets); None when no reason is stated or a referenced reason cannot be read."""
    concepts, resolved = reason_concepts(ctx, resource)
    if not concepts:
        return None, "no indication stated" if resolved else "indication not readable"
    target = next((m for vs in target_sets if (m := ctx.match(vs, concepts)) is not None), None)
    if target is not None:
        return True, f"indication {target.label()}"
    other = next((m for vs in other_sets if (m := ctx.match(vs, concepts)) is not None), None)
    if other is not None:
        return False, f"indication {other.label()}"
    if not resolved:
        return None, "an indication could not be read"
    return False, "indication is not one the policy names"


def other_indication(
    ctx: FactContext, resource: Resource, target_sets: Sequence[str], other_sets: Sequence[str]
) -> str | None:
    """The label of a stated indication in `other_sets` when no stated indication is in `target_sets`
    (amitriptyline "for migraine"); None otherwise — including when no indication is stated."""
    concepts, _resolved = reason_concepts(ctx, resource)
    if not concepts or first_match(ctx, target_sets, concepts) is not None:
        return None
    other = first_match(ctx, other_sets, concepts)
    return other.label() + (f" {other.display}" if other.display else "") if other is not None else None


def first_match(ctx: FactContext, valuesets: Iterable[str], concepts: list[dict[str, Any]]) -> CodeMatch | None:
    for vs in valuesets:
        found = ctx.match(vs, concepts)
        if found is not None:
            return found
    return None


def valueset_ids(value: Any) -> list[str]:
    """A `valuesets` parameter given as a list or a {label: id} mapping, as a list of ids."""
    return list(value.values()) if isinstance(value, dict) else list(value or [])


@dataclass
class Occurrence:
    """One clinical event (a session, an administration, a consultation) and every record of it."""

    span: DateSpan | None
    records: list[Resource] = field(default_factory=list)
    matches: list[CodeMatch] = field(default_factory=list)

    @property
    def primary(self) -> Resource:
        return self.records[0]

    @property
    def day(self) -> date | None:
        return self.span.low if self.span is not None and self.span.exact else None

    def evidence(self, note: str | None = None) -> tuple[Evidence, ...]:
        return tuple(
            Evidence(
                reference_of(r),
                date=self.span.text if self.span else None,
                code=m.label() if m else None,
                display=m.display if m else None,
                note=note if i == 0 else "same event, recorded again",
            )
            for i, (r, m) in enumerate(zip(self.records, self.matches, strict=False))
        )


def occurrences(records: Iterable[tuple[Resource, CodeMatch]]) -> list[Occurrence]:
    """Group records of the same event: linked to each other (Procedure.encounter / MedicationAdministration
    .context / partOf pointing at another record) or dated the same exact day. Undated or partially dated
    records are their own occurrence (they cannot be matched to a day)."""
    items = list(records)
    refs = {reference_of(r): i for i, (r, _) in enumerate(items)}
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    by_day: dict[date, int] = {}
    for i, (resource, _match) in enumerate(items):
        for key in ("encounter", "context", "partOf", "basedOn"):
            for ref in as_list(resource.get(key)):
                target = reference_key(ref.get("reference", "")) if isinstance(ref, dict) else None
                if target in refs:
                    union(i, refs[target])
        span = event_span(resource)
        if span is not None and span.exact:
            if span.low in by_day:
                union(i, by_day[span.low])
            else:
                by_day[span.low] = i
    groups: dict[int, Occurrence] = {}
    for i, (resource, match) in enumerate(items):
        root = find(i)
        occurrence = groups.setdefault(root, Occurrence(span=None))
        occurrence.records.append(resource)
        occurrence.matches.append(match)
    for occurrence in groups.values():
        spans = [s for s in (event_span(r) for r in occurrence.records) if s is not None]
        exact = [s for s in spans if s.exact]
        occurrence.span = exact[0] if exact else (spans[0] if spans else None)
    return sorted(groups.values(), key=lambda o: o.span.low if o.span else date.min)


@dataclass(frozen=True)
class Mention:
    """What a resource says about a value set: by code, or in its text (with the text's ConText assertion)."""

    said: bool | None  # True: coded or affirmed in text; False: negated; None: uncertain / hypothetical / family
    match: CodeMatch | None = None
    quote: str | None = None  # the sentence that decided, when text decided
    assertion: str = "coded"

    def note(self) -> str:
        if self.quote is None:
            return f"coded {self.match.label()}" if self.match else ""
        return f'{self.assertion}: "{self.quote}"'


_CODED_KEYS = ("code", "medicationCodeableConcept", "orderDetail", "reasonCode", "outcome", "followUp", "category")
_TEXT_KEYS = ("note", "patientInstruction", "text")


def mention(ctx: FactContext, resource: Resource, valuesets: Sequence[str], *, topic: bool = False) -> Mention | None:
    """Does the resource name one of `valuesets` — by a code (its code, order details, reasons, outcome), or in
    its notes, instructions or concept texts? Text is read with ConText: "not a candidate for IV ketamine" is a
    negative mention, "consider IV ketamine" an uncertain one. None when nothing mentions it. A positive
    mention anywhere wins over negated ones elsewhere (a later sentence may revise an earlier one).
    With `topic`, what is asked is whether the resource is *about* the value set ("evaluation for
    ketamine-assisted psychotherapy", "eligibility for KAP"): a hypothetical or uncertain mention is about it;
    only a negated one ("KAP not discussed") is not."""
    concepts: list[dict[str, Any]] = []
    for key in _CODED_KEYS:
        concepts.extend(c for c in as_list(resource.get(key)) if isinstance(c, dict))
    coded_only = [{"coding": c.get("coding")} for c in concepts if c.get("coding")]
    coded = first_match(ctx, valuesets, coded_only)
    if coded is not None:
        return Mention(True, coded)
    texts: list[str] = [c["text"] for c in concepts if isinstance(c.get("text"), str)]
    for key in _TEXT_KEYS:
        for node in as_list(resource.get(key)):
            if isinstance(node, dict) and isinstance(node.get("text"), str):
                texts.append(node["text"])
            elif isinstance(node, str):
                texts.append(node)
    found: list[tuple[Any, CodeMatch | None]] = []
    for text in texts:
        for vs in valuesets:
            finding = ctx.registry.get(vs).find_in_text(text)
            if finding is not None:
                found.append((finding, None))
    if not found:
        return None
    findings = [f for f, _ in found]
    from fhir_mappings.reading.text import strongest  # local: keeps the module import light for tools

    best = strongest(findings)
    assert best is not None
    if topic:
        said: bool | None = best.assertion.value != "negated"
    else:
        said = True if best.assertion.positive else (False if best.assertion.value == "negated" else None)
    return Mention(said, None, best.sentence, best.assertion.value)


def coded_events(ctx: FactContext, valuesets: Sequence[str]) -> list[tuple[Resource, CodeMatch]]:
    """Procedures (by code) and Encounters (by type) that took place and are coded in one of `valuesets`: the
    two resource types a session, an evaluation or a consultation is recorded as."""
    records: list[tuple[Resource, CodeMatch]] = []
    for rtype, key in (("Procedure", "code"), ("Encounter", "type")):
        for resource in ctx.record.of_type(rtype):
            if status(resource) not in DONE_STATUSES[rtype]:
                continue
            concepts = [c for c in as_list(resource.get(key)) if isinstance(c, dict)]
            match = first_match(ctx, valuesets, concepts)
            if match is not None:
                records.append((resource, match))
    return records


def occurrence_item(occurrence: Occurrence, note: str | None = None, **kwargs: Any) -> Item:
    """An item for one event: the first record as evidence, the others as support, dated by the event."""
    evidence = occurrence.evidence(note)
    span = occurrence.span
    return Item(
        evidence[0],
        date=span.low if span else None,
        span=(span.low, span.high) if span and not span.exact else None,
        support=evidence[1:],
        **kwargs,
    )


def actor_roles(
    ctx: FactContext, resource: Resource, actors: Iterable[Any], role_sets: Mapping[str, str]
) -> tuple[frozenset[str] | None, set[str]]:
    """The role labels of the actors of a resource (performers, participants): the labels found, or None when
    an actor's roles could not be read and none was found — plus the set of labels found."""
    from fhir_mappings.derive.roles import lookup_roles  # roles imports this module

    found: set[str] = set()
    known = True
    listed = [a for a in actors if isinstance(a, dict)]
    for actor in listed:
        lookup = lookup_roles(ctx, actor, role_sets, within=resource)
        known = known and lookup.known
        found.update(lookup.labels)
    return (frozenset(found) if (found or (known and listed)) else None), found
