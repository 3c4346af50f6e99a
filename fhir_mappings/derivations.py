"""Computed facts: what a jsonpath cannot say (durations, pairs, adherence, who did what, where).

Each function is registered under the name the YAML uses (`derive: treatment_trials`) with the kinds
of its parameters, so the loader can check the YAML before the service starts. Codes and numbers come
from the parameters (value-set ids, thresholds), never from this module. Every item carries the
evidence it rests on; an item field is None when the record cannot tell (which rules treat as unknown).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from fhir_mappings.facts import (
    DeriveFact,
    FactContext,
    derivation,
    format_value,
    numeric,
    parse_fhir_date,
    reference_of,
)
from fhir_mappings.model import Evidence, Fact, FactState
from fhir_mappings.orders import OrderKind
from fhir_mappings.record import Availability, as_list, reference_key
from fhir_mappings.rules import Item
from fhir_mappings.valuesets import CodeMatch

Resource = dict[str, Any]
_RX = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _status(resource: Resource) -> str | None:
    status = resource.get("status")
    return status if isinstance(status, str) else None


def _first_date(resource: Resource, *paths: str) -> tuple[date | None, str | None]:
    """First present date among dotted paths (e.g. 'effectivePeriod.start')."""
    for path in paths:
        node: Any = resource
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        parsed = parse_fhir_date(node)
        if parsed is not None:
            return parsed, node
    return None, None


# --- patient ---------------------------------------------------------------------------------------
@derivation("age_years", params={}, reads=("Patient",))
def age_years(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Age in completed years on the evaluation date, from Patient.birthDate."""
    patients = ctx.record.of_type("Patient")
    patient = next((p for p in patients if p.get("id") == ctx.record.patient_id), patients[0] if patients else None)
    born = parse_fhir_date(patient.get("birthDate")) if patient else None
    if patient is None or born is None:
        state = FactState.UNAVAILABLE if ctx.availability("Patient") is not Availability.READ else FactState.ABSENT
        return Fact(fact.name, state, None, (), "no Patient.birthDate")
    today = ctx.today
    years = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    evidence = Evidence(reference_of(patient), date=patient.get("birthDate"), value=f"{years} years", note="birthDate")
    return Fact(fact.name, FactState.PRESENT, years, (evidence,))


# --- practitioners ---------------------------------------------------------------------------------
@dataclass
class RoleLookup:
    """Specialties of whoever a reference points to, with the evidence and whether we could tell."""

    labels: dict[str, CodeMatch] = field(default_factory=dict)
    evidence: list[Evidence] = field(default_factory=list)
    known: bool = False  # False: the practitioner or their roles could not be read


def _roles_by_practitioner(ctx: FactContext) -> dict[str, list[Resource]]:
    cache = getattr(ctx, "_roles_index", None)
    if cache is None:
        cache = {}
        for role in ctx.record.of_type("PractitionerRole"):
            ref = (role.get("practitioner") or {}).get("reference")
            if isinstance(ref, str):
                key = reference_key(ref)
                if key:
                    cache.setdefault(key, []).append(role)
        ctx._roles_index = cache  # type: ignore[attr-defined]
    return cache


def lookup_roles(
    ctx: FactContext, reference: Any, role_sets: Mapping[str, str], within: Resource | None = None
) -> RoleLookup:
    """Which of `role_sets` (label -> value set) the referenced practitioner/role has.

    A PractitionerRole is read directly (specialty, code); a Practitioner through its PractitionerRoles
    in the record and its qualifications. Unknown when the reference cannot be resolved, or when a
    Practitioner's roles were never fetchable (prefetch-only call without a FHIR server).
    """
    result = RoleLookup()
    target = ctx.record.resolve(reference, within=within)
    if target is None:
        return result
    concepts: list[tuple[Resource, dict[str, Any]]] = []
    rtype = target.get("resourceType")
    if rtype == "PractitionerRole":
        result.known = True
        concepts += [
            (target, c)
            for c in as_list(target.get("specialty")) + as_list(target.get("code"))
            if isinstance(c, Mapping)
        ]
    elif rtype == "Practitioner":
        key = reference_of(target)
        roles = _roles_by_practitioner(ctx).get(key, [])
        lookup_failed = f"PractitionerRole?practitioner={target.get('id')}" in ctx.record.unresolved_references
        result.known = bool(roles) or (ctx.record.references_resolvable and not lookup_failed)
        for role in roles:
            concepts += [
                (role, c) for c in as_list(role.get("specialty")) + as_list(role.get("code")) if isinstance(c, Mapping)
            ]
        for qualification in as_list(target.get("qualification")):
            code = qualification.get("code") if isinstance(qualification, Mapping) else None
            if isinstance(code, Mapping):
                concepts.append((target, code))
    else:
        return result
    for label, vs_id in role_sets.items():
        for holder, concept in concepts:
            match = ctx.match(vs_id, [concept])
            if match is not None:
                result.labels[label] = match
                result.evidence.append(
                    Evidence(reference_of(holder), code=match.label(), display=match.display, note=f"{label} role")
                )
                break
    return result


def _role_items(
    ctx: FactContext, references: Iterable[tuple[Any, Resource | None, str]], role_sets: Mapping[str, str]
) -> tuple[list[Item], bool]:
    """Items for every role label found on the given references; also whether all were knowable."""
    items: list[Item] = []
    all_known = True
    for reference, holder, how in references:
        lookup = lookup_roles(ctx, reference, role_sets, within=holder)
        all_known = all_known and lookup.known
        for label in lookup.labels:
            ev = next(e for e in lookup.evidence if e.note == f"{label} role")
            items.append(
                Item(
                    evidence=Evidence(ev.reference, code=ev.code, display=ev.display, note=f"{how}: {label}"),
                    date=ctx.today,
                    fields={"role": label, "via": how},
                )
            )
    return items, all_known


def _order_people(ctx: FactContext, element: str) -> list[tuple[Any, Resource | None, str]]:
    refs: list[tuple[Any, Resource | None, str]] = []
    if ctx.group is None:
        return refs
    for order in ctx.group.orders:
        for ref in as_list(order.resource.get(element)):
            if isinstance(ref, Mapping):
                refs.append((ref, order.resource, f"{order.ref} {element}"))
    return refs


@derivation("order_requester_roles", params={"roles": "map"}, reads=())
def order_requester_roles(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Specialties of the ordering clinician (the draft order's requester, else the signing user)."""
    refs = _order_people(ctx, "requester")
    if not refs and ctx.record.user_id:
        refs = [({"reference": ctx.record.user_id}, None, "signing user (context.userId)")]
    items, known = _role_items(ctx, refs, params["roles"])
    return _people_fact(fact.name, items, known and bool(refs))


@derivation("order_performer_roles", params={"roles": "map"}, reads=())
def order_performer_roles(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Specialties of who will perform/monitor the ordered service (ServiceRequest/MedicationRequest.performer)."""
    refs = _order_people(ctx, "performer")
    items, known = _role_items(ctx, refs, params["roles"])
    return _people_fact(fact.name, items, known and bool(refs))


def _people_fact(name: str, items: list[Item], known: bool) -> Fact:
    if items:
        return Fact(name, FactState.PRESENT, tuple(items), tuple(i.evidence for i in items), "", known)
    return Fact(
        name, FactState.ABSENT if known else FactState.UNAVAILABLE, (), (), "" if known else "roles unknown", known
    )


# --- setting ---------------------------------------------------------------------------------------
@derivation(
    "order_setting",
    params={"facility_classes": "valueset", "home_classes": "valueset", "facility_location_types": "valueset"},
    reads=(),
)
def order_setting(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Where the ordered service happens: facility (hospital/office) or home, from the order itself.

    Reads ServiceRequest.locationCode / locationReference (Location.type), the order's encounter
    (or context.encounterId): Encounter.class and Encounter.location's Location.type.
    """
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, (), (), "no order")
    items: list[Item] = []
    unresolved = False

    def classify(resource: Resource, concept: Mapping[str, Any], how: str) -> None:
        for setting, vs in (
            ("facility", params["facility_location_types"]),
            ("facility", params["facility_classes"]),
            ("home", params["home_classes"]),
        ):
            match = ctx.match(vs, [concept])
            if match is not None:
                items.append(
                    Item(
                        Evidence(reference_of(resource), code=match.label(), display=match.display, note=how),
                        date=ctx.today,
                        fields={"setting": setting},
                    )
                )
                return

    encounter_refs: list[Any] = []
    for order in ctx.group.orders:
        res = order.resource
        for concept in as_list(res.get("locationCode")):
            if isinstance(concept, Mapping):
                classify(res, concept, "order locationCode")
        for ref in as_list(res.get("locationReference")):
            location = ctx.record.resolve(ref, within=res)
            if location is None:
                unresolved = True
                continue
            for concept in as_list(location.get("type")):
                classify(location, concept, "order location type")
        if isinstance(res.get("encounter"), Mapping):
            encounter_refs.append(res["encounter"])
    if ctx.record.encounter_id:
        encounter_refs.append({"reference": f"Encounter/{ctx.record.encounter_id}"})
    for ref in encounter_refs:
        encounter = ctx.record.resolve(ref)
        if encounter is None:
            unresolved = True
            continue
        cls = encounter.get("class")
        if isinstance(cls, Mapping):
            classify(encounter, {"coding": [cls]}, "encounter class")
        for loc in as_list(encounter.get("location")):
            location = ctx.record.resolve(loc.get("location") if isinstance(loc, Mapping) else None, within=encounter)
            for concept in as_list((location or {}).get("type")):
                classify(location or {}, concept, "encounter location type")
    known = not unresolved
    if items:
        return Fact(fact.name, FactState.PRESENT, tuple(items), tuple(i.evidence for i in items), "", known)
    return Fact(fact.name, FactState.UNAVAILABLE, (), (), "the order states no location or encounter", False)


# --- vital signs -----------------------------------------------------------------------------------
@derivation(
    "blood_pressures",
    params={"panel": "valueset", "systolic": "valueset", "diastolic": "valueset", "filter": "str"},
    reads=("Observation",),
)
def blood_pressures(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Blood pressure readings as systolic/diastolic pairs: panel components, or separate observations
    taken at the same instant."""
    status_filter = ctx.library.filters[params["filter"]]
    readings: dict[tuple[str, str], dict[str, Any]] = {}
    items: list[Item] = []
    for obs in ctx.record.of_type("Observation"):
        code = obs.get("code")
        if not isinstance(code, Mapping) or not status_filter.accepts(obs):
            continue
        when_date, when_text = _first_date(
            obs, "effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"
        )
        if ctx.match(params["panel"], [code]):
            systolic = diastolic = None
            for component in as_list(obs.get("component")):
                ccode = component.get("code") if isinstance(component, Mapping) else None
                if not isinstance(ccode, Mapping):
                    continue
                value = numeric(component.get("valueQuantity"))
                if ctx.match(params["systolic"], [ccode]):
                    systolic = value
                elif ctx.match(params["diastolic"], [ccode]):
                    diastolic = value
            items.append(_bp_item(obs, when_date, when_text, systolic, diastolic))
            continue
        for part in ("systolic", "diastolic"):
            if ctx.match(params[part], [code]):
                slot = readings.setdefault((str(when_text), reference_of(obs) if not when_text else ""), {})
                slot[part] = numeric(obs.get("valueQuantity"))
                slot.setdefault("resource", obs)
                slot["date"], slot["text"] = when_date, when_text
    for slot in readings.values():
        items.append(
            _bp_item(slot["resource"], slot["date"], slot["text"], slot.get("systolic"), slot.get("diastolic"))
        )
    return ctx.make_fact(fact.name, items, ("Observation",))


def _bp_item(obs: Resource, when: date | None, when_text: str | None, systolic: Any, diastolic: Any) -> Item:
    shown = f"{format_value(systolic) or '?'}/{format_value(diastolic) or '?'} mm[Hg]"
    return Item(
        Evidence(reference_of(obs), date=when_text, code="LOINC blood pressure", value=shown),
        date=when,
        fields={"systolic": systolic, "diastolic": diastolic, "value": shown},
    )


# --- medications -----------------------------------------------------------------------------------
@dataclass
class _Exposure:
    """One medication resource's contribution to a drug's timeline."""

    resource: Resource
    start: date | None
    end: date | None  # None: unknown or ongoing (see `ongoing`)
    ongoing: bool
    covered_days: int | None = None  # dispenses: days supplied
    stopped_ineffective: CodeMatch | None = None
    route_oral: bool | None = None


def _medication_classes(
    ctx: FactContext, resource: Resource, class_sets: Mapping[str, str]
) -> list[tuple[str, str, CodeMatch]]:
    """(class label, ingredient key, match) for each class the medication belongs to (combinations: several)."""
    concepts = ctx.medication_concepts(resource)
    found: list[tuple[str, str, CodeMatch]] = []
    for label, vs_id in class_sets.items():
        match = ctx.match(vs_id, concepts)
        if match is None:
            continue
        ingredient = match.via.split(":", 1)[1] if match.via.startswith("ingredient:") else match.code
        found.append((label, ingredient, match))
    return found


def _exposure(ctx: FactContext, resource: Resource, reason_vs: str | None) -> _Exposure | None:
    rtype = resource.get("resourceType")
    status = _status(resource)
    today = ctx.today
    reason_match = None
    if reason_vs:
        reasons = [c for c in as_list(resource.get("statusReason")) if isinstance(c, Mapping)]
        reasons += (
            [c for c in as_list(resource.get("reasonCode")) if isinstance(c, Mapping)]
            if status in ("stopped", "completed")
            else []
        )
        reason_match = ctx.match(reason_vs, reasons) if reasons else None
    if rtype == "MedicationStatement":
        if status in ("entered-in-error", "not-taken"):
            return None
        start, _ = _first_date(resource, "effectivePeriod.start", "effectiveDateTime", "dateAsserted")
        end, _ = _first_date(resource, "effectivePeriod.end")
        ongoing = end is None and status in ("active", "intended", "on-hold")
        if end is None and status == "active":
            end = today
        return _Exposure(resource, start, end, ongoing, stopped_ineffective=reason_match)
    if rtype == "MedicationRequest":
        if status in ("entered-in-error", "draft", "cancelled") or resource.get("intent") in ("proposal", "plan"):
            return None
        start, _ = _first_date(resource, "dispenseRequest.validityPeriod.start", "authoredOn")
        end, _ = _first_date(resource, "dispenseRequest.validityPeriod.end")
        if end is None:
            supply = (resource.get("dispenseRequest") or {}).get("expectedSupplyDuration") or {}
            days = _duration_days(supply)
            repeats = (resource.get("dispenseRequest") or {}).get("numberOfRepeatsAllowed") or 0
            if start and days:
                end = start + timedelta(days=int(days * (1 + (repeats if isinstance(repeats, int) else 0))))
        ongoing = status == "active" and end is None
        return _Exposure(resource, start, end, ongoing, stopped_ineffective=reason_match)
    if rtype == "MedicationDispense":
        if status not in ("completed", None):
            return None
        start, _ = _first_date(resource, "whenHandedOver", "whenPrepared")
        days = _duration_days(resource.get("daysSupply") or {})
        end = start + timedelta(days=int(days)) if start and days else None
        return _Exposure(resource, start, end, False, covered_days=int(days) if days else None)
    return None


def _duration_days(quantity: Mapping[str, Any]) -> float | None:
    value = quantity.get("value") if isinstance(quantity, Mapping) else None
    if not isinstance(value, int | float):
        return None
    unit = str(quantity.get("code") or quantity.get("unit") or "d").lower()
    factor = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7, "mo": 30, "month": 30, "months": 30}.get(
        unit, 1
    )
    return float(value) * factor


@dataclass
class _Trial:
    kind: str
    cls: str
    drug: str
    exposures: list[_Exposure]
    match: CodeMatch

    @property
    def start(self) -> date | None:
        starts = [e.start for e in self.exposures if e.start]
        return min(starts) if starts else None

    @property
    def end(self) -> date | None:
        """The last day on the drug. A MedicationStatement that documents the stop wins over supply that was
        dispensed or prescribed but not taken (e.g. a refill collected just before stopping)."""
        if any(e.ongoing for e in self.exposures):
            return None
        stated = [e.end for e in self.exposures if e.end and e.resource.get("resourceType") == "MedicationStatement"]
        if stated:
            return max(stated)
        ends = [e.end for e in self.exposures if e.end]
        return max(ends) if ends else None

    @property
    def ongoing(self) -> bool:
        return any(e.ongoing for e in self.exposures)


def _split_trials(exposures: list[_Exposure], gap_days: int) -> list[list[_Exposure]]:
    """One drug's exposures, in time order, form separate trials where they are more than `gap_days` apart."""
    dated = sorted((e for e in exposures if e.start), key=lambda e: e.start or date.min)
    groups: list[list[_Exposure]] = []
    group_end: date | None = None
    group_ongoing = False
    for exposure in dated:
        start = exposure.start or date.min
        if groups and (group_ongoing or (group_end is not None and (start - group_end).days <= gap_days)):
            groups[-1].append(exposure)
        else:
            groups.append([exposure])
            group_end, group_ongoing = None, False
        end = exposure.end or exposure.start
        group_end = max(group_end, end) if group_end and end else (end or group_end)
        group_ongoing = group_ongoing or exposure.ongoing
    return groups


def _pdc(trial_start: date, trial_end: date, dispenses: list[_Exposure]) -> float | None:
    """Proportion of days covered by dispenses between trial start and end (overlaps counted once)."""
    span = (trial_end - trial_start).days
    if span <= 0 or not dispenses:
        return None
    covered: set[int] = set()
    for d in dispenses:
        if d.start is None or not d.covered_days:
            continue
        for offset in range(d.covered_days):
            day = (d.start - trial_start).days + offset
            if 0 <= day < span:
                covered.add(day)
    return round(len(covered) / span, 3)


@derivation(
    "treatment_trials",
    params={
        "antidepressant_classes": "valuesets",
        "augmentation_classes": "valuesets",
        "psychotherapy": "valueset",
        "episode_diagnoses": "fact",
        "trd_diagnoses": "fact",
        "reason_ineffective": "valueset",
        "response_scores": "map",
        "response_after_days": "int",
        "restart_gap_days": "int",
        "psychotherapy_gap_days": "int",
        "adherence_observations": "valueset",
    },
    reads=("MedicationStatement", "MedicationRequest", "MedicationDispense", "Procedure", "Observation"),
    optional=("adherence_observations",),
)
def treatment_trials(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Antidepressant, augmentation and psychotherapy trials, each with duration, adherence and response.

    - A trial is one drug (ingredient) taken continuously: MedicationStatement periods, MedicationRequest
      history (validity period or supply duration) and MedicationDispense supplies, merged when less than
      `restart_gap_days` apart. Psychotherapy sessions (Procedure) form one course the same way.
    - Adherence = proportion of days covered by MedicationDispense (whenHandedOver + daysSupply) over the
      trial; else a documented adherence Observation (value in %) about that medication; else unknown.
      Psychotherapy has no adherence (the policy's 80 % applies to medication).
    - Inadequate response = stopped/changed with a reason in `reason_ineffective`; or a severity score at or
      above its moderate band `response_after_days` or more after the start (while on it); or a
      treatment-resistant depression diagnosis on record; a score below the moderate band in that window
      means it worked (False); otherwise unknown.
    - In the current episode = the trial ends on/after the onset of the current depressive episode (onset of
      the most recent current MDD diagnosis); unknown without an onset date.
    """
    reason_vs = params["reason_ineffective"]
    med_classes = {**{k: v for k, v in params["antidepressant_classes"].items()}}
    aug_classes = dict(params["augmentation_classes"])
    timelines: dict[tuple[str, str, str], list[_Exposure]] = {}
    matches: dict[tuple[str, str, str], CodeMatch] = {}
    for rtype in ("MedicationStatement", "MedicationRequest", "MedicationDispense"):
        for resource in ctx.record.of_type(rtype):
            found = [("antidepressant", *m) for m in _medication_classes(ctx, resource, med_classes)]
            found += [("augmentation", *m) for m in _medication_classes(ctx, resource, aug_classes)]
            if not found:
                continue
            exposure = _exposure(ctx, resource, reason_vs)
            if exposure is None:
                continue
            for kind, label, ingredient, match in found:
                key = (kind, label, ingredient)
                timelines.setdefault(key, []).append(exposure)
                matches.setdefault(key, match)
    trials: list[_Trial] = []
    for key, exposures in timelines.items():
        for group in _split_trials(exposures, params["restart_gap_days"]):
            trials.append(_Trial(key[0], key[1], matches[key].display or matches[key].code, group, matches[key]))
    sessions: list[_Exposure] = []
    psych_match: CodeMatch | None = None
    for proc in ctx.record.of_type("Procedure"):
        code = proc.get("code")
        if _status(proc) in ("completed", "in-progress") and isinstance(code, Mapping):
            match = ctx.match(params["psychotherapy"], [code])
            if match is not None:
                start, _ = _first_date(proc, "performedDateTime", "performedPeriod.start")
                if start:
                    sessions.append(_Exposure(proc, start, start, False))
                    psych_match = match
    for group in _split_trials(sessions, params["psychotherapy_gap_days"]):
        assert psych_match is not None
        trials.append(_Trial("psychotherapy", "psychotherapy", "psychotherapy", group, psych_match))

    episode_start, episode_evidence = _episode_start(ctx, params["episode_diagnoses"])
    trd = ctx.fact(params["trd_diagnoses"])
    scores = _scores(ctx, params["response_scores"])
    adherence_obs = _adherence_observations(ctx, params.get("adherence_observations"))
    items = [
        _trial_item(ctx, t, episode_start, trd, scores, adherence_obs, params["response_after_days"]) for t in trials
    ]
    detail = (
        f"current episode from {episode_start.isoformat()} ({episode_evidence})"
        if episode_start
        else "current episode onset unknown"
    )
    return ctx.make_fact(fact.name, items, fact.reads, detail=detail)


def _episode_start(ctx: FactContext, diagnoses_fact: str) -> tuple[date | None, str]:
    diagnoses = ctx.fact(diagnoses_fact)
    dated = [i for i in diagnoses.value or () if isinstance(i, Item) and i.date]
    if not dated:
        return None, ""
    latest = max(dated, key=lambda i: i.date or date.min)
    return latest.date, latest.evidence.reference


def _scores(ctx: FactContext, response_scores: Mapping[str, Any]) -> list[tuple[Item, float]]:
    """(score item, moderate threshold) for every severity score of every configured instrument."""
    out: list[tuple[Item, float]] = []
    for fact_name, moderate in response_scores.items():
        for item in ctx.fact(fact_name).value or ():
            if isinstance(item, Item) and item.date and isinstance(item.get("value"), int | float):
                out.append((item, float(moderate)))
    return out


def _adherence_observations(ctx: FactContext, vs_id: str | None) -> dict[str, tuple[float, Resource]]:
    """Documented adherence (in %) keyed by the medication resource it is about (Observation.focus/derivedFrom)."""
    found: dict[str, tuple[float, Resource]] = {}
    if not vs_id:
        return found
    for obs in ctx.record.of_type("Observation"):
        code = obs.get("code")
        if not isinstance(code, Mapping) or ctx.match(vs_id, [code]) is None:
            continue
        value = numeric(obs.get("valueQuantity"))
        if not isinstance(value, int | float):
            continue
        for ref in as_list(obs.get("focus")) + as_list(obs.get("derivedFrom")):
            target = ref.get("reference") if isinstance(ref, Mapping) else None
            key = reference_key(target) if isinstance(target, str) else None
            if key:
                found[key] = (float(value) / 100.0, obs)
    return found


def _trial_item(
    ctx: FactContext,
    trial: _Trial,
    episode_start: date | None,
    trd: Fact,
    scores: list[tuple[Item, float]],
    adherence_obs: Mapping[str, tuple[float, Resource]],
    response_after_days: int,
) -> Item:
    start, end = trial.start, trial.end
    effective_end = end or (ctx.today if trial.ongoing else None)
    duration = (effective_end - start).days if start and effective_end else None
    notes: list[str] = []

    adherence: float | None = None
    if trial.kind != "psychotherapy" and start and effective_end:
        dispenses = [e for e in trial.exposures if e.resource.get("resourceType") == "MedicationDispense"]
        adherence = _pdc(start, effective_end, dispenses)
        if adherence is not None:
            notes.append(f"{round(adherence * 100)} % of days covered by dispenses")
        else:
            for exposure in trial.exposures:
                documented = adherence_obs.get(reference_of(exposure.resource))
                if documented:
                    adherence = documented[0]
                    notes.append(f"adherence {round(adherence * 100)} % documented in {reference_of(documented[1])}")
                    break
    inadequate: bool | None = None
    reason = next((e.stopped_ineffective for e in trial.exposures if e.stopped_ineffective), None)
    if reason is not None:
        inadequate = True
        notes.append(f"stopped: {reason.display or reason.code}")
    elif trd.state is FactState.PRESENT:
        inadequate = True
        notes.append("inadequate response supported by a treatment-resistant depression diagnosis")
    elif start:
        window_end = effective_end or ctx.today
        window = [
            (item, moderate)
            for item, moderate in scores
            if item.date and (item.date - start).days >= response_after_days and item.date <= window_end
        ]
        if window:
            latest, moderate = max(window, key=lambda p: p[0].date or date.min)
            inadequate = float(latest.get("value")) >= moderate
            notes.append(
                f"score {format_value(latest.get('value'))} on {latest.evidence.date} "
                f"({'≥' if inadequate else '<'} moderate band {moderate:g})"
            )
    in_episode: bool | None = None
    if episode_start is not None:
        in_episode = (effective_end or start or date.min) >= episode_start if (effective_end or start) else None
    first = trial.exposures[0].resource
    period = f"{start.isoformat() if start else '?'} → {effective_end.isoformat() if effective_end else '?'}"
    if trial.ongoing:
        period += " (ongoing)"
    display = f"{trial.drug} ({trial.cls}) {period}" + (f", {duration} days" if duration is not None else "")
    evidence = Evidence(
        reference=reference_of(first),
        date=start.isoformat() if start else None,
        code=trial.match.label(),
        display=display,
        note="; ".join(notes) or None,
    )
    return Item(
        evidence=evidence,
        date=start,
        fields={
            "kind": trial.kind,
            "class": trial.cls,
            "drug": trial.drug,
            "start": start,
            "end": end,
            "ongoing": trial.ongoing,
            "duration_days": duration,
            "adherence": adherence,
            "inadequate_response": inadequate,
            "in_current_episode": in_episode,
            "sources": len(trial.exposures),
        },
    )


@derivation(
    "current_medications",
    params={
        "classes": "valuesets",
        "route_oral": "valueset",
        "request_active_days": "int",
        "dispense_grace_days": "int",
    },
    reads=("MedicationStatement", "MedicationRequest", "MedicationDispense"),
    optional=("route_oral",),
)
def current_medications(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Medications of the given classes the patient is taking now (or is being ordered now), by mouth.

    Now = an active MedicationStatement whose period has not ended; an active MedicationRequest authored
    within `request_active_days`; a dispense whose supply (plus `dispense_grace_days`) reaches today; or
    a draft order signed together with this one. A stated non-oral route excludes it.
    """
    classes = dict(params["classes"])
    today = ctx.today
    items: list[Item] = []
    candidates = [
        (r, False)
        for t in ("MedicationStatement", "MedicationRequest", "MedicationDispense")
        for r in ctx.record.of_type(t)
    ]
    candidates += [(o, True) for o in ctx.record.draft_orders if o.get("resourceType") == "MedicationRequest"]
    stops = _documented_stops(ctx, classes, today)
    for resource, is_draft in candidates:
        found = _medication_classes(ctx, resource, classes)
        if not found:
            continue
        if not is_draft and resource.get("resourceType") != "MedicationStatement":
            issued, _ = _first_date(resource, "whenHandedOver", "authoredOn")
            stopped = max((stops.get(ingredient) or date.min for _label, ingredient, _m in found), default=date.min)
            if issued is not None and stopped >= issued:
                continue  # a MedicationStatement documents that it was stopped after this fill / prescription
        if params.get("route_oral") and not _oral_or_unstated(ctx, resource, params["route_oral"]):
            continue
        current, how = _is_current(
            resource, is_draft, today, params["request_active_days"], params["dispense_grace_days"]
        )
        if not current:
            continue
        label, _ingredient, match = found[0]
        when, when_text = _first_date(
            resource, "effectivePeriod.start", "effectiveDateTime", "authoredOn", "whenHandedOver"
        )
        items.append(
            ctx.item_for(resource, match, when=when, date_text=when_text, fields={"class": label, "how": how}, note=how)
        )
    return ctx.make_fact(fact.name, items, fact.reads)


def _documented_stops(ctx: FactContext, classes: Mapping[str, str], today: date) -> dict[str, date]:
    """Ingredient → the latest date a MedicationStatement says the patient stopped taking it (before today)."""
    stops: dict[str, date] = {}
    for statement in ctx.record.of_type("MedicationStatement"):
        if _status(statement) not in ("completed", "stopped"):
            continue
        end, _ = _first_date(statement, "effectivePeriod.end", "dateAsserted")
        if end is None or end > today:
            continue
        for _label, ingredient, _match in _medication_classes(ctx, statement, classes):
            stops[ingredient] = max(stops.get(ingredient, date.min), end)
    return stops


def _oral_or_unstated(ctx: FactContext, resource: Resource, route_oral_vs: str) -> bool:
    routes = []
    for dosage in as_list(resource.get("dosageInstruction")) + as_list(resource.get("dosage")):
        route = dosage.get("route") if isinstance(dosage, Mapping) else None
        if isinstance(route, Mapping):
            routes.append(route)
    return not routes or ctx.match(route_oral_vs, routes) is not None


def _is_current(
    resource: Resource, is_draft: bool, today: date, request_days: int, grace_days: int
) -> tuple[bool, str]:
    if is_draft:
        return True, "ordered together with this order"
    rtype = resource.get("resourceType")
    status = _status(resource)
    if rtype == "MedicationStatement":
        end, _ = _first_date(resource, "effectivePeriod.end")
        return status in ("active", "intended") and (end is None or end >= today), "active medication statement"
    if rtype == "MedicationRequest":
        authored, _ = _first_date(resource, "authoredOn")
        end, _ = _first_date(resource, "dispenseRequest.validityPeriod.end")
        recent = authored is not None and (today - authored).days <= request_days
        return status == "active" and recent and (end is None or end >= today), "active prescription"
    if rtype == "MedicationDispense":
        handed, _ = _first_date(resource, "whenHandedOver")
        days = _duration_days(resource.get("daysSupply") or {})
        if status in ("completed", None) and handed and days is not None:
            return (handed + timedelta(days=int(days) + grace_days)) >= today, "recent dispense"
    return False, ""


# --- ketamine history --------------------------------------------------------------------------------
@derivation(
    "ketamine_administrations",
    params={
        "ketamine": "valueset",
        "infusion_codes": "valueset",
        "session_codes": "valueset",
        "route_iv": "valueset",
        "psychiatric": "valuesets",
    },
    reads=("MedicationAdministration", "Procedure"),
    optional=("psychiatric",),
)
def ketamine_administrations(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Ketamine given before for a psychiatric purpose: MedicationAdministration of ketamine, or a completed
    Procedure for the infusion (CPT 96365) that names ketamine (usedCode, code text, reason), or a KAP session
    procedure. Given with reasons that are all non-psychiatric (e.g. procedural sedation) it is not treatment
    history: such administrations are left out when `psychiatric` value sets are given."""
    items: list[Item] = []
    psychiatric = list(params.get("psychiatric") or [])

    def non_psychiatric(resource: Resource) -> bool:
        reasons = [c for c in as_list(resource.get("reasonCode")) if isinstance(c, Mapping)]
        for ref in as_list(resource.get("reasonReference")):
            condition = ctx.record.resolve(ref, within=resource)
            if condition is not None and isinstance(condition.get("code"), Mapping):
                reasons.append(condition["code"])
        return bool(psychiatric and reasons) and not any(ctx.match(vs, reasons) for vs in psychiatric)

    for admin in ctx.record.of_type("MedicationAdministration"):
        if _status(admin) not in ("completed", "in-progress") or non_psychiatric(admin):
            continue
        match = ctx.match(params["ketamine"], ctx.medication_concepts(admin))
        if match is None:
            continue
        route = (admin.get("dosage") or {}).get("route")
        iv = ctx.match(params["route_iv"], [route]) is not None if isinstance(route, Mapping) else None
        when, text = _first_date(admin, "effectiveDateTime", "effectivePeriod.start")
        items.append(
            ctx.item_for(admin, match, when=when, date_text=text, fields={"iv": iv, "source": "administration"})
        )
    for proc in ctx.record.of_type("Procedure"):
        code = proc.get("code")
        if _status(proc) not in ("completed", "in-progress") or not isinstance(code, Mapping):
            continue
        when, text = _first_date(proc, "performedDateTime", "performedPeriod.start")
        if non_psychiatric(proc):
            continue
        session = ctx.match(params["session_codes"], [code])
        if session is not None:
            items.append(
                ctx.item_for(proc, session, when=when, date_text=text, fields={"iv": None, "source": "session"})
            )
            continue
        infusion = ctx.match(params["infusion_codes"], [code])
        if infusion is None:
            continue
        named = [
            c
            for c in as_list(proc.get("usedCode")) + as_list(proc.get("reasonCode")) + [code]
            if isinstance(c, Mapping)
        ]
        if ctx.match(params["ketamine"], named) is None:
            continue
        items.append(ctx.item_for(proc, infusion, when=when, date_text=text, fields={"iv": True, "source": "infusion"}))
    return ctx.make_fact(fact.name, items, fact.reads)


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
    """Courses of ketamine (administrations less than `course_gap_days` apart) and whether each helped.

    Improved = on some rating scale the latest score after the course started is at least
    `min_relative_improvement` (fraction) below the baseline (the latest score in the
    `baseline_window_days` before the first dose); or a CGI-Improvement score ≤ `cgi_improved_max`
    after the start; or a documented functional improvement after the start. Not improved = at least
    one scale has a baseline and a follow-up and none of the above holds. Otherwise unknown.
    """
    administrations = [i for i in ctx.fact(params["administrations"]).value or () if isinstance(i, Item) and i.date]
    administrations.sort(key=lambda i: i.date or date.min)
    courses: list[list[Item]] = []
    for admin in administrations:
        if (
            courses
            and admin.date
            and courses[-1][-1].date
            and (admin.date - courses[-1][-1].date).days <= params["course_gap_days"]
        ):
            courses[-1].append(admin)
        else:
            courses.append([admin])
    scales = {
        name: [i for i in ctx.fact(name).value or () if isinstance(i, Item) and i.date] for name in params["scores"]
    }
    cgi = [i for i in ctx.fact(params["cgi_improvement"]).value or () if isinstance(i, Item) and i.date]
    functional = [i for i in ctx.fact(params["functional_improvement"]).value or () if isinstance(i, Item) and i.date]
    items: list[Item] = []
    for course in courses:
        start, end = course[0].date, course[-1].date
        assert start is not None and end is not None
        improved: bool | None = None
        notes: list[str] = []
        pairs = 0
        # Follow-up belongs to this course: scores after its start and before `followup_window_days` past its
        # last dose (a relapse years later says nothing about whether this course helped).
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
            change = (bv - fv) / bv
            notes.append(f"{name}: {bv:g} → {fv:g} ({change * 100:+.0f} % improvement)")
            if change >= params["min_relative_improvement"]:
                improved = True
        for item in cgi:
            if (
                item.date
                and start < item.date <= follow_until
                and isinstance(item.get("value"), int | float)
                and item.get("value") <= params["cgi_improved_max"]
            ):
                improved = True
                notes.append(f"CGI-I {item.get('value'):g} on {item.evidence.date}")
        for item in functional:
            if item.date and start < item.date <= follow_until:
                improved = True
                notes.append(f"functional improvement documented {item.evidence.date}")
        if improved is None and pairs:
            improved = False
        first = course[0]
        items.append(
            Item(
                Evidence(
                    first.evidence.reference,
                    date=first.evidence.date,
                    display=f"ketamine course {start.isoformat()} → {end.isoformat()}, {len(course)} administrations",
                    note="; ".join(notes) or "no rating-scale pair around the course",
                ),
                date=end,
                fields={"start": start, "end": end, "administrations": len(course), "improved": improved},
            )
        )
    return ctx.make_fact(fact.name, items, fact.reads)


# --- clearances and care ------------------------------------------------------------------------------
@derivation("specialist_clearances", params={"clearance": "valueset", "roles": "map"}, reads=("Observation",))
def specialist_clearances(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Documented clearance for IV ketamine by a specialist: an Observation with a clearance code whose
    value is not negative, with the specialties of its performer (field `roles`; unknown if unreadable)."""
    items: list[Item] = []
    for obs in ctx.record.of_type("Observation"):
        code = obs.get("code")
        if not isinstance(code, Mapping) or _status(obs) not in ("final", "amended", "corrected"):
            continue
        match = ctx.match(params["clearance"], [code])
        if match is None or obs.get("valueBoolean") is False:
            continue
        roles: set[str] = set()
        known = True
        for performer in as_list(obs.get("performer")):
            lookup = lookup_roles(ctx, performer, params["roles"], within=obs)
            known = known and lookup.known
            roles.update(lookup.labels)
        when, text = _first_date(obs, "effectiveDateTime", "effectivePeriod.start", "issued")
        items.append(
            ctx.item_for(
                obs,
                match,
                when=when,
                date_text=text,
                fields={"roles": frozenset(roles) if (roles or known) else None},
                note=f"by {', '.join(sorted(roles))}" if roles else None,
            )
        )
    return ctx.make_fact(fact.name, items, fact.reads)


@derivation("care_relationships", params={"roles": "map"}, reads=("Encounter", "CareTeam"))
def care_relationships(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Clinicians of the given roles caring for the patient: encounter participants (dated by the
    encounter) and members of an active CareTeam (dated today: the team is current)."""
    items: list[Item] = []
    for encounter in ctx.record.of_type("Encounter"):
        if _status(encounter) in ("cancelled", "entered-in-error", "planned"):
            continue
        when, text = _first_date(encounter, "period.start")
        for participant in as_list(encounter.get("participant")):
            individual = participant.get("individual") if isinstance(participant, Mapping) else None
            if not isinstance(individual, Mapping):
                continue
            lookup = lookup_roles(ctx, individual, params["roles"], within=encounter)
            for label, match in lookup.labels.items():
                items.append(
                    ctx.item_for(
                        encounter, match, when=when, date_text=text, fields={"role": label}, note=f"{label} encounter"
                    )
                )
    for team in ctx.record.of_type("CareTeam"):
        if _status(team) not in ("active", None):
            continue
        for participant in as_list(team.get("participant")):
            member = participant.get("member") if isinstance(participant, Mapping) else None
            if not isinstance(member, Mapping):
                continue
            lookup = lookup_roles(ctx, member, params["roles"], within=team)
            for label, match in lookup.labels.items():
                items.append(
                    ctx.item_for(
                        team,
                        match,
                        when=ctx.today,
                        date_text=None,
                        fields={"role": label},
                        note=f"{label} on care team",
                    )
                )
    return ctx.make_fact(fact.name, items, fact.reads)


@derivation(
    "evaluations_by_role",
    params={"codes": "valueset", "roles": "map", "candidacy": "valuesets"},
    reads=("Procedure", "Encounter"),
    optional=("candidacy",),
)
def evaluations_by_role(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Completed evaluations (Procedure or Encounter.type in `codes`) with the role of who performed them
    (field `roles`: set of labels; None when the performer could not be read)."""
    items: list[Item] = []
    sources: list[tuple[Resource, list[Any], list[Any], tuple[str, ...]]] = []
    for proc in ctx.record.of_type("Procedure"):
        if _status(proc) == "completed":
            actors = [p.get("actor") for p in as_list(proc.get("performer")) if isinstance(p, Mapping)]
            sources.append((proc, [proc.get("code")], actors, ("performedDateTime", "performedPeriod.start")))
    for enc in ctx.record.of_type("Encounter"):
        if _status(enc) in ("finished", "in-progress", "arrived"):
            actors = [p.get("individual") for p in as_list(enc.get("participant")) if isinstance(p, Mapping)]
            sources.append((enc, as_list(enc.get("type")), actors, ("period.start",)))
    for resource, concepts, actors, date_paths in sources:
        match = ctx.match(params["codes"], [c for c in concepts if isinstance(c, Mapping)])
        if match is None:
            continue
        roles: set[str] = set()
        known = True
        for actor in actors:
            if isinstance(actor, Mapping):
                lookup = lookup_roles(ctx, actor, params["roles"], within=resource)
                known = known and lookup.known
                roles.update(lookup.labels)
        when, text = _first_date(resource, *date_paths)
        candidacy_sets = list(params.get("candidacy") or [])
        candidacy = bool(_mentions(ctx, resource, candidacy_sets, "candidacy")) if candidacy_sets else None
        items.append(
            ctx.item_for(
                resource,
                match,
                when=when,
                date_text=text,
                fields={
                    "roles": frozenset(roles) if (roles or (known and actors)) else None,
                    "candidacy": candidacy,
                },
                note=f"by {', '.join(sorted(roles))}"
                if roles
                else ("performer not identified" if not actors else None),
            )
        )
    return ctx.make_fact(fact.name, items, fact.reads)


# --- the order ---------------------------------------------------------------------------------------
@derivation("order_route", params={}, reads=())
def order_route(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """The administration route of the ordered service (IV, IM, nasal, oral, sublingual, other, unknown)."""
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, None, (), "no order")
    route = ctx.group.route
    evidence = tuple(Evidence(o.ref, value=o.route.value, note="route") for o in ctx.group.orders)
    if route.value == "unknown":
        return Fact(fact.name, FactState.UNAVAILABLE, None, evidence, "the order states no route")
    return Fact(fact.name, FactState.PRESENT, route.value, evidence)


@derivation("order_kind", params={}, reads=())
def order_kind(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, None)
    return Fact(fact.name, FactState.PRESENT, ctx.group.kind.value, tuple(Evidence(r) for r in ctx.group.refs))


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
    notes: list[str] = []
    evidence: list[Evidence] = []
    if ctx.group is None or ctx.group.kind is not OrderKind.KETAMINE_ADMINISTRATION:
        return Fact(fact.name, FactState.ABSENT, ())
    order = ctx.group.primary.resource
    weight_items = [i for i in ctx.fact(params["body_weight"]).value or () if isinstance(i, Item) and i.date]
    weight = max(weight_items, key=lambda i: i.date or date.min) if weight_items else None
    kg = _kilograms(weight) if weight else None
    for dosage in as_list(order.get("dosageInstruction")):
        if not isinstance(dosage, Mapping):
            continue
        for dose_rate in as_list(dosage.get("doseAndRate")):
            dose = dose_rate.get("doseQuantity") if isinstance(dose_rate, Mapping) else None
            mg = _milligrams(dose) if isinstance(dose, Mapping) else None
            if mg is None:
                continue
            if kg:
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
                    "no body weight on record."
                )
        timing = (dosage.get("timing") or {}).get("repeat") or {}
        duration = _minutes(timing.get("duration"), timing.get("durationUnit"))
        if duration is not None and duration != params["minutes"]:
            notes.append(
                f"Infusion over {duration:g} minutes; the policy's starting dose is given over "
                f"{params['minutes']} minutes."
            )
        per_week = _per_week(timing)
        if per_week is not None and per_week > params["max_per_week"]:
            notes.append(
                f"Frequency {per_week:g} per week exceeds the induction schedule of "
                f"2–{params['max_per_week']} per week (weeks 1–4)."
            )
    if not notes:
        return Fact(fact.name, FactState.ABSENT, ())
    return Fact(fact.name, FactState.PRESENT, tuple(notes), tuple(evidence))


def _kilograms(item: Item) -> float | None:
    value = item.get("value")
    unit = str(item.get("unit") or "kg").lower()
    if not isinstance(value, int | float):
        return None
    return float(value) * (0.45359237 if unit in ("[lb_av]", "lb", "lbs") else 1.0)


_MG_PER_UNIT = {"mg": 1.0, "g": 1000.0, "ug": 0.001, "mcg": 0.001}


def _milligrams(quantity: Mapping[str, Any]) -> float | None:
    value = quantity.get("value")
    unit = str(quantity.get("code") or quantity.get("unit") or "").lower()
    factor = _MG_PER_UNIT.get(unit)
    return float(value) * factor if isinstance(value, int | float) and factor else None


def _minutes(value: Any, unit: Any) -> float | None:
    if not isinstance(value, int | float):
        return None
    return float(value) * {"s": 1 / 60, "min": 1, "h": 60}.get(str(unit), 1)


def _per_week(repeat: Mapping[str, Any]) -> float | None:
    frequency, period, unit = repeat.get("frequency"), repeat.get("period"), repeat.get("periodUnit")
    if not isinstance(frequency, int | float) or not isinstance(period, int | float) or period <= 0:
        return None
    days = {"d": 1, "wk": 7, "mo": 30, "h": 1 / 24}.get(str(unit))
    return None if days is None else frequency * 7 / (period * days)


# --- ketamine-assisted psychotherapy (MP-054) --------------------------------------------------------
def _order_date(ctx: FactContext) -> tuple[date, str]:
    """When the ordered service happens: occurrence[x], else authoredOn, else the evaluation date."""
    if ctx.group is not None:
        when, text = _first_date(
            ctx.group.primary.resource, "occurrenceDateTime", "occurrencePeriod.start", "authoredOn"
        )
        if when is not None:
            return when, str(text)
    return ctx.today, ctx.today.isoformat()


@derivation("order_reasons", params={"classes": "valuesets", "psychiatric": "valuesets"}, reads=("Condition",))
def order_reasons(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """The indications stated on the draft orders (reasonCode, reasonReference → Condition.code).

    Item codes = the `classes` value sets the reason is in (for `code_in`); field `psychiatric` is True when
    the reason is in any of the `psychiatric` value sets. ABSENT when no order states a reason.
    """
    items: list[Item] = []
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, ())
    classes = list(params["classes"].values()) if isinstance(params["classes"], Mapping) else list(params["classes"])
    psychiatric = (
        list(params["psychiatric"].values())
        if isinstance(params["psychiatric"], Mapping)
        else list(params["psychiatric"])
    )
    known = True
    for order in ctx.group.orders:
        res = order.resource
        concepts: list[tuple[dict[str, Any], Resource]] = [
            (c, res) for c in as_list(res.get("reasonCode")) if isinstance(c, Mapping)
        ]
        for ref in as_list(res.get("reasonReference")):
            condition = ctx.record.resolve(ref, within=res)
            if condition is None:
                known = False
            elif isinstance(condition.get("code"), Mapping):
                concepts.append((condition["code"], condition))
        for concept, holder in concepts:
            matched = [vs for vs in classes if ctx.match(vs, [concept])]
            is_psych = bool(matched) or any(ctx.match(vs, [concept]) for vs in psychiatric)
            first = ctx.match(matched[0], [concept]) if matched else None
            items.append(
                Item(
                    Evidence(
                        reference_of(holder),
                        code=first.label() if first else None,
                        display=format_value(concept),
                        note="order reason",
                    ),
                    date=ctx.today,
                    fields={"psychiatric": is_psych},
                    codes=frozenset(matched),
                )
            )
    if items:
        return Fact(fact.name, FactState.PRESENT, tuple(items), tuple(i.evidence for i in items), "", known)
    return Fact(
        fact.name, FactState.ABSENT if known else FactState.UNAVAILABLE, (), (), "no reason on the order", known
    )


@derivation("order_mentions", params={"valuesets": "valuesets"}, reads=())
def order_mentions(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Whether the order (or another draft order signed with it) names one of the value sets — by code or,
    where the value set has text patterns, in its code text, order details, reason, notes or instructions."""
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, ())
    valuesets = (
        list(params["valuesets"].values()) if isinstance(params["valuesets"], Mapping) else list(params["valuesets"])
    )
    own = {o.ref for o in ctx.group.orders}
    items: list[Item] = []
    for order in ctx.group.orders:
        items.extend(_mentions(ctx, order.resource, valuesets, "this order"))
    for sibling in ctx.record.draft_orders:
        if f"{sibling.get('resourceType')}/{sibling.get('id')}" not in own:
            items.extend(_mentions(ctx, sibling, valuesets, "signed together"))
    return ctx.make_fact(fact.name, items, ())


def _mentions(ctx: FactContext, resource: Resource, valuesets: list[str], how: str) -> list[Item]:
    concepts: list[dict[str, Any]] = []
    for key in ("code", "medicationCodeableConcept"):
        if isinstance(resource.get(key), Mapping):
            concepts.append(resource[key])
    for key in ("orderDetail", "reasonCode"):
        concepts.extend(c for c in as_list(resource.get(key)) if isinstance(c, Mapping))
    texts = [n.get("text") for n in as_list(resource.get("note")) if isinstance(n, Mapping)]
    texts.append(resource.get("patientInstruction"))
    concepts.extend({"text": t} for t in texts if isinstance(t, str) and t)
    for vs in valuesets:
        match = ctx.match(vs, concepts)
        if match is not None:
            return [
                Item(
                    Evidence(reference_of(resource), code=match.label(), display=match.display, note=how),
                    date=ctx.today,
                )
            ]
    return []


@derivation(
    "integration_timing",
    params={"kap_sessions": "fact", "sessions": "fact", "course_gap_days": "int", "justification": "valuesets"},
    reads=("Procedure", "MedicationAdministration"),
)
def integration_timing(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Where this integration session falls relative to the KAP session(s) and earlier integration sessions.

    One item (evidence: the latest KAP session before the session date) with fields:
    days_after_kap (session date − latest KAP session), sessions_in_course (integration sessions already on
    record since the start of the current KAP course), first_session_days_after_kap (of an earlier session
    after the latest KAP session; None if this is the first), same_day_session (another integration session
    already on the session date), justification (the order names a clinical justification).
    ABSENT without a KAP session.
    """
    session_date, session_text = _order_date(ctx)
    kap = sorted(
        (
            i
            for i in ctx.fact(params["kap_sessions"]).value or ()
            if isinstance(i, Item) and i.date and i.date <= session_date
        ),
        key=lambda i: i.date or date.min,
    )
    if not kap:
        kap_fact = ctx.fact(params["kap_sessions"])
        return Fact(
            fact.name,
            FactState.ABSENT if kap_fact.complete else FactState.UNAVAILABLE,
            (),
            (),
            "no KAP session on record",
            kap_fact.complete,
        )
    latest = kap[-1]
    course_start = latest.date
    for item in reversed(kap[:-1]):
        if course_start and item.date and (course_start - item.date).days <= params["course_gap_days"]:
            course_start = item.date
        else:
            break
    own_ids = {o.ref for o in ctx.group.orders} if ctx.group else set()
    earlier = [
        s
        for s in ctx.fact(params["sessions"]).value or ()
        if isinstance(s, Item)
        and s.date
        and course_start
        and s.date >= course_start
        and s.evidence.reference not in own_ids
    ]
    after_latest = sorted(
        (s for s in earlier if latest.date and s.date and s.date >= latest.date), key=lambda s: s.date or date.min
    )
    assert latest.date is not None
    first_after = (after_latest[0].date - latest.date).days if after_latest and after_latest[0].date else None
    same_day = [s for s in earlier if s.date == session_date]
    order = ctx.group.primary.resource if ctx.group else {}
    # A same-day session needs the provider's clinical justification on the order (a coded reason or note
    # text naming it, value sets `justification`); a scheduling note is not one.
    justification = bool(_mentions(ctx, order, list(params["justification"]), "same-day justification"))
    prior = "; ".join(
        f"{s.evidence.reference} on {s.evidence.date}" for s in sorted(earlier, key=lambda s: s.date or date.min)
    )
    item = Item(
        Evidence(
            latest.evidence.reference,
            date=latest.evidence.date,
            code=latest.evidence.code,
            display=f"KAP session {latest.date.isoformat()}; this session {session_date.isoformat()}",
            value=f"{(session_date - latest.date).days} days after the KAP session",
            note=f"integration sessions already on record since {course_start}: {prior or 'none'}"
            if course_start
            else None,
        ),
        date=session_date,
        fields={
            "days_after_kap": (session_date - latest.date).days,
            "sessions_in_course": len(earlier),
            "first_session_days_after_kap": first_after,
            "same_day_session": bool(same_day),
            "justification": justification,
        },
    )
    extra = tuple(s.evidence for s in earlier)
    return Fact(fact.name, FactState.PRESENT, (item,), (item.evidence, *extra), session_text)


def _organisations_of_order(ctx: FactContext) -> tuple[list[Resource], bool]:
    """Organizations and Locations where the ordered service happens (performer, its role's organization,
    locationReference, encounter service provider / location) and whether every reference resolved."""
    found: list[Resource] = []
    resolved = True
    if ctx.group is None:
        return found, False

    def take(ref: Any, within: Resource | None) -> None:
        nonlocal resolved
        if not isinstance(ref, Mapping):
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
                take(loc.get("location") if isinstance(loc, Mapping) else None, target)

    for order in ctx.group.orders:
        res = order.resource
        for key in ("performer", "locationReference"):
            for ref in as_list(res.get(key)):
                take(ref, res)
        take(res.get("encounter"), res)
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
            and isinstance(p.get("managingOrganization"), Mapping)
            and reference_key(str(p["managingOrganization"].get("reference", ""))) in place_refs
        )
    ]
    items: list[Item] = []
    for place in places:
        match = None
        for ident in as_list(place.get("identifier")):
            if isinstance(ident, Mapping) and ident.get("system") and ident.get("value"):
                match = ctx.match(
                    params["clinics"], [{"coding": [{"system": ident["system"], "code": ident["value"]}]}]
                )
                if match:
                    break
        identified = any(
            isinstance(i, Mapping) and i.get("system") and i.get("value") for i in as_list(place.get("identifier"))
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
    kap = [i for i in ctx.fact(params["kap_sessions"]).value or () if isinstance(i, Item) and i.date]
    if kap:
        latest_day = max(i.date or date.min for i in kap)
        # A KAP session is often two records (the dosing Procedure and the MedicationAdministration): read both.
        for item in (i for i in kap if i.date == latest_day):
            session = ctx.record.get(item.evidence.reference)
            for performer in as_list((session or {}).get("performer")):
                actor = performer.get("actor") if isinstance(performer, Mapping) else None
                if isinstance(actor, Mapping):
                    refs.append((actor, session, "KAP session monitor"))
    items, known = _role_items(ctx, refs, params["roles"])
    return _people_fact(fact.name, items, known and bool(refs))


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
                code = qualification.get("code") if isinstance(qualification, Mapping) else None
                match = ctx.match(params["training"], [code]) if isinstance(code, Mapping) else None
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
    name one of the `mentions` value sets — e.g. a 90791 consultation "for ketamine-assisted psychotherapy"."""
    mentions = (
        list(params["mentions"].values()) if isinstance(params["mentions"], Mapping) else list(params["mentions"])
    )
    items: list[Item] = []
    candidates = [
        (p, [p.get("code")], ("performedDateTime", "performedPeriod.start"))
        for p in ctx.record.of_type("Procedure")
        if _status(p) == "completed"
    ]
    candidates += [
        (e, as_list(e.get("type")), ("period.start",))
        for e in ctx.record.of_type("Encounter")
        if _status(e) in ("finished", "in-progress")
    ]
    for resource, concepts, date_paths in candidates:
        match = ctx.match(params["codes"], [c for c in concepts if isinstance(c, Mapping)])
        if match is None or not _mentions(ctx, resource, mentions, "evaluation"):
            continue
        when, text = _first_date(resource, *date_paths)
        items.append(
            ctx.item_for(resource, match, when=when, date_text=text, note="mentions ketamine-assisted psychotherapy")
        )
    return ctx.make_fact(fact.name, items, fact.reads)


@derivation("order_has", params={"element": "str"}, reads=())
def order_has(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Whether any draft order of the group carries an element (e.g. `performer`): lets a rule say
    "the requester counts only when no performer is named"."""
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, ())
    items = [
        Item(Evidence(o.ref, note=f"has {params['element']}"), date=ctx.today)
        for o in ctx.group.orders
        if o.resource.get(params["element"]) not in (None, [], {})
    ]
    return ctx.make_fact(fact.name, items, ())
