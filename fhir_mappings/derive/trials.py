"""Treatment trials (Policy 031 criterion 4) and current medications (criteria 2 / reauthorization 1).

A trial is one drug (ingredient) taken continuously — MedicationStatement periods, MedicationRequest history
and MedicationDispense supplies merged when less than `restart_gap_days` apart — or a course of psychotherapy
sessions (Procedure or Encounter, one per day). For each trial the record is read for what the policy asks:

- dose: the highest documented daily dose (Dosage dose × schedule, or dispensed quantity ÷ days supplied)
  against the ingredient's minimum adequate dose (`doses` table, from the MGH ATRQ / ATHF-SF); no documented
  dose → adequacy unknown, never assumed; an ingredient the table lacks → unknown;
- purpose: an exposure whose stated indication is another one (migraine, pain, insomnia, smoking cessation …)
  is not an antidepressant trial and is left out (said in the fact's detail);
- duration and adherence as bounds: partial dates, and dispenses without a readable supply, widen the bounds
  instead of becoming a value (a dispense without daysSupply is not 0 % adherence);
- the current episode starts at the onset of the current MDD diagnosis (its onset[x], not when it was
  recorded); with no onset on record, the recorded date only bounds it from above.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

from fhir_mappings.derive.common import Occurrence, coded_events, occurrences, other_indication, status, valueset_ids
from fhir_mappings.doses import DoseTable, load_dose_table
from fhir_mappings.facts import DeriveFact, FactContext, derivation, format_value, reference_of
from fhir_mappings.model import Bounds, Evidence, Fact, FactState, exact_or_bounds
from fhir_mappings.reading.dates import DateSpan, first_span
from fhir_mappings.reading.dosage import daily_dose_mg, duration_days, strength_mg, supply_daily_mg
from fhir_mappings.reading.text import normalise
from fhir_mappings.reading.values import own_value
from fhir_mappings.record import Availability, as_list, reference_key
from fhir_mappings.rules import Item
from fhir_mappings.valuesets import CodeMatch

Resource = dict[str, Any]
_FAR = date(9999, 12, 31)


# --- which drug ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DrugClass:
    label: str  # class label from the YAML ("SSRI", "lithium", …)
    ingredient: str  # RxCUI of the ingredient (or its name when recognised only from text)
    name: str
    match: CodeMatch


def medication_classes(ctx: FactContext, resource: Resource, class_sets: Mapping[str, str]) -> list[DrugClass]:
    """Each class the medication belongs to, with its ingredient (combination products: several)."""
    concepts = ctx.medication_concepts(resource)
    found: list[DrugClass] = []
    for label, vs_id in class_sets.items():
        match = ctx.match(vs_id, concepts)
        if match is None:
            continue
        if match.via.startswith("ingredient:"):
            rxcui = match.via.split(":", 1)[1]
            name = next((d for s, c, d in ctx.registry.get(vs_id).concepts() if c == rxcui and d), None) or rxcui
        elif match.via == "text":
            rxcui, name = _ingredient_in_text(ctx, vs_id, match.display or "")
        else:
            rxcui = match.code
            name = next((d for s, c, d in ctx.registry.get(vs_id).concepts() if c == rxcui and d), None) or rxcui
        found.append(DrugClass(label, rxcui, name, match))
    return found


def _ingredient_in_text(ctx: FactContext, vs_id: str, text: str) -> tuple[str, str]:
    said = normalise(text)
    for _system, code, display in ctx.registry.get(vs_id).concepts():
        if display and normalise(display) in said:
            return code, display
    return said.strip(), said.strip()


def _prescriptions_of(ctx: FactContext, resource: Resource) -> list[Resource]:
    """The prescriptions a dispense or statement records: authorizingPrescription, basedOn, derivedFrom."""
    found = []
    for key in ("authorizingPrescription", "basedOn", "derivedFrom"):
        for ref in as_list(resource.get(key)):
            target = ctx.record.resolve(ref, within=resource)
            if target is not None and target.get("resourceType") == "MedicationRequest":
                found.append(target)
    return found


def _other_indication(ctx: FactContext, resource: Resource, target: list[str], other: list[str]) -> str | None:
    """Another indication stated on the resource, or on the prescription it fills / is based on (a dispense
    carries no reasonCode of its own: the prescription's "for smoking cessation" is its purpose too)."""
    for holder in (resource, *_prescriptions_of(ctx, resource)):
        found = other_indication(ctx, holder, target, other)
        if found is not None:
            return found
    return None


# --- exposures ------------------------------------------------------------------------------------------------
@dataclass
class Exposure:
    """One medication resource's contribution to a drug's timeline."""

    resource: Resource
    start: DateSpan | None
    end: DateSpan | None  # None: unknown or ongoing (see `ongoing`)
    ongoing: bool
    daily_mg: float | None = None
    covered_days: float | None = None  # dispenses: days supplied (None: not readable)
    stopped_ineffective: CodeMatch | None = None

    @property
    def kind(self) -> str:
        return str(self.resource.get("resourceType"))


def _medication_of(ctx: FactContext, resource: Resource) -> Resource | None:
    ref = resource.get("medicationReference")
    return ctx.record.resolve(ref, within=resource) if isinstance(ref, dict) else None


def _strength(ctx: FactContext, resource: Resource) -> float | None:
    medication = _medication_of(ctx, resource)
    names: list[str | None] = []
    for concept in ctx.medication_concepts(resource):
        names.append(concept.get("text") if isinstance(concept.get("text"), str) else None)
        for coding in as_list(concept.get("coding")):
            if isinstance(coding, dict):
                names.append(coding.get("display") if isinstance(coding.get("display"), str) else None)
                code = coding.get("code")
                if isinstance(code, str):
                    names.append(ctx.registry.rxnorm_name(code))
    return strength_mg(names, medication)


def exposure_of(ctx: FactContext, resource: Resource, reason_vs: str | None) -> Exposure | None:
    rtype = resource.get("resourceType")
    state = status(resource)
    reason_match = None
    if reason_vs:
        reasons = [c for c in as_list(resource.get("statusReason")) if isinstance(c, dict)]
        if state in ("stopped", "completed"):
            reasons += [c for c in as_list(resource.get("reasonCode")) if isinstance(c, dict)]
        reason_match = ctx.match(reason_vs, reasons) if reasons else None
    strength = _strength(ctx, resource)
    if rtype == "MedicationStatement":
        if state in ("entered-in-error", "not-taken", "unknown"):
            return None
        start, _ = first_span(resource, ("effectivePeriod.start", "effectiveDateTime", "dateAsserted"))
        end, _ = first_span(resource, ("effectivePeriod.end",))
        ongoing = end is None and state in ("active", "intended", "on-hold")
        return Exposure(
            resource, start, end, ongoing, daily_dose_mg(as_list(resource.get("dosage")), strength),
            stopped_ineffective=reason_match,
        )  # fmt: skip
    if rtype == "MedicationRequest":
        if state in ("entered-in-error", "draft", "cancelled") or resource.get("intent") in ("proposal", "plan"):
            return None
        dispense = resource.get("dispenseRequest") if isinstance(resource.get("dispenseRequest"), dict) else {}
        start, _ = first_span(resource, ("dispenseRequest.validityPeriod.start", "authoredOn"))
        end, _ = first_span(resource, ("dispenseRequest.validityPeriod.end",))
        if end is None and start is not None:
            days = duration_days(dispense.get("expectedSupplyDuration"))
            repeats = dispense.get("numberOfRepeatsAllowed") or 0
            if days:
                total = int(days * (1 + (repeats if isinstance(repeats, int) else 0)))
                end = DateSpan(start.low + timedelta(days=total), start.high + timedelta(days=total))
        if state == "active" and end is not None and end.high > ctx.today:
            end = None  # refills still allowed are future supply, not days of the trial: it runs until today
        ongoing = state == "active" and end is None
        return Exposure(
            resource, start, end, ongoing, daily_dose_mg(as_list(resource.get("dosageInstruction")), strength),
            stopped_ineffective=reason_match,
        )  # fmt: skip
    if rtype == "MedicationDispense":
        if state not in ("completed", None):
            return None
        start, _ = first_span(resource, ("whenHandedOver", "whenPrepared"))
        days = duration_days(resource.get("daysSupply"), unitless_is_days=True)
        end = None
        if start is not None and days:
            end = DateSpan(start.low + timedelta(days=int(days)), start.high + timedelta(days=int(days)))
        daily = daily_dose_mg(as_list(resource.get("dosageInstruction")), strength)
        if daily is None:
            daily = supply_daily_mg(resource.get("quantity"), days, strength)
        return Exposure(resource, start, end, False, daily, covered_days=days)
    return None


# --- trials -------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    kind: str  # "antidepressant" | "augmentation" | "psychotherapy"
    cls: str
    drug: DrugClass | None
    exposures: list[Exposure] = field(default_factory=list)
    sessions: list[Occurrence] = field(default_factory=list)

    @property
    def ongoing(self) -> bool:
        return any(e.ongoing for e in self.exposures)

    def start(self) -> DateSpan | None:
        spans = [e.start for e in self.exposures if e.start] + [s.span for s in self.sessions if s.span]
        if not spans:
            return None
        return DateSpan(min(s.low for s in spans), min(s.high for s in spans))

    def end(self) -> DateSpan | None:
        """The last day on the drug. A MedicationStatement that documents the stop wins over supply that was
        dispensed or prescribed but not taken (e.g. a refill collected just before stopping)."""
        if self.ongoing:
            return None
        if self.sessions:
            spans = [s.span for s in self.sessions if s.span]
        else:
            stated = [e.end for e in self.exposures if e.end and e.kind == "MedicationStatement"]
            spans = stated or [e.end for e in self.exposures if e.end]
        if not spans:
            return None
        return DateSpan(max(s.low for s in spans), max(s.high for s in spans))


def split_trials(exposures: list[Exposure], gap_days: int) -> list[list[Exposure]]:
    """One drug's exposures, in time order, form separate trials where they are more than `gap_days` apart."""
    dated = sorted((e for e in exposures if e.start), key=lambda e: e.start.low if e.start else date.min)
    groups: list[list[Exposure]] = []
    group_end: date | None = None
    group_ongoing = False
    for exposure in dated:
        assert exposure.start is not None
        start = exposure.start.low
        if groups and (group_ongoing or (group_end is not None and (start - group_end).days <= gap_days)):
            groups[-1].append(exposure)
        else:
            groups.append([exposure])
            group_end, group_ongoing = None, False
        end = (exposure.end or exposure.start).high
        group_end = max(group_end, end) if group_end else end
        group_ongoing = group_ongoing or exposure.ongoing
    return groups


def proportion_covered(start: date, end: date, dispenses: list[Exposure]) -> float | Bounds | None:
    """Proportion of days from `start` to `end` covered by dispenses (overlaps counted once). A dispense whose
    supply cannot be read widens the answer: it covers nothing at the low end and up to the next fill at the
    high end. None without any dated dispense."""
    span = (end - start).days
    dated = sorted((d for d in dispenses if d.start is not None), key=lambda d: d.start.low if d.start else date.min)
    if span <= 0 or not dated:
        return None
    low_days: set[int] = set()
    high_days: set[int] = set()
    for i, dispense in enumerate(dated):
        assert dispense.start is not None
        first = (dispense.start.low - start).days
        if dispense.covered_days:
            covered = range(first, first + int(dispense.covered_days))
            low_days.update(d for d in covered if 0 <= d < span)
            high_days.update(d for d in covered if 0 <= d < span)
        else:
            following = dated[i + 1].start if i + 1 < len(dated) else None
            until = (following.low - start).days if following is not None else span
            high_days.update(d for d in range(first, until) if 0 <= d < span)
    low, high = round(len(low_days) / span, 3), round(len(high_days) / span, 3)
    return exact_or_bounds(low, high)


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
        "doses": "str",
        "depression_indications": "valuesets",
        "other_indications": "valuesets",
    },
    reads=(
        "MedicationStatement",
        "MedicationRequest",
        "MedicationDispense",
        "Procedure",
        "Encounter",
        "Observation",
    ),
    optional=("adherence_observations", "depression_indications", "other_indications"),
)
def treatment_trials(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Antidepressant, augmentation and psychotherapy trials, each with dose, duration, adherence and response
    (fields: kind, class, drug, start, end, ongoing, duration_days, daily_dose_mg, adequate_dose, sessions,
    adherence, inadequate_response, in_current_episode). Bounds where the record leaves a range open.

    Inadequate response = stopped/changed with a reason in `reason_ineffective`; or a severity score at or
    above its moderate band `response_after_days` or more after the start (while on it); or a
    treatment-resistant depression diagnosis on record; a score below the moderate band in that window means
    it worked (False); otherwise unknown.
    """
    table = load_dose_table(params["doses"])
    reason_vs = params["reason_ineffective"]
    depression = valueset_ids(params.get("depression_indications"))
    other = valueset_ids(params.get("other_indications"))
    med_classes = dict(params["antidepressant_classes"])
    aug_classes = dict(params["augmentation_classes"])
    timelines: dict[tuple[str, str, str], list[Exposure]] = {}
    drugs: dict[tuple[str, str, str], DrugClass] = {}
    left_out: list[str] = []
    for rtype in ("MedicationStatement", "MedicationRequest", "MedicationDispense"):
        for resource in ctx.record.of_type(rtype):
            found = [("antidepressant", d) for d in medication_classes(ctx, resource, med_classes)]
            found += [("augmentation", d) for d in medication_classes(ctx, resource, aug_classes)]
            if not found:
                continue
            if other and (why := _other_indication(ctx, resource, depression, other)) is not None:
                left_out.append(f"{reference_of(resource)} (for {why})")
                continue
            exposure = exposure_of(ctx, resource, reason_vs)
            if exposure is None:
                continue
            for kind, drug in found:
                key = (kind, drug.label, drug.ingredient)
                timelines.setdefault(key, []).append(exposure)
                drugs.setdefault(key, drug)
    trials: list[Trial] = []
    for key, exposures in timelines.items():
        for group in split_trials(exposures, params["restart_gap_days"]):
            trials.append(Trial(key[0], key[1], drugs[key], group))
    trials.extend(_psychotherapy_courses(ctx, params["psychotherapy"], params["psychotherapy_gap_days"]))

    episode, episode_note = episode_start(ctx, params["episode_diagnoses"])
    trd = ctx.fact(params["trd_diagnoses"])
    scores = _scores(ctx, params["response_scores"])
    adherence_obs = _adherence_observations(ctx, params.get("adherence_observations"))
    items = [
        _trial_item(ctx, t, table, episode, trd, scores, adherence_obs, params["response_after_days"]) for t in trials
    ]
    # A trial is built from every record of the drug: with one source unread, a documented stop or a gap may be
    # missing, so its length and adherence are not established (evidence that cannot decide on its own).
    unread = [t for t in _MEDICATION_TYPES if ctx.record.availability(t) is not Availability.READ]
    unread_sessions = [t for t in ("Procedure", "Encounter") if ctx.record.availability(t) is not Availability.READ]
    items = [
        replace(i, certain=False) if (unread_sessions if i.get("kind") == "psychotherapy" else unread) else i
        for i in items
    ]
    detail = episode_note
    if left_out:
        detail += "; not antidepressant trials (another indication): " + ", ".join(left_out[:6])
    if unread:
        detail += f"; {', '.join(unread)} not fully read: trial lengths and stops not established"
    return ctx.make_fact(fact.name, items, fact.reads, detail=detail)


_MEDICATION_TYPES = ("MedicationStatement", "MedicationRequest", "MedicationDispense")


def _psychotherapy_courses(ctx: FactContext, codes: str, gap_days: int) -> list[Trial]:
    """Psychotherapy sessions (Procedure or Encounter typed by a psychotherapy code, one event per day) split
    into courses where sessions are more than `gap_days` apart."""
    records = coded_events(ctx, [codes])
    sessions = [o for o in occurrences(records) if o.span is not None]
    courses: list[Trial] = []
    for occurrence in sessions:
        assert occurrence.span is not None
        last = courses[-1].sessions[-1].span if courses else None
        if courses and last is not None and (occurrence.span.low - last.high).days <= gap_days:
            courses[-1].sessions.append(occurrence)
        else:
            courses.append(Trial("psychotherapy", "psychotherapy", None, sessions=[occurrence]))
    return courses


def episode_start(ctx: FactContext, diagnoses_fact: str) -> tuple[DateSpan | None, str]:
    """When the current depressive episode began: the latest onset among the current MDD diagnoses (a newer
    onset is a newer episode). Diagnoses without onset[x] do not move it; if none has an onset, the earliest
    recorded date bounds it from above (the episode began on or before it)."""
    diagnoses = [i for i in ctx.fact(diagnoses_fact).value or () if isinstance(i, Item)]
    onsets: list[tuple[DateSpan, str]] = []
    recorded: list[tuple[date, str]] = []
    for item in diagnoses:
        condition = ctx.record.get(item.evidence.reference)
        if condition is None:
            continue
        span, _ = first_span(condition, ("onsetDateTime", "onsetPeriod.start"))
        if span is not None:
            onsets.append((span, item.evidence.reference))
            continue
        when, _ = first_span(condition, ("recordedDate",))
        if when is not None:
            recorded.append((when.high, item.evidence.reference))
    if onsets:
        span, ref = max(onsets, key=lambda o: (o[0].high, o[0].low))
        return span, f"current episode from {span} (onset of {ref})"
    if recorded:
        high, ref = min(recorded)
        return DateSpan(date.min, high), f"current episode onset not recorded; on or before {high} ({ref} recorded)"
    return None, "current episode onset unknown"


def _scores(ctx: FactContext, response_scores: Mapping[str, Any]) -> list[tuple[Item, float]]:
    """(score item, moderate threshold) for every certain severity score of every configured instrument."""
    out: list[tuple[Item, float]] = []
    for fact_name, moderate in response_scores.items():
        for item in ctx.fact(fact_name).value or ():
            value = item.get("value") if isinstance(item, Item) else None
            if isinstance(item, Item) and item.date and item.certain and isinstance(value, int | float):
                out.append((item, float(moderate)))
    return out


def _adherence_observations(ctx: FactContext, vs_id: str | None) -> dict[str, tuple[float, Resource]]:
    """Documented adherence (in %) keyed by the medication resource it is about (Observation.focus/derivedFrom)."""
    found: dict[str, tuple[float, Resource]] = {}
    if not vs_id:
        return found
    for obs in ctx.record.of_type("Observation"):
        code = obs.get("code")
        if not isinstance(code, dict) or status(obs) not in ("final", "amended", "corrected"):
            continue
        if ctx.match(vs_id, [dict(code)]) is None:
            continue
        reading = own_value(obs)
        value = reading.number()
        if not isinstance(value, float) or reading.unit not in ("%", None) or not 0 <= value <= 100:
            continue
        for ref in as_list(obs.get("focus")) + as_list(obs.get("derivedFrom")):
            target = ref.get("reference") if isinstance(ref, dict) else None
            key = reference_key(target) if isinstance(target, str) else None
            if key:
                found[key] = (value / 100.0, obs)
    return found


def _dose(table: DoseTable, trial: Trial) -> tuple[float | None, bool | None, str]:
    """(highest documented daily dose, adequate?, note). Adequacy is unknown without a documented dose for
    every exposure that could be higher, or without a table row for the ingredient."""
    assert trial.drug is not None
    role = "augmentation" if trial.kind == "augmentation" else "antidepressant"
    row = table.minimum(trial.drug.ingredient, trial.drug.name, role)
    doses = [e.daily_mg for e in trial.exposures]
    known = [d for d in doses if d is not None]
    highest = max(known) if known else None
    if row is None or row.min_daily_mg is None:
        return highest, None, f"no minimum adequate dose on file for {trial.drug.name} as {role}"
    minimum = row.min_daily_mg
    if highest is not None and highest >= minimum:
        return highest, True, f"{highest:g} mg/day ≥ {minimum:g} mg/day ({row.source})"
    if highest is not None and len(known) == len(doses):
        return highest, False, f"{highest:g} mg/day < {minimum:g} mg/day adequate dose ({row.source})"
    shown = f"highest documented {highest:g} mg/day" if highest is not None else "no documented daily dose"
    return highest, None, f"{shown}; adequate ≥ {minimum:g} mg/day ({row.source})"


def _trial_item(
    ctx: FactContext,
    trial: Trial,
    table: DoseTable,
    episode: DateSpan | None,
    trd: Fact,
    scores: list[tuple[Item, float]],
    adherence_obs: Mapping[str, tuple[float, Resource]],
    response_after_days: int,
) -> Item:
    start, end = trial.start(), trial.end()
    effective_end = end or (DateSpan(ctx.today, ctx.today) if trial.ongoing else None)
    duration: float | Bounds | None = None
    if start is not None and effective_end is not None:
        duration = exact_or_bounds(
            max(0, (effective_end.low - start.high).days), max(0, (effective_end.high - start.low).days)
        )
    notes: list[str] = []
    adherence: float | Bounds | None = None
    dose: float | None = None
    adequate: bool | None = None
    if trial.kind != "psychotherapy":
        dose, adequate, dose_note = _dose(table, trial)
        notes.append(dose_note)
        if start is not None and effective_end is not None:
            dispenses = [e for e in trial.exposures if e.kind == "MedicationDispense"]
            adherence = proportion_covered(start.low, effective_end.high, dispenses)
            if adherence is not None:
                notes.append(f"{_percent(adherence)} of days covered by dispenses")
            else:
                for exposure in trial.exposures:
                    documented = adherence_obs.get(reference_of(exposure.resource))
                    if documented:
                        adherence = documented[0]
                        notes.append(
                            f"adherence {round(adherence * 100)} % documented in {reference_of(documented[1])}"
                        )
                        break
    else:
        notes.append(f"{len(trial.sessions)} sessions")
    inadequate: bool | None = None
    reason = next((e.stopped_ineffective for e in trial.exposures if e.stopped_ineffective), None)
    if reason is not None:
        inadequate = True
        notes.append(f"stopped: {reason.display or reason.code}")
    elif trd.state is FactState.PRESENT and any(isinstance(i, Item) and i.certain for i in trd.value or ()):
        inadequate = True
        notes.append("inadequate response supported by a treatment-resistant depression diagnosis")
    elif start is not None:
        window_end = effective_end.low if effective_end else ctx.today
        window = [
            (item, moderate)
            for item, moderate in scores
            if item.date and (item.date - start.high).days >= response_after_days and item.date <= window_end
        ]
        if window:
            latest, moderate = max(window, key=lambda p: p[0].date or date.min)
            inadequate = float(latest.get("value")) >= moderate
            notes.append(
                f"score {format_value(latest.get('value'))} on {latest.evidence.date} "
                f"({'≥' if inadequate else '<'} moderate band {moderate:g})"
            )
    in_episode: bool | None = None
    last_day = effective_end or start
    if episode is not None and last_day is not None:
        in_episode = True if last_day.low >= episode.high else (False if last_day.high < episode.low else None)
    first = trial.exposures[0].resource if trial.exposures else trial.sessions[0].primary
    label = trial.drug.name if trial.drug else "psychotherapy"
    period = f"{start or '?'} → {effective_end or '?'}" + (" (ongoing)" if trial.ongoing else "")
    display = f"{label} ({trial.cls}) {period}" + (f", {duration} days" if duration is not None else "")
    match = trial.drug.match if trial.drug else trial.sessions[0].matches[0]
    evidence = Evidence(
        reference=reference_of(first),
        date=start.text or start.low.isoformat() if start else None,
        code=match.label(),
        display=display,
        note="; ".join(n for n in notes if n) or None,
    )
    support = tuple(Evidence(reference_of(e.resource)) for e in trial.exposures[1:12])
    support += tuple(ev for s in trial.sessions[1:12] for ev in s.evidence()[:1])
    return Item(
        evidence=evidence,
        date=start.low if start else None,
        span=(start.low, start.high) if start and not start.exact else None,
        support=support,
        text_only=match.via == "text",
        fields={
            "kind": trial.kind,
            "class": trial.cls,
            "drug": label,
            "start": start.low if start else None,
            "end": end.high if end else None,
            "ongoing": trial.ongoing,
            "duration_days": duration,
            "daily_dose_mg": dose,
            "adequate_dose": adequate,
            "sessions": len(trial.sessions) if trial.kind == "psychotherapy" else None,
            "adherence": adherence,
            "inadequate_response": inadequate,
            "in_current_episode": in_episode,
            "sources": len(trial.exposures) or len(trial.sessions),
        },
    )


def _percent(value: float | Bounds) -> str:
    if isinstance(value, Bounds):
        return f"{round(value.low * 100)}–{round(value.high * 100)} %"
    return f"{round(value * 100)} %"


# --- current medications --------------------------------------------------------------------------------------
@derivation(
    "current_medications",
    params={
        "classes": "valuesets",
        "route_oral": "valueset",
        "request_active_days": "int",
        "dispense_grace_days": "int",
        "other_indications": "valuesets",
        "target_indications": "valuesets",
    },
    reads=("MedicationStatement", "MedicationRequest", "MedicationDispense"),
    optional=("route_oral", "other_indications", "target_indications"),
)
def current_medications(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Medications of the given classes the patient is taking now (or is being ordered now), by mouth.

    Now = an active MedicationStatement whose period has not ended; an active MedicationRequest authored
    within `request_active_days`; a dispense whose readable supply (plus `dispense_grace_days`) reaches today;
    or a draft order signed together with this one. A stated non-oral route excludes it; so does a stated
    indication in `other_indications` (buprenorphine for pain is not SUD maintenance, amitriptyline for
    migraine is not the antidepressant the policy means).
    """
    classes = dict(params["classes"])
    other = valueset_ids(params.get("other_indications"))
    target = valueset_ids(params.get("target_indications"))
    today = ctx.today
    items: list[Item] = []
    candidates = [
        (r, False)
        for t in ("MedicationStatement", "MedicationRequest", "MedicationDispense")
        for r in ctx.record.of_type(t)
    ]
    candidates += [(o, True) for o in ctx.record.draft_orders if o.get("resourceType") == "MedicationRequest"]
    stops = _documented_stops(ctx, classes, today)
    # a stop or hold may be recorded in a source that was not read: then "current" is not established
    unread = [t for t in _MEDICATION_TYPES if ctx.record.availability(t) is not Availability.READ]
    for resource, is_draft in candidates:
        found = medication_classes(ctx, resource, classes)
        if not found:
            continue
        if other and _other_indication(ctx, resource, target, other) is not None:
            continue
        if not is_draft and resource.get("resourceType") != "MedicationStatement":
            issued, _ = first_span(resource, ("whenHandedOver", "authoredOn"))
            stopped = max((stops.get(d.ingredient) or date.min for d in found), default=date.min)
            if issued is not None and stopped >= issued.high:
                continue  # documented as stopped / held after this fill or prescription
            if any(status(rx) in _NOT_TAKEN_NOW for rx in _prescriptions_of(ctx, resource)):
                continue  # the prescription this dispense filled is on hold, stopped or cancelled
        if params.get("route_oral") and not _oral_or_unstated(ctx, resource, params["route_oral"]):
            continue
        current, how = _is_current(
            resource, is_draft, today, params["request_active_days"], params["dispense_grace_days"]
        )
        if current is False:
            continue
        span, _ = first_span(resource, ("effectivePeriod.start", "effectiveDateTime", "authoredOn", "whenHandedOver"))
        items.append(
            ctx.item_for(
                resource,
                found[0].match,
                span=span,
                fields={"class": found[0].label, "how": how},
                note=how + (f"; {', '.join(unread)} not fully read" if unread and not is_draft else ""),
                certain=current is True and (is_draft or not unread),
            )
        )
    return ctx.make_fact(fact.name, items, fact.reads)


_NOT_TAKEN_NOW = frozenset({"on-hold", "stopped", "cancelled", "entered-in-error"})


def _documented_stops(ctx: FactContext, classes: Mapping[str, str], today: date) -> dict[str, date]:
    """Ingredient → the latest date the record says the patient stopped (or was told to hold) it: a completed /
    stopped MedicationStatement's end, or a MedicationRequest put on hold or stopped (its authoredOn, or the
    last update when it carries one)."""
    stops: dict[str, date] = {}
    for statement in ctx.record.of_type("MedicationStatement"):
        if status(statement) not in ("completed", "stopped"):
            continue
        end, _ = first_span(statement, ("effectivePeriod.end", "dateAsserted"))
        if end is None or end.high > today:
            continue
        for drug in medication_classes(ctx, statement, classes):
            stops[drug.ingredient] = max(stops.get(drug.ingredient, date.min), end.low)
    for request in ctx.record.of_type("MedicationRequest"):
        if status(request) not in ("on-hold", "stopped"):
            continue
        when, _ = first_span(request, ("meta.lastUpdated", "authoredOn"))
        if when is None or when.low > today:
            continue
        for drug in medication_classes(ctx, request, classes):
            stops[drug.ingredient] = max(stops.get(drug.ingredient, date.min), when.low)
    return stops


def _oral_or_unstated(ctx: FactContext, resource: Resource, route_oral_vs: str) -> bool:
    routes = []
    for dosage in as_list(resource.get("dosageInstruction")) + as_list(resource.get("dosage")):
        route = dosage.get("route") if isinstance(dosage, dict) else None
        if isinstance(route, dict):
            routes.append(route)
    return not routes or ctx.match(route_oral_vs, routes) is not None


def _is_current(
    resource: Resource, is_draft: bool, today: date, request_days: int, grace_days: int
) -> tuple[bool | None, str]:
    """Whether the medication is current: True, False, or None when a partial date leaves it open."""
    if is_draft:
        return True, "ordered together with this order"
    rtype = resource.get("resourceType")
    state = status(resource)
    if rtype == "MedicationStatement":
        end, _ = first_span(resource, ("effectivePeriod.end",))
        if state not in ("active", "intended"):
            return False, ""
        if end is None or end.low >= today:
            return True, "active medication statement"
        return (None if end.high >= today else False), "active medication statement"
    if rtype == "MedicationRequest":
        authored, _ = first_span(resource, ("authoredOn",))
        end, _ = first_span(resource, ("dispenseRequest.validityPeriod.end",))
        if state != "active" or authored is None:
            return False, ""
        recent = {(today - authored.high).days <= request_days, (today - authored.low).days <= request_days}
        valid = end is None or end.high >= today
        if not valid or recent == {False}:
            return False, ""
        return (True if recent == {True} and (end is None or end.low >= today) else None), "active prescription"
    if rtype == "MedicationDispense":
        handed, _ = first_span(resource, ("whenHandedOver",))
        days = duration_days(resource.get("daysSupply"), unitless_is_days=True)
        if state not in ("completed", None) or handed is None or days is None:
            return False, ""
        reach_low = handed.low + timedelta(days=int(days) + grace_days)
        reach_high = handed.high + timedelta(days=int(days) + grace_days)
        if reach_low >= today:
            return True, "recent dispense"
        return (None if reach_high >= today else False), "recent dispense"
    return False, ""
