"""The patient record a decision is made from: the resources, and for each query whether it was read.

Three-valued reasoning needs to know not only what the record holds but what was *looked at*: an
exclusion is "not met" only when the data it depends on was read completely and holds no evidence;
data that could not be fetched (timeout, 403, no FHIR server) is *unavailable* and leads to
"unknown", never to "absent". `cds_service` builds this object; everything downstream only reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

Resource = dict[str, Any]


class Availability(StrEnum):
    """How much of one query's data the record holds."""

    READ = "read"  # fully read (possibly zero results): absence of evidence is meaningful
    PARTIAL = (
        "partial"  # some pages read, the rest not (paging bound, failure mid-way): evidence counts, absence does not
    )
    UNAVAILABLE = "unavailable"  # nothing usable: neither prefetched nor fetched


def weakest(states: Iterable[Availability]) -> Availability:
    """READ when all are read (also when there are none), UNAVAILABLE when none is usable, else PARTIAL."""
    states = list(states)
    if all(s is Availability.READ for s in states):
        return Availability.READ
    if all(s is Availability.UNAVAILABLE for s in states):
        return Availability.UNAVAILABLE
    return Availability.PARTIAL


@dataclass(frozen=True)
class QueryOutcome:
    """What happened to one prefetch query (a key of the discovery `prefetch` object)."""

    key: str
    resource_types: tuple[str, ...]
    availability: Availability
    source: str  # "prefetch" | "fhir-server" | "none"
    reason: str = ""  # short, PHI-free: "timeout", "HTTP 403", "no fhirServer", "OperationOutcome in prefetch"
    pages: int = 0


def as_list(value: Any) -> list[Any]:
    """A FHIR element that may be a single value, a list or absent, as a list (0..* and 0..1 read alike)."""
    return value if isinstance(value, list) else ([] if value is None else [value])


def medication_resource_concepts(medication: Resource) -> list[dict[str, Any]]:
    """A Medication resource's code and its ingredients' concepts (compounded products name the drug there)."""
    concepts = [medication["code"]] if isinstance(medication.get("code"), dict) else []
    for ingredient in as_list(medication.get("ingredient")):
        item = ingredient.get("itemCodeableConcept") if isinstance(ingredient, dict) else None
        if isinstance(item, dict):
            concepts.append(item)
    return concepts


def medication_concepts(
    resource: Resource, resolve: Callable[[Mapping[str, Any], Resource], Resource | None]
) -> list[dict[str, Any]]:
    """The coded concepts naming a medication-bearing resource's drug: medicationCodeableConcept, or the
    referenced Medication's code and ingredient concepts (`resolve` finds it), else the reference's display.

    Triage resolves inside the request only, facts through the whole record: one extraction serves both.
    """
    concepts: list[dict[str, Any]] = []
    cc = resource.get("medicationCodeableConcept")
    if isinstance(cc, dict):
        concepts.append(cc)  # the resource's own dict: facts memoise matches by content, triage reads it once
    ref = resource.get("medicationReference")
    if isinstance(ref, dict):
        medication = resolve(ref, resource)
        if medication is not None:
            concepts.extend(medication_resource_concepts(medication))
        elif isinstance(ref.get("display"), str) and ref["display"]:
            concepts.append({"text": ref["display"]})
    return concepts


def reference_key(reference: str) -> str | None:
    """`Type/id` for a relative or absolute literal reference (history suffix dropped); None otherwise."""
    if not reference or reference.startswith("#") or reference.startswith("urn:"):
        return None
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) < 2 or not parts[-2][:1].isupper():
        return None
    return f"{parts[-2]}/{parts[-1]}"


@dataclass
class PatientRecord:
    """All resources gathered for one hook call, indexed once, plus the read status of every query.

    `now` is the reference instant for every time window, so a decision is reproducible for a given
    record (tests and the sandbox pin it; the service uses the request time).
    """

    patient_id: str
    now: datetime
    resources: list[Resource]
    queries: Mapping[str, QueryOutcome]
    draft_orders: list[Resource] = field(default_factory=list)
    user_id: str | None = None  # "Practitioner/x" or "PractitionerRole/y" from context.userId
    encounter_id: str | None = None
    # References the gatherer tried to resolve and could not ("Type/id" -> reason). A reference that was
    # never attempted and is not in the record is also unresolved; see `reference_status`.
    unresolved_references: Mapping[str, str] = field(default_factory=dict)
    # Whether the gatherer could have resolved further references (a usable FHIR server was available).
    references_resolvable: bool = False
    # Bundle entry fullUrl -> resource, so `urn:uuid:` and absolute references resolve too.
    full_urls: Mapping[str, Resource] = field(default_factory=dict)
    # Resources left out because their JSON shape is not what R4 defines ("Type/id" -> PHI-free reason,
    # e.g. "Observation.code: expected an object"); the queries that returned them count as partly read.
    unreadable: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_type: dict[str, list[Resource]] = {}
        self._by_key: dict[str, Resource] = {}
        self._by_full_url: dict[str, Resource] = dict(self.full_urls)
        self._availability: dict[str, Availability] = {}  # per type: `queries` is fixed once the record exists
        for resource in self.resources:
            self._index(resource, history=True)
        for order in self.draft_orders:
            self._index(order, history=False)

    def _index(self, resource: Resource, *, history: bool) -> None:
        rtype = resource.get("resourceType")
        rid = resource.get("id")
        if not isinstance(rtype, str):
            return
        key = f"{rtype}/{rid}" if rid else None
        if key and key in self._by_key:
            return  # the same resource from two queries (e.g. an _include and a search): keep one
        if history:
            self._by_type.setdefault(rtype, []).append(resource)
        if key:
            self._by_key[key] = resource

    # -- reading -----------------------------------------------------------------------------------
    def of_type(self, resource_type: str) -> list[Resource]:
        """Resources of one type from the patient's record. Draft orders are not history: they are
        reachable by reference (`get`, `resolve`) but never listed here."""
        return self._by_type.get(resource_type, [])

    def get(self, key: str) -> Resource | None:
        """A resource by `Type/id`."""
        return self._by_key.get(key)

    def resolve(self, reference: Any, within: Resource | None = None) -> Resource | None:
        """Resolve a Reference (dict or string): contained `#id`, `Type/id`, absolute URL, `urn:uuid:`."""
        ref = reference.get("reference") if isinstance(reference, dict) else reference
        if not isinstance(ref, str) or not ref:
            return None
        if ref.startswith("#"):
            for contained in (within or {}).get("contained", []) or []:
                if isinstance(contained, dict) and contained.get("id") == ref[1:]:
                    return contained
            return None
        if ref in self._by_full_url:
            return self._by_full_url[ref]
        key = reference_key(ref)
        return self._by_key.get(key) if key else None

    def reference_status(self, reference: Any, within: Resource | None = None) -> Availability:
        """READ if the referenced resource is in the record, else UNAVAILABLE (it could not be looked at)."""
        return Availability.READ if self.resolve(reference, within) is not None else Availability.UNAVAILABLE

    # -- what was read -----------------------------------------------------------------------------
    def availability(self, resource_type: str) -> Availability:
        """Availability of a resource type: the weakest outcome of the queries that supply it.

        A type no query supplies is UNAVAILABLE: the service never looked for it. Computed once per type (every
        criterion's "checked ..." line and every fact asks).
        """
        known = self._availability.get(resource_type)
        if known is None:
            known = self._availability[resource_type] = self._availability_of(resource_type)
        return known

    def _availability_of(self, resource_type: str) -> Availability:
        outcomes = [q.availability for q in self.queries.values() if resource_type in q.resource_types]
        return weakest(outcomes) if outcomes else Availability.UNAVAILABLE

    def unavailable_queries(self) -> list[QueryOutcome]:
        return [q for q in self.queries.values() if q.availability is not Availability.READ]

    @classmethod
    def from_resources(
        cls,
        patient_id: str,
        now: datetime,
        resources: Iterable[Resource],
        read_types: Iterable[str],
        draft_orders: Iterable[Resource] = (),
        **kwargs: Any,
    ) -> PatientRecord:
        """A record where the given resource types were read completely (tests, tools, cohort reports)."""
        queries = {
            t: QueryOutcome(key=t, resource_types=(t,), availability=Availability.READ, source="prefetch")
            for t in read_types
        }
        return cls(
            patient_id=patient_id,
            now=now,
            resources=list(resources),
            queries=queries,
            draft_orders=list(draft_orders),
            **kwargs,
        )
