"""Gather the patient record: prefetch first, with exact CDS Hooks 2.0 semantics, the rest from the FHIR server.

Per prefetch key (CDS Hooks 2.0 §Prefetch; checklist a.5, f.2):
- absent -> the client did not or could not satisfy it: query the FHIR server;
- `null` -> "no data to populate": read, nothing there;
- a resource / searchset Bundle -> read (an empty Bundle is read with no data); a `next` link is followed;
- an OperationOutcome (or an error one inside the Bundle), or anything malformed -> failed: query it.
What can be had neither way is *unavailable* — the decision treats it as unknown, never as absent — and
only when a `required` query ends there does the service answer 412 (`RequiredDataUnavailable`).

All queries still missing are fetched at once, in parallel; then the references the facts follow
(requester, performer, payor, ...) are resolved in a bounded number of parallel, batched rounds.
Every step is linear in the size of the record, and each resource is walked once.
"""

from __future__ import annotations

import calendar
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urljoin

from jsonpath_ng import jsonpath

from cds_service.errors import Issue, ServiceError
from cds_service.fhir_client import FetchResult, FhirClient, bundle_entries, next_link
from fhir_mappings.queries import PrefetchQuery, QuerySet, ResolveRule
from fhir_mappings.record import Availability, PatientRecord, QueryOutcome, reference_key
from fhir_mappings.resource_shapes import is_readable, shape_problems

log = logging.getLogger(__name__)

ID_BATCH_SIZE = 50  # ids per `Type?_id=a,b,c` request: keeps URLs short on every server
NOT_APPLICABLE = "not applicable to this user"
NO_SERVER = "no FHIR server"

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")
_TOP_FIELD = re.compile(r"^\$\.([A-Za-z_][A-Za-z0-9_]*)")  # `$.performer[*]` -> performer
_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")

# The date that places a resource in a `within_days` window, in order of preference.
_DATE_FIELDS: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "Encounter": (("period", "start"), ("period", "end")),
    "Procedure": (("performedDateTime",), ("performedPeriod", "start"), ("performedPeriod", "end")),
    "Observation": (("effectiveDateTime",), ("effectivePeriod", "start"), ("effectiveInstant",), ("issued",)),
    "MedicationStatement": (("effectiveDateTime",), ("effectivePeriod", "start"), ("dateAsserted",)),
    "MedicationAdministration": (("effectiveDateTime",), ("effectivePeriod", "start")),
    "MedicationDispense": (("whenHandedOver",), ("whenPrepared",)),
    "MedicationRequest": (("authoredOn",),),
    "ServiceRequest": (("authoredOn",), ("occurrenceDateTime",)),
    "Condition": (("onsetDateTime",), ("recordedDate",)),
}
_GENERIC_DATE_FIELDS: tuple[tuple[str, ...], ...] = (("date",), ("authoredOn",), ("recordedDate",), ("issued",))


class RequiredDataUnavailable(ServiceError):
    """Required data could be had neither from prefetch nor from the FHIR server: HTTP 412 (CDS Hooks 2.0).

    A `ServiceError`, so the app's error handler answers 412 with an OperationOutcome listing the keys;
    `keys` and `reasons` are PHI-free (query keys and short reasons such as "timeout").
    """

    def __init__(self, keys: list[str], reasons: dict[str, str]) -> None:
        issues = [
            Issue(
                diagnostics=f"required data '{key}' could be obtained neither from prefetch nor from the FHIR "
                f"server ({reasons.get(key, 'unavailable')})",
                code="incomplete",
                expression=f"prefetch.{key}",
            )
            for key in keys
        ]
        super().__init__(412, issues)
        self.keys = keys
        self.reasons = reasons


@dataclass(frozen=True)
class FhirAccess:
    """Where and how the service may read the caller's FHIR data."""

    base_url: str
    token: str | None = field(repr=False)  # the caller's bearer token: transient, never logged or printed
    # Bound to the request's own `fhirServer`: `next` links, pages and reference reads never leave it, so the
    # token never reaches another server (not even another one the same issuer may use).
    url_allowed: Callable[[str], bool] = field(repr=False)
    pool_key: str | None = None  # the configured allow-list entry the server matched: its pool and its cap


_PATIENT_ELEMENTS = ("subject", "patient", "beneficiary", "for")


def _other_patient(resource: Mapping[str, Any], patient_id: str) -> bool:
    """True when the resource belongs to another patient (its subject/patient/beneficiary names one).

    A server that ignores a search parameter it does not support (FHIR lets it, with a warning) answers a
    patient-scoped search with everyone's resources; nothing of another patient may enter this record.
    """
    if resource.get("resourceType") == "Patient":
        return resource.get("id") != patient_id
    for element in _PATIENT_ELEMENTS:
        ref = resource.get(element)
        if ref is None:
            continue
        target = ref.get("reference") if type(ref) is dict or isinstance(ref, Mapping) else None
        if isinstance(target, str) and "Patient/" in target:
            return target.rstrip("/").split("/")[-1] != patient_id
    return False


@dataclass
class _Collected:
    """Resources of the record so far, deduplicated by `Type/id` (an `_include`d payor may come twice), only
    the context patient's, and only those whose JSON shape the facts can read (the others are *unreadable*:
    left out, counted against the query that returned them, and cited)."""

    resources: list[dict] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    full_urls: dict[str, dict] = field(default_factory=dict)
    patient_id: str = ""
    foreign: int = 0  # resources of other patients dropped (a server ignored a search parameter)
    unreadable: dict[str, str] = field(default_factory=dict)  # "Type/id" (or "Type #n") -> PHI-free reason
    unreadable_by_query: dict[str, int] = field(default_factory=dict)

    def add(
        self, resources: Iterable[dict], full_urls: Mapping[str, dict] | None = None, query: str | None = None
    ) -> list[dict]:
        """Add what is new and readable; return the resources that were added."""
        added: list[dict] = []
        dropped: list[int] = []
        for resource in resources:
            if not is_readable(resource):  # the detailed problems only for the few that are not
                self._unreadable(resource, shape_problems(resource), query)
                dropped.append(id(resource))
                continue
            if self.patient_id and _other_patient(resource, self.patient_id):
                self.foreign += 1
                continue
            key = _key_of(resource)
            if key is not None:
                if key in self.keys:
                    continue
                self.keys.add(key)
            self.resources.append(resource)
            added.append(resource)
        if full_urls:
            if dropped:
                gone = set(dropped)
                full_urls = {url: r for url, r in full_urls.items() if id(r) not in gone}
            self.full_urls.update(full_urls)
        return added

    def _unreadable(self, resource: Any, problems: list[str], query: str | None) -> None:
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        rid = resource.get("id") if isinstance(resource, dict) else None
        rtype = rtype if isinstance(rtype, str) and _RESOURCE_TYPE.fullmatch(rtype) else "resource"
        if isinstance(rid, str) and _FHIR_ID.fullmatch(rid) and rtype != "resource":
            name = f"{rtype}/{rid}"
        else:
            name = f"{rtype} #{len(self.unreadable) + 1}"
        self.unreadable[name] = "; ".join(problems)[:300]
        if query is not None:
            self.unreadable_by_query[query] = self.unreadable_by_query.get(query, 0) + 1


@dataclass(frozen=True)
class _Prefetched:
    """One prefetch value, checked against its template."""

    resources: list[dict]
    full_urls: dict[str, dict]
    next_url: str | None
    problem: str  # "" when usable; else why it counts as failed (PHI-free)
    malformed: int = 0  # entries that were not {"resource": {...}}: the query is not completely read


def _key_of(resource: Mapping[str, Any]) -> str | None:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    return f"{rtype}/{rid}" if isinstance(rtype, str) and isinstance(rid, str) and rid else None


def _check_prefetch(query: PrefetchQuery, value: Any, rendered: str | None) -> _Prefetched:
    """Classify a present, non-null prefetch value: usable data (maybe paginated) or a failure to query."""
    if not isinstance(value, dict):
        return _Prefetched([], {}, None, "malformed prefetch")
    resource_type = value.get("resourceType")
    if resource_type == "OperationOutcome":
        return _Prefetched([], {}, None, "OperationOutcome in prefetch")
    if resource_type == "Bundle":
        if value.get("type", "searchset") != "searchset":
            return _Prefetched([], {}, None, "malformed prefetch")
        resources, full_urls, problem, malformed = bundle_entries(value)
        if problem:
            return _Prefetched([], {}, None, f"{problem} in prefetch")
        return _Prefetched(resources, full_urls, next_link(value), "", malformed)
    if query.is_read and resource_type == query.resource_type:
        expected_id = unquote(rendered.partition("/")[2]) if rendered else None
        if expected_id and value.get("id") != expected_id:
            return _Prefetched([], {}, None, "prefetch for another resource")
        return _Prefetched([value], {}, None, "")
    return _Prefetched([], {}, None, "malformed prefetch")


def gather_record(
    *,
    queries: QuerySet,
    context: Mapping[str, Any],
    prefetch: Mapping[str, Any] | None,
    fhir: FhirAccess | None,
    client: FhirClient,
    now: datetime,
    deadline: float,
    draft_orders: list[dict],
) -> PatientRecord:
    """Everything the policies read, from prefetch and the FHIR server, with what was (not) read per query.

    Raises RequiredDataUnavailable (412) when a required query could be had neither way.
    """
    patient_id = context.get("patientId")
    if not isinstance(patient_id, str) or not patient_id:
        raise ValueError("context.patientId is required to gather a patient record")
    started = time.monotonic()
    limits = queries.limits
    # A draft order the EHR already stored comes back from its search too; the context's copy is the one
    # being signed, and a draft is never history (`PatientRecord.of_type`), so the stored copy is left out.
    collected = _Collected(
        keys={k for k in (_key_of(d) for d in draft_orders if isinstance(d, dict)) if k},
        patient_id=str(context.get("patientId") or ""),
    )
    outcomes: dict[str, QueryOutcome] = {}
    roles_complete: set[str] = set()  # Practitioner ids whose PractitionerRoles are all in the record already
    to_fetch: dict[str, str] = {}
    page_limits: dict[str, int] = {}
    pending: dict[str, _Prefetched] = {}  # keys sent to the server, with what prefetch gave for them

    for key, query in queries.queries.items():
        rendered = query.render(context)
        present = prefetch is not None and key in prefetch
        value = prefetch.get(key) if prefetch is not None and present else None

        if present and value is None:
            outcomes[key] = _outcome(query, Availability.READ, "prefetch")
            continue
        checked = _check_prefetch(query, value, rendered) if present else None
        if checked is not None and not checked.problem:
            collected.add(checked.resources, checked.full_urls, key)
            if checked.malformed:
                collected.unreadable_by_query[key] = collected.unreadable_by_query.get(key, 0) + checked.malformed
            if checked.next_url is None:
                outcomes[key] = _outcome(query, Availability.READ, "prefetch", pages=1)
                roles_complete.update(_practitioners_with_roles(query, rendered, checked.resources))
            elif fhir is None:
                outcomes[key] = _outcome(query, Availability.PARTIAL, "prefetch", f"prefetch paginated; {NO_SERVER}", 1)
            elif limits.max_pages_per_query <= 1:
                outcomes[key] = _outcome(query, Availability.PARTIAL, "prefetch", "page limit", 1)
            else:
                to_fetch[key] = urljoin(fhir.base_url.rstrip("/") + "/", checked.next_url)
                page_limits[key] = limits.max_pages_per_query - 1
                pending[key] = checked
            continue

        problem = checked.problem if checked is not None else ""
        if rendered is None:
            if problem:  # the client tried a query we cannot even render for this user: nothing to go on
                outcomes[key] = _outcome(query, Availability.UNAVAILABLE, "none", f"{problem}; {NOT_APPLICABLE}")
            else:
                outcomes[key] = _outcome(query, Availability.READ, "none", NOT_APPLICABLE)
        elif fhir is None:
            reason = f"{problem}; {NO_SERVER}" if problem else f"not prefetched; {NO_SERVER}"
            outcomes[key] = _outcome(query, Availability.UNAVAILABLE, "none", reason)
        else:
            to_fetch[key] = rendered
            pending[key] = _Prefetched([], {}, None, problem)

    if fhir is not None and to_fetch:
        results = client.fetch_many(
            fhir.base_url,
            to_fetch,
            token=fhir.token,
            deadline=deadline,
            max_pages=limits.max_pages_per_query,
            url_allowed=fhir.url_allowed,
            page_limits=page_limits,
            pool_key=fhir.pool_key,
        )
        for key, result in results.items():
            collected.add(result.resources, result.full_urls, key)
            outcomes[key] = _fetched_outcome(queries.queries[key], pending[key], result)

    for key, count in collected.unreadable_by_query.items():
        outcomes[key] = _with_unreadable(outcomes[key], count)
        supplies = queries.queries[key].supplies
        if queries.queries[key].required and not any(r.get("resourceType") in supplies for r in collected.resources):
            # Required data that came only in unreadable form is not there at all: 412, not a guess from nothing
            # (an unreadable Coverage must not read as "no active coverage").
            outcomes[key] = replace(outcomes[key], availability=Availability.UNAVAILABLE)

    outcomes = {key: outcomes[key] for key in queries.queries}  # discovery order, for stable output
    unavailable = Availability.UNAVAILABLE
    missing = [key for key, q in queries.queries.items() if q.required and outcomes[key].availability is unavailable]
    if missing:
        log.warning("patient record: required data unavailable: %s", ", ".join(missing))
        raise RequiredDataUnavailable(missing, {key: outcomes[key].reason for key in missing})

    user_roles = _user_roles_search_read(queries, outcomes, context)
    if user_roles:
        roles_complete.add(user_roles)
    unresolved: dict[str, str] = {}
    references_fetched = 0
    if fhir is not None:
        references_fetched = _resolve_references(
            roles_complete=roles_complete,
            queries=queries,
            collected=collected,
            draft_orders=draft_orders,
            user_id=context.get("userId"),
            fhir=fhir,
            client=client,
            now=now,
            deadline=deadline,
            unresolved=unresolved,
        )

    _log_summary(outcomes, collected, references_fetched, unresolved, started)
    return PatientRecord(
        patient_id=patient_id,
        now=now,
        resources=collected.resources,
        queries=outcomes,
        draft_orders=draft_orders,
        user_id=context.get("userId"),
        encounter_id=context.get("encounterId"),
        unresolved_references=unresolved,
        references_resolvable=fhir is not None,
        full_urls=collected.full_urls,
        unreadable=collected.unreadable,
    )


_REVINCLUDES_ROLES = re.compile(r"(?:^|[?&])_revinclude(:iterate)?=PractitionerRole(?::|%3A)practitioner(?:&|$)")
_USER_ROLES_TEMPLATE = re.compile(r"^PractitionerRole\?(?:[^#]*&)?practitioner=\{\{userPractitionerId\}\}(?:&|$)")


def _practitioners_with_roles(query: PrefetchQuery, rendered: str | None, resources: Iterable[dict]) -> set[str]:
    """Practitioners of a complete prefetched Bundle whose template revincluded their roles.

    FHIR search: `_revinclude=PractitionerRole:practitioner` adds every role that references a matched Practitioner;
    with `:iterate`, also those of included ones. The EHR executed the template, so those roles are all there.
    """
    match = _REVINCLUDES_ROLES.search(rendered or "")
    if match is None:
        return set()
    iterate = match.group(1) is not None
    return {
        r["id"]
        for r in resources
        if r.get("resourceType") == "Practitioner"
        and isinstance(r.get("id"), str)
        and (iterate or query.resource_type == "Practitioner")
    }


def _user_roles_search_read(
    queries: QuerySet, outcomes: Mapping[str, QueryOutcome], context: Mapping[str, Any]
) -> str | None:
    """The user's Practitioner id when the `PractitionerRole?practitioner={{userPractitionerId}}` search was read
    completely (prefetch or server): all the user's roles are then in the record."""
    user_type, _, user_id = str(context.get("userId") or "").partition("/")
    if user_type != "Practitioner" or not user_id:
        return None
    for key, query in queries.queries.items():
        outcome = outcomes.get(key)
        if (
            _USER_ROLES_TEMPLATE.match(query.template)
            and outcome is not None
            and outcome.availability is Availability.READ
            and outcome.source in ("prefetch", "fhir-server")
        ):
            return user_id
    return None


def _with_unreadable(outcome: QueryOutcome, count: int) -> QueryOutcome:
    """A query some of whose data could not be read is at most partly read, and says why."""
    note = f"{count} unreadable resource{'s' if count != 1 else ''}"
    availability = Availability.PARTIAL if outcome.availability is Availability.READ else outcome.availability
    reason = f"{outcome.reason}; {note}" if outcome.reason else note
    return replace(outcome, availability=availability, reason=reason)


def _outcome(
    query: PrefetchQuery, availability: Availability, source: str, reason: str = "", pages: int = 0
) -> QueryOutcome:
    return QueryOutcome(
        key=query.key,
        resource_types=query.supplies,
        availability=availability,
        source=source,
        reason=reason,
        pages=pages,
    )


def _fetched_outcome(query: PrefetchQuery, prefetched: _Prefetched, result: FetchResult) -> QueryOutcome:
    """Outcome of a key that went to the server: a whole query, or the rest of a paginated prefetch."""
    if prefetched.next_url is not None:  # continued a usable prefetch Bundle: its first page counts
        availability = Availability.READ if result.availability is Availability.READ else Availability.PARTIAL
        return _outcome(query, availability, "prefetch", result.reason, 1 + result.pages)
    reason = result.reason
    if prefetched.problem:
        reason = f"{prefetched.problem}; {reason or 'queried'}"
    source = "none" if result.availability is Availability.UNAVAILABLE else "fhir-server"
    return _outcome(query, result.availability, source, reason, result.pages)


# -- reference resolution ------------------------------------------------------------------------------


def _resolve_references(
    *,
    queries: QuerySet,
    collected: _Collected,
    draft_orders: list[dict],
    user_id: Any,
    fhir: FhirAccess,
    client: FhirClient,
    now: datetime,
    deadline: float,
    unresolved: dict[str, str],
    roles_complete: frozenset[str] | set[str] = frozenset(),
) -> int:
    """Fetch what the rules' references point to, in `reference_rounds` parallel rounds; return how many.

    Each round looks only at the resources the previous round added, so the work stays linear.
    Failures go to `unresolved` as "Type/id" -> reason; a failed roles search for Practitioner/x as
    "PractitionerRole?practitioner=x" -> reason.
    """
    limits = queries.limits
    plan = _reference_plan(queries.resolve_rules)
    base = fhir.base_url.rstrip("/") + "/"
    known = set(collected.keys)
    known.update(k for k in (_key_of(d) for d in draft_orders if isinstance(d, dict)) if k)
    attempted: set[str] = set()
    roles_requested: set[str] = set()
    per_type: dict[str, int] = {}
    fetched = 0

    sources: list[dict] = collected.resources  # first the whole record (read before this round adds to it)
    extra: list[str] = [user_id] if isinstance(user_id, str) else []
    drafts = [d for d in draft_orders if isinstance(d, dict)]

    for _round in range(limits.reference_rounds):
        wanted: dict[str, list[str]] = {}
        practitioners: list[str] = []
        seen: set[str] = set()  # the same reference recurs in many resources; look at each once per round
        references = [*extra, *_references(sources, plan, now)]
        references.extend(_references(drafts, plan, now, drafts=True))
        for reference in references:
            if reference in seen:
                continue
            seen.add(reference)
            key = _local_key(reference, base, collected.full_urls, unresolved)
            if key is None:
                continue
            rtype, rid = key.split("/", 1)
            # A practitioner whose roles are all in the record already (revincluded) needs no roles search.
            if rtype == "Practitioner" and rid not in roles_requested and rid not in roles_complete:
                roles_requested.add(rid)
                if len(roles_requested) <= limits.max_reference_ids_per_type:
                    practitioners.append(rid)
                else:
                    unresolved[f"PractitionerRole?practitioner={rid}"] = "reference limit"
            if key in known or key in attempted:
                continue
            attempted.add(key)
            if per_type.get(rtype, 0) >= limits.max_reference_ids_per_type:
                unresolved[key] = "reference limit"
                continue
            per_type[rtype] = per_type.get(rtype, 0) + 1
            wanted.setdefault(rtype, []).append(rid)
        extra, drafts = [], []

        requests: dict[str, str] = {}
        batches: dict[str, tuple[str, list[str]]] = {}
        for rtype, ids in wanted.items():
            for n, batch in enumerate(_chunks(ids, ID_BATCH_SIZE)):
                requests[f"ref {rtype} {n}"] = f"{rtype}?_id={','.join(batch)}&_count={len(batch)}"
                batches[f"ref {rtype} {n}"] = (rtype, batch)
        for n, batch in enumerate(_chunks(practitioners, ID_BATCH_SIZE)):
            requests[f"roles {n}"] = f"PractitionerRole?practitioner={','.join(batch)}"
            batches[f"roles {n}"] = ("", batch)
        if not requests:
            break

        results = client.fetch_many(
            fhir.base_url,
            requests,
            token=fhir.token,
            deadline=deadline,
            max_pages=queries.limits.max_pages_per_query,
            url_allowed=fhir.url_allowed,
            pool_key=fhir.pool_key,
        )
        added_this_round: list[dict] = []
        for name, result in results.items():
            rtype, batch = batches[name]
            added = collected.add(result.resources, result.full_urls)
            added_this_round.extend(added)
            known.update(k for k in (_key_of(r) for r in added) if k)
            failure = "" if result.availability is Availability.READ else (result.reason or result.availability.value)
            if not rtype:  # a roles search: no per-role keys to report, only that the search failed
                for rid in batch if failure else ():
                    unresolved[f"PractitionerRole?practitioner={rid}"] = failure
                continue
            for rid in batch:
                key = f"{rtype}/{rid}"
                if key in collected.unreadable:
                    unresolved[key] = "unreadable"
                elif key not in known:
                    unresolved[key] = failure or "not found"
        fetched += len(added_this_round)
        sources = added_this_round
    return fetched


def _references(resources: Iterable[dict], plan: _ReferencePlan, now: datetime, *, drafts: bool = False) -> list[str]:
    """Reference strings the rules point at, from each resource in order (`drafts`: these are the draft orders)."""
    today = now.date()
    earliest: dict[int, date] = {}  # within_days -> the earliest date still in the window
    found: list[str] = []
    for resource in resources:
        resource_type = resource.get("resourceType")
        rules = plan.get(resource_type) if isinstance(resource_type, str) else None
        if rules is None:
            continue
        dated = False  # the date is looked up at most once per resource, and only if a rule has a window
        resource_date: date | None = None
        for rule in rules:
            if rule.draft_orders_only and not drafts:
                continue
            if rule.within_days is not None:
                if not dated:
                    resource_date, dated = _resource_date(resource), True
                if resource_date is not None:
                    if rule.within_days not in earliest:
                        earliest[rule.within_days] = today - timedelta(days=rule.within_days)
                    if resource_date < earliest[rule.within_days]:
                        continue
            for top, find in rule.finders:
                if top is None or top in resource:  # most resources lack most referencing elements
                    found.extend(find(resource))
    return found


@dataclass(frozen=True)
class _CompiledRule:
    """A resolve rule with its paths compiled: each as (the top element it needs, or None; its finder)."""

    draft_orders_only: bool
    within_days: int | None
    finders: tuple[tuple[str | None, Callable[[dict], list[str]]], ...]


_ReferencePlan = Mapping[str, tuple[_CompiledRule, ...]]  # resource type -> its rules, in the file's order
_WILDCARD = None  # a `[*]` step; a field step is its name


_plans: dict[int, tuple[tuple[ResolveRule, ...], _ReferencePlan]] = {}  # id(rules) -> (rules, their plan)


def _reference_plan(rules: tuple[ResolveRule, ...]) -> _ReferencePlan:
    """The plan of a loaded query set's rules, compiled on its first call: looked up by identity, because hashing
    the rules (their compiled paths and all) would cost more than the lookup saves."""
    entry = _plans.get(id(rules))
    if entry is not None and entry[0] is rules:  # the entry holds `rules`, so their id is not reused meanwhile
        return entry[1]
    plan = _compile_plan(rules)
    if len(_plans) >= 16:  # tests load many query sets; a service loads one
        _plans.clear()
    _plans[id(rules)] = (rules, plan)
    return plan


def _compile_plan(rules: tuple[ResolveRule, ...]) -> _ReferencePlan:
    """The rules by resource type with their paths compiled to finders."""
    by_type: dict[str, list[_CompiledRule]] = {}
    for rule in rules:
        finders = []
        for path, text in zip(rule.paths, rule.path_texts, strict=True):
            top = _TOP_FIELD.match(text)
            finders.append((top.group(1) if top else None, _reference_finder(path)))
        compiled = _CompiledRule(rule.draft_orders_only, rule.within_days, tuple(finders))
        for resource_type in rule.from_types:
            by_type.setdefault(resource_type, []).append(compiled)
    return {resource_type: tuple(entries) for resource_type, entries in by_type.items()}


def _reference_finder(path: Any) -> Callable[[dict], list[str]]:
    """The non-empty reference strings a jsonpath selects in a resource, as `_jsonpath_references` finds them.

    The paths `queries.yaml` uses (`$.a`, `$.a[*]`, `$.a[*].b`) are walked directly over the JSON; any other
    jsonpath-ng expression keeps jsonpath-ng (`tests/service/test_prefetch_references.py` pins the two alike).
    """
    steps = _direct_steps(path)
    if steps is None:
        return functools.partial(_jsonpath_references, path)
    return functools.partial(_walk_references, steps)


def _direct_steps(path: Any) -> tuple[str | None, ...] | None:
    """`$.a[*].b` as ("a", _WILDCARD, "b"); None for anything but root, single plain fields and `[*]`."""
    if type(path) is jsonpath.Root:
        return ()
    if type(path) is not jsonpath.Child or jsonpath.auto_id_field is not None:
        return None
    left = _direct_steps(path.left)
    right = path.right
    if left is None:
        return None
    if type(right) is jsonpath.Wildcard:
        return (*left, _WILDCARD)
    if type(right) is jsonpath.Fields and len(right.fields) == 1 and not right._deprecated_wildcard_use:
        return (*left, right.fields[0])
    return None


def _walk_references(steps: tuple[str | None, ...], resource: dict) -> list[str]:
    """jsonpath-ng's matches of `steps` over JSON values, in its order, each with the name that selected it: a
    field step selects a member of an object; `[*]` every member of an object and every item of an array."""
    selected: list[tuple[Any, str | None]] = [(resource, None)]
    for step in steps:
        found: list[tuple[Any, str | None]] = []
        if step is _WILDCARD:
            for value, _ in selected:
                if isinstance(value, dict):
                    found.extend((item, key) for key, item in value.items())
                elif isinstance(value, list | tuple):
                    found.extend((item, None) for item in value)
        else:
            for value, _ in selected:
                if isinstance(value, dict) and step in value:
                    found.append((value[step], step))
        if not found:
            return []
        selected = found
    references: list[str] = []
    for value, name in selected:  # as `_reference_of`: a Reference's `reference`, or a string selected by that name
        if isinstance(value, dict):
            reference = value.get("reference")
            if isinstance(reference, str) and reference:
                references.append(reference)
        elif name == "reference" and isinstance(value, str) and value:
            references.append(value)
    return references


def _jsonpath_references(path: Any, resource: dict) -> list[str]:
    """The reference strings of jsonpath-ng's matches: what the direct walk must equal."""
    references: list[str] = []
    for match in path.find(resource):
        reference = _reference_of(match)
        if reference:
            references.append(reference)
    return references


def _reference_of(match: Any) -> str | None:
    """The reference string of a jsonpath match.

    A path such as `$.performer[*]` is written for a 0..* element (ServiceRequest.performer); applied to
    the same element at 0..1 (MedicationRequest.performer) jsonpath-ng's `[*]` yields the Reference's
    *fields*, so the string matched at field `reference` counts too (and `display` & co. never do).
    """
    value = match.value
    if isinstance(value, dict):
        reference = value.get("reference")
        return reference if isinstance(reference, str) else None
    if isinstance(value, str) and getattr(match.path, "fields", None) == ("reference",):
        return value
    return None


def _local_key(reference: str, base: str, full_urls: Mapping[str, dict], unresolved: dict[str, str]) -> str | None:
    """`Type/id` of a literal reference the FHIR server can answer; None for contained/urn/conditional ones."""
    if not reference or reference.startswith(("#", "urn:")) or "?" in reference or reference in full_urls:
        return None
    if "://" in reference:
        key = reference_key(reference)
        if not reference.startswith(base):
            if key:
                unresolved.setdefault(key, "outside FHIR server")
            return None
    else:
        key = reference_key(reference)
    if key is None:
        return None
    rtype, _, rid = key.partition("/")
    if not _RESOURCE_TYPE.match(rtype) or not _FHIR_ID.match(rid):
        return None
    return key


def _resource_date(resource: Mapping[str, Any]) -> date | None:
    """The resource's obvious date (latest day a partial date can mean), or None when undated."""
    resource_type = resource.get("resourceType")
    candidates = _DATE_FIELDS.get(resource_type, _GENERIC_DATE_FIELDS) if isinstance(resource_type, str) else ()
    for fields in candidates:
        value: Any = resource
        for name in fields:
            value = value.get(name) if isinstance(value, dict) else None
        if isinstance(value, str):
            return _parse_date(value)
    return None


def _parse_date(text: str) -> date | None:
    """A FHIR date/dateTime/instant as a date; `2024` -> 2024-12-31, `2024-05` -> 2024-05-31."""
    digits = text[:4] + text[5:7] + text[8:10]
    if text[4:5] == "-" and text[7:8] == "-" and len(digits) == 8 and digits.isdecimal():
        try:  # a full date, the common case: what the pattern below reads, without it
            return date(int(text[:4]), int(text[5:7]), int(text[8:10]))
        except ValueError:
            return None
    match = _PARTIAL_DATE.match(text)
    if not match:
        return None
    year, month, day = match.groups()
    try:
        if month is None:
            return date(int(year), 12, 31)
        if day is None:
            return date(int(year), int(month), calendar.monthrange(int(year), int(month))[1])
        return date(int(year), int(month), int(day))
    except ValueError:
        return None


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_summary(
    outcomes: Mapping[str, QueryOutcome],
    collected: _Collected,
    references_fetched: int,
    unresolved: Mapping[str, str],
    started: float,
) -> None:
    """One PHI-free line per hook call: counts by source/availability and timing."""
    by_source: dict[str, int] = {}
    for outcome in outcomes.values():
        by_source[outcome.source] = by_source.get(outcome.source, 0) + 1
    not_read = [k for k, o in outcomes.items() if o.availability is not Availability.READ]
    log.info(
        "patient record: %d queries (%s), not fully read: %s; %d resources, %d by reference, %d unresolved, %.0f ms",
        len(outcomes),
        ", ".join(f"{n} {source}" for source, n in sorted(by_source.items())),
        ", ".join(not_read) or "none",
        len(collected.resources),
        references_fetched,
        len(unresolved),
        (time.monotonic() - started) * 1000,
    )
    if collected.foreign:
        log.warning(
            "patient record: dropped %d resources of other patients (the FHIR server ignored a patient search "
            "parameter)",
            collected.foreign,
        )
