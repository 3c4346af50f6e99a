"""Turn Synthea FHIR R4 output into sandbox background scenario files (one small, policy-relevant record each).

The sandbox needs realistic *background* patients next to the hand-written stories: records whose shape comes from
an established generator (tietai-synthea, a Python port of Synthea) rather than from what a test author expected.
Raw Synthea bundles are megabytes of claims, notes and labs the payer policies never read, so this module keeps what
the policies read, trims dated data to a recent window, rewrites every reference to `Type/id` with stable ids, gives
each patient one sandbox Coverage routing it to one of our two policies, and adds one draft order to sign.

Generation itself is documented (sandbox/patients/background/README.md), never imported: this file needs only the
standard library, so the project venv never gets the generator. Output is deterministic: the same input and options
give byte-identical files.

    python -m sandbox.synthea_import --input /tmp/synthea-out --output sandbox/patients/background \\
        --reference-date 2026-01-15 --max-years 6 --select 8 --seed 20260115
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote

log = logging.getLogger("sandbox.synthea_import")

JSON = dict[str, Any]

GENERATOR = "tietai-synthea 1.5.0"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "patients" / "background"
DEFAULT_MAX_YEARS = 6
DEFAULT_SELECT = 8
ADULT_AGE = 18

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CPT = "http://www.ama-assn.org/go/cpt"
UCUM = "http://unitsofmeasure.org"

# ------------------------------------------------------------------ what is kept

#: Resource types copied when their date is inside the window (Patient is always kept, Coverage is replaced).
CLINICAL_TYPES = frozenset(
    {
        "Condition",
        "Observation",
        "MedicationRequest",
        "MedicationStatement",
        "MedicationDispense",
        "MedicationAdministration",
        "Procedure",
        "Encounter",
        "AllergyIntolerance",
        "CareTeam",
    }
)
#: Kept whatever their date: a diagnosis or an allergy from 20 years ago still matters (bipolar history, allergy).
UNDATED_CLINICAL_TYPES = frozenset({"Condition", "AllergyIntolerance"})
#: Kept only when a kept resource points at them (PractitionerRole also when its practitioner is kept).
SUPPORT_TYPES = frozenset({"Practitioner", "PractitionerRole", "Organization", "Location", "Medication"})

#: Observations the policies read, by LOINC code (vital-signs category observations are kept as well).
PHQ9_TOTAL = "44261-6"
PHQ9_PANEL = "44249-1"
BODY_WEIGHT = "29463-7"
OBSERVATION_CODES = frozenset(
    {
        PHQ9_TOTAL,
        PHQ9_PANEL,
        "55758-7",  # PHQ-2 total score
        "55757-9",  # PHQ-2 panel
        "85354-9",  # blood pressure panel
        "8480-6",  # systolic blood pressure
        "8462-4",  # diastolic blood pressure
        BODY_WEIGHT,
        "2106-3",  # hCG (pregnancy test) presence in urine
        "2118-8",  # hCG presence in serum or plasma
        "19080-1",  # hCG mass/volume in serum or plasma
        "82810-3",  # pregnancy status
        "11449-6",  # pregnancy status - reported
        "8665-2",  # last menstrual period start date
        "11778-8",  # delivery date, estimated
        "49051-6",  # gestational age
        "63895-7",  # breastfeeding status
    }
)
VITAL_SIGNS_CATEGORY = "vital-signs"

#: Top-level elements whose reference the holder cannot lose: when the target is not kept, the holder is dropped.
REQUIRED_REFERENCE_ELEMENTS = frozenset({"subject", "patient", "beneficiary", "medicationReference"})

#: Synthea SNOMED codes for major depressive disorder (the port's MDD module uses 370143000; veteran_mdd 36923009).
MDD_CODES = frozenset(
    {
        "370143000",  # Major depressive disorder
        "36923009",  # Major depression, single episode
        "66344007",  # Recurrent major depression
        "87512008",  # Mild major depression
        "832007",  # Moderate major depression
        "76441001",  # Severe major depression without psychotic features
        "73867007",  # Severe major depression with psychotic features
    }
)

#: Ingredient names, matched in medication displays; only for the one-line description and for selection.
ANTIDEPRESSANT_INGREDIENTS = (
    "amitriptyline",
    "bupropion",
    "citalopram",
    "clomipramine",
    "desipramine",
    "desvenlafaxine",
    "doxepin",
    "duloxetine",
    "escitalopram",
    "fluoxetine",
    "fluvoxamine",
    "imipramine",
    "isocarboxazid",
    "levomilnacipran",
    "mirtazapine",
    "nefazodone",
    "nortriptyline",
    "paroxetine",
    "phenelzine",
    "protriptyline",
    "sertraline",
    "tranylcypromine",
    "trazodone",
    "trimipramine",
    "venlafaxine",
    "vilazodone",
    "vortioxetine",
)
MEDICATION_TYPES = ("MedicationRequest", "MedicationStatement", "MedicationDispense", "MedicationAdministration")

#: Output order of entries: things referenced before things that reference them (friendlier to strict servers).
TYPE_ORDER = (
    "Patient",
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "Medication",
    "Coverage",
    "CareTeam",
    "Encounter",
    "Condition",
    "AllergyIntolerance",
    "Procedure",
    "Observation",
    "MedicationRequest",
    "MedicationDispense",
    "MedicationStatement",
    "MedicationAdministration",
)

# ------------------------------------------------------------------ sandbox payer convention


@dataclass(frozen=True)
class Payer:
    """One of the two sandbox payers; hand-written scenarios use the same Organization resources."""

    key: str  # tag and short name
    organization_id: str
    name: str
    identifier_value: str
    plan_name: str


PAYER_ID_SYSTEM = "https://ketamine-cds.example.org/payer-id"
MGB = Payer("mgb", "payer-mgbhp", "Mass General Brigham Health Plan", "MGBHP", "MGB Health Plan Commercial")
UUHP = Payer("uuhp", "payer-uuhp", "University of Utah Health Plans", "UUHP", "U of U Health Plans Commercial")
#: Background patient n (1-based) gets PAYERS[(n - 1) % 2]: odd numbers MGB, even numbers U of U.
PAYERS = (MGB, UUHP)
SOPT_PRIVATE = {"system": "https://nahdo.org/sopt", "code": "5", "display": "PRIVATE HEALTH INSURANCE"}


def payer_organization(payer: Payer) -> JSON:
    """The payer Organization exactly as every sandbox bundle writes it (identical content avoids lint warnings)."""
    return {
        "resourceType": "Organization",
        "id": payer.organization_id,
        "active": True,
        "identifier": [{"system": PAYER_ID_SYSTEM, "value": payer.identifier_value}],
        "type": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                        "code": "pay",
                        "display": "Payer",
                    }
                ]
            }
        ],
        "name": payer.name,
    }


# ------------------------------------------------------------------ small helpers


def _codes(concept: Any, system: str | None = None) -> list[str]:
    """Codes of a CodeableConcept (optionally of one system only)."""
    if not isinstance(concept, dict):
        return []
    return [
        str(coding.get("code"))
        for coding in concept.get("coding", [])
        if isinstance(coding, dict) and (system is None or coding.get("system") == system)
    ]


def _concept_text(concept: Any) -> str:
    """Text and displays of a CodeableConcept, lower-cased, for name matching."""
    if not isinstance(concept, dict):
        return ""
    parts = [str(concept.get("text") or "")]
    parts += [str(coding.get("display") or "") for coding in concept.get("coding", []) if isinstance(coding, dict)]
    return " ".join(parts).lower()


def _day(value: Any) -> date | None:
    """The calendar day of a FHIR date/dateTime string (as written; no zone conversion), or None."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def _years_before(day: date, years: int) -> date:
    """Same month and day `years` earlier (29 February falls back to 28)."""
    try:
        return day.replace(year=day.year - years)
    except ValueError:
        return day.replace(year=day.year - years, day=28)


def _age(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def short_hash(text: str, length: int = 12) -> str:
    """Stable short hex digest: ids must not change between runs."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def iter_references(node: Any) -> Iterator[str]:
    """Every `reference` string anywhere below node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from iter_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_references(item)


_REMOVE = object()


def rewrite_references(node: Any, resolve: Callable[[str], str | None]) -> Any:
    """Copy of node with each Reference rewritten by `resolve`; None removes that Reference element.

    Containers left empty by a removal are removed as well (FHIR JSON forbids empty objects and arrays), so an
    Encounter.location entry whose only content was the dropped Location disappears with it.
    """
    result = _rewrite(node, resolve)
    return {} if result is _REMOVE else result


def _rewrite(node: Any, resolve: Callable[[str], str | None]) -> Any:
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str):
            target = resolve(reference)
            if target is None:
                return _REMOVE
            copied = {key: _rewrite(value, resolve) for key, value in node.items() if key != "reference"}
            copied = {key: value for key, value in copied.items() if value is not _REMOVE}
            return {"reference": target, **copied}
        out: dict[str, Any] = {}
        for key, value in node.items():
            rewritten = _rewrite(value, resolve)
            if rewritten is _REMOVE:
                continue
            out[key] = rewritten
        return out if out or not node else _REMOVE
    if isinstance(node, list):
        items = [item for item in (_rewrite(value, resolve) for value in node) if item is not _REMOVE]
        return items if items or not node else _REMOVE
    return node


# ------------------------------------------------------------------ reading Synthea output


@dataclass
class Source:
    """One Synthea resource, where it came from and how it can be referred to."""

    key: tuple[str, str]  # (resourceType, Synthea id)
    resource: JSON
    index: int  # position in its bundle (shared resources come after the patient's own)


@dataclass
class SyntheaRecord:
    """The resources of one patient bundle plus the shared practitioner/hospital resources it may point to."""

    path: Path
    sources: dict[tuple[str, str], Source] = field(default_factory=dict)
    aliases: dict[str, tuple[str, str]] = field(default_factory=dict)  # reference string -> key

    @property
    def patient(self) -> JSON:
        return next(source.resource for source in self.sources.values() if source.key[0] == "Patient")

    def resolve(self, reference: str) -> tuple[str, str] | None:
        """The key a Synthea reference points at: `urn:uuid:`, `Type/id` or `Type?identifier=system|value`."""
        if reference in self.aliases:
            return self.aliases[reference]
        return self.aliases.get(unquote(reference))

    def of_type(self, resource_type: str) -> list[Source]:
        return [source for source in self.sources.values() if source.key[0] == resource_type]


def _entries(bundle: Any) -> list[tuple[str | None, JSON]]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return []
    found = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str) and resource.get("id"):
            found.append((entry.get("fullUrl"), resource))
    return found


def _add_source(record: SyntheaRecord, full_url: str | None, resource: JSON, index: int) -> None:
    key = (resource["resourceType"], str(resource["id"]))
    if key in record.sources:
        return  # the patient's own copy wins over a shared one
    record.sources[key] = Source(key, resource, index)
    names = [f"{key[0]}/{key[1]}"]
    if full_url:
        names.append(full_url)
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("value") is not None:
            # upstream Synthea's conditional references into practitionerInformation / hospitalInformation bundles
            names.append(f"{key[0]}?identifier={identifier.get('system', '')}|{identifier['value']}")
    for name in names:
        record.aliases.setdefault(name, key)


def find_bundles(input_dir: Path) -> tuple[list[Path], list[Path]]:
    """Patient bundle files and shared (practitioner/hospital) bundle files under input_dir or input_dir/fhir."""
    folder = input_dir / "fhir" if (input_dir / "fhir").is_dir() else input_dir
    files = sorted(path for path in folder.glob("*.json") if path.is_file())
    shared = [path for path in files if path.name.startswith(("practitionerInformation", "hospitalInformation"))]
    patients = [path for path in files if path not in shared]
    return patients, shared


def load_shared(paths: Iterable[Path]) -> list[tuple[str | None, JSON]]:
    resources: list[tuple[str | None, JSON]] = []
    for path in paths:
        resources += _entries(json.loads(path.read_text(encoding="utf-8")))
    return resources


def load_record(path: Path, shared: list[tuple[str | None, JSON]]) -> SyntheaRecord | None:
    """One patient bundle as a SyntheaRecord, or None when the file holds no Patient."""
    entries = _entries(json.loads(path.read_text(encoding="utf-8")))
    if not any(resource["resourceType"] == "Patient" for _, resource in entries):
        return None
    record = SyntheaRecord(path)
    for index, (full_url, resource) in enumerate(entries):
        _add_source(record, full_url, resource, index)
    for index, (full_url, resource) in enumerate(shared, start=len(entries)):
        _add_source(record, full_url, resource, index)
    return record


# ------------------------------------------------------------------ dates and filters


def resource_day(resource: JSON) -> date | None:
    """The latest day a dated clinical resource is about (None: undated or ongoing, so never trimmed)."""
    kind = resource["resourceType"]
    if kind in ("CareTeam", "MedicationStatement"):
        period = resource.get("period" if kind == "CareTeam" else "effectivePeriod")
        if isinstance(period, dict) and not period.get("end") and resource.get("status") == "active":
            return None  # ongoing
    candidates: list[Any] = []
    for key in ("effectiveDateTime", "effectiveInstant", "issued", "performedDateTime", "authoredOn"):
        candidates.append(resource.get(key))
    for key in ("whenHandedOver", "whenPrepared", "dateAsserted", "recordedDate"):
        candidates.append(resource.get(key))
    for key in ("period", "effectivePeriod", "performedPeriod"):
        period = resource.get(key)
        if isinstance(period, dict):
            candidates += [period.get("end"), period.get("start")]
    days = [day for day in (_day(value) for value in candidates) if day is not None]
    return max(days) if days else None


def observation_wanted(resource: JSON) -> bool:
    """PHQ-9 / PHQ-2, vital signs (blood pressure, weight, ...) and pregnancy-related observations."""
    if set(_codes(resource.get("code"), LOINC)) & OBSERVATION_CODES:
        return True
    return any(VITAL_SIGNS_CATEGORY in _codes(category) for category in resource.get("category") or [])


def _first_base(record: SyntheaRecord, cutoff: date) -> set[tuple[str, str]]:
    """Clinical resources the filters keep, before reference integrity is enforced."""
    keep: set[tuple[str, str]] = set()
    for source in record.sources.values():
        kind, resource = source.key[0], source.resource
        if kind == "Patient":
            keep.add(source.key)
            continue
        if kind not in CLINICAL_TYPES:
            continue
        if kind == "Observation" and not observation_wanted(resource):
            continue
        if kind not in UNDATED_CLINICAL_TYPES:
            day = resource_day(resource)
            if day is not None and day < cutoff:
                continue
        keep.add(source.key)
    return keep


def _targets(record: SyntheaRecord, resource: JSON) -> Iterator[tuple[str, str]]:
    for reference in iter_references(resource):
        key = record.resolve(reference)
        if key is not None:
            yield key


def _close_support(record: SyntheaRecord, base: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """base plus the support resources (practitioners, organizations, ...) it points at, transitively."""
    kept = set(base)
    roles = record.of_type("PractitionerRole")
    pending = list(kept)
    while pending:
        key = pending.pop()
        for target in _targets(record, record.sources[key].resource):
            if target[0] in SUPPORT_TYPES and target not in kept and target in record.sources:
                kept.add(target)
                pending.append(target)
        if key[0] == "Practitioner":
            # a practitioner's specialty lives on PractitionerRole, which points at the practitioner
            for role in roles:
                if role.key not in kept and key in set(_targets(record, role.resource)):
                    kept.add(role.key)
                    pending.append(role.key)
    return kept


def _missing_required(record: SyntheaRecord, resource: JSON, kept: set[tuple[str, str]]) -> bool:
    for element in REQUIRED_REFERENCE_ELEMENTS:
        for reference in iter_references(resource.get(element)):
            if reference.startswith("#"):
                continue
            if record.resolve(reference) not in kept:
                return True
    return False


def select_keys(record: SyntheaRecord, cutoff: date) -> set[tuple[str, str]]:
    """Keys kept for one record: filtered clinical data, their support resources, minus holders of lost references."""
    dropped: set[tuple[str, str]] = set()
    base = _first_base(record, cutoff)
    while True:
        kept = _close_support(record, base - dropped)
        newly = {
            key for key in kept if key[0] != "Patient" and _missing_required(record, record.sources[key].resource, kept)
        }
        if not newly:
            return kept
        dropped |= newly


# ------------------------------------------------------------------ summaries (selection and description)


@dataclass
class Summary:
    """What selection and the one-line description need to know about a (trimmed) record."""

    alive: bool
    age: int | None
    gender: str
    has_mdd: bool
    mdd_onset: date | None  # earliest onset (or recorded) day of an MDD Condition
    phq9: list[tuple[date, float]]  # (day, score), oldest first
    antidepressants: list[str]  # distinct ingredient names, sorted

    @property
    def latest_phq9(self) -> tuple[date, float] | None:
        return self.phq9[-1] if self.phq9 else None


def antidepressant_ingredients(resources: Iterable[JSON]) -> list[str]:
    found: set[str] = set()
    for resource in resources:
        if resource["resourceType"] not in MEDICATION_TYPES:
            continue
        text = _concept_text(resource.get("medicationCodeableConcept"))
        found.update(name for name in ANTIDEPRESSANT_INGREDIENTS if name in text)
    # "citalopram" is inside "escitalopram": count it only when it stands on its own
    if "citalopram" in found and "escitalopram" in found:
        texts = " ".join(
            _concept_text(resource.get("medicationCodeableConcept"))
            for resource in resources
            if resource["resourceType"] in MEDICATION_TYPES
        )
        if not re.search(r"(?<!es)citalopram", texts):
            found.discard("citalopram")
    return sorted(found)


def _phq9_scores(resources: Iterable[JSON]) -> list[tuple[date, float]]:
    scores = []
    for resource in resources:
        if resource["resourceType"] != "Observation" or PHQ9_TOTAL not in _codes(resource.get("code"), LOINC):
            continue
        value = (resource.get("valueQuantity") or {}).get("value")
        day = resource_day(resource)
        if isinstance(value, (int, float)) and day is not None:
            scores.append((day, float(value)))
    return sorted(scores)


def summarize(resources: list[JSON], reference_date: date) -> Summary:
    patient = next(resource for resource in resources if resource["resourceType"] == "Patient")
    birth = _day(patient.get("birthDate"))
    alive = not patient.get("deceasedDateTime") and patient.get("deceasedBoolean") is not True
    onsets = [
        _day(resource.get("onsetDateTime")) or _day(resource.get("recordedDate"))
        for resource in resources
        if resource["resourceType"] == "Condition" and set(_codes(resource.get("code"), SNOMED)) & MDD_CODES
    ]
    known_onsets = [onset for onset in onsets if onset is not None]
    return Summary(
        alive=alive,
        age=_age(birth, reference_date) if birth else None,
        gender=str(patient.get("gender") or "unknown"),
        has_mdd=bool(onsets),
        mdd_onset=min(known_onsets) if known_onsets else None,
        phq9=_phq9_scores(resources),
        antidepressants=antidepressant_ingredients(resources),
    )


@dataclass
class Candidate:
    path: Path
    patient_id: str  # Synthea's
    summary: Summary


def is_candidate(summary: Summary) -> bool:
    """Alive adult with a major depressive disorder diagnosis and a PHQ-9 inside the kept window."""
    return (
        summary.alive
        and summary.age is not None
        and summary.age >= ADULT_AGE
        and summary.has_mdd
        and bool(summary.phq9)
    )


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Patients on antidepressants first, then by Synthea patient id (deterministic for a seed)."""
    return sorted(candidates, key=lambda candidate: (not candidate.summary.antidepressants, candidate.patient_id))


# ------------------------------------------------------------------ conversion


@dataclass
class Converted:
    """A trimmed record with sandbox ids: entries in output order and the id map used for them."""

    prefix: str
    resources: list[JSON]
    ids: dict[tuple[str, str], str]

    def ref(self, key: tuple[str, str]) -> str:
        return f"{key[0]}/{self.ids[key]}"


def convert_record(record: SyntheaRecord, prefix: str, cutoff: date) -> Converted:
    """Trim one record and rewrite its ids and references; Synthea's Coverages are dropped (sandbox adds its own)."""
    kept = select_keys(record, cutoff)
    ids: dict[tuple[str, str], str] = {}
    for key in sorted(kept):
        new_id = f"{prefix}-{short_hash(f'{key[0]}/{key[1]}')}"
        if new_id in ids.values():
            raise ValueError(f"{record.path.name}: id collision on {new_id}; lengthen the hash")
        ids[key] = new_id

    def resolve(reference: str) -> str | None:
        if reference.startswith("#"):
            return reference
        key = record.resolve(reference)
        return f"{key[0]}/{ids[key]}" if key in ids else None

    order = {kind: position for position, kind in enumerate(TYPE_ORDER)}
    ordered = sorted(kept, key=lambda key: (order.get(key[0], len(order)), record.sources[key].index))
    resources = []
    for key in ordered:
        resource = rewrite_references(record.sources[key].resource, resolve)
        resource["id"] = ids[key]
        resources.append({"resourceType": resource.pop("resourceType"), "id": resource.pop("id"), **resource})
    return Converted(prefix, resources, ids)


def _latest(resources: Iterable[JSON], predicate: Callable[[JSON], bool]) -> JSON | None:
    best: tuple[date, int] | None = None
    chosen = None
    for position, resource in enumerate(resources):
        if not predicate(resource):
            continue
        day = resource_day(resource) or date.min
        if best is None or (day, position) > best:
            best, chosen = (day, position), resource
    return chosen


def latest_weight_kg(resources: list[JSON]) -> float | None:
    """The most recent body weight in kg (Synthea records kg; pounds are converted)."""
    observation = _latest(
        resources,
        lambda r: r["resourceType"] == "Observation" and BODY_WEIGHT in _codes(r.get("code"), LOINC),
    )
    quantity = (observation or {}).get("valueQuantity") or {}
    value = quantity.get("value")
    if not isinstance(value, (int, float)):
        return None
    unit = str(quantity.get("code") or quantity.get("unit") or "kg")
    return float(value) * 0.45359237 if unit in ("[lb_av]", "lb", "lbs") else float(value)


def choose_requester(resources: list[JSON]) -> str:
    """The practitioner of the most recent encounter with one (the clinician who knows the patient)."""
    practitioners = {f"Practitioner/{r['id']}" for r in resources if r["resourceType"] == "Practitioner"}

    def has_practitioner(resource: JSON) -> bool:
        if resource["resourceType"] != "Encounter":
            return False
        return any(ref in practitioners for ref in iter_references(resource.get("participant")))

    encounter = _latest(resources, has_practitioner)
    if encounter is not None:
        return next(ref for ref in iter_references(encounter.get("participant")) if ref in practitioners)
    if practitioners:
        return sorted(practitioners)[0]
    raise ValueError("no Practitioner kept in the record: cannot name the ordering clinician")


def _round(value: float, places: str = "0.1") -> float:
    return float(Decimal(repr(value)).quantize(Decimal(places), rounding=ROUND_HALF_UP))


def ketamine_order(order_id: str, patient_ref: str, requester: str, reason: str | None, weight: float | None) -> JSON:
    """Draft IV ketamine MedicationRequest, 0.5 mg/kg from the latest weight (MGB policy 031 story)."""
    if weight is not None:
        dose_mg = _round(0.5 * weight)
        text = f"0.5 mg/kg x {_round(weight)} kg (latest recorded weight) = {dose_mg} mg IV over 40 minutes"
        dose = {"value": dose_mg, "unit": "mg", "system": UCUM, "code": "mg"}
    else:
        text = "0.5 mg/kg IV over 40 minutes (no recorded weight)"
        dose = {"value": 0.5, "unit": "mg/kg", "system": UCUM, "code": "mg/kg"}
    order: JSON = {
        "resourceType": "MedicationRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": "238082", "display": "ketamine 10 MG/ML Injectable Solution"}],
            "text": "ketamine 10 mg/mL injection",
        },
        "subject": {"reference": patient_ref},
        "authoredOn": "",
        "requester": {"reference": requester},
    }
    if reason:
        order["reasonReference"] = [{"reference": reason}]
    order["dosageInstruction"] = [
        {
            "text": text + ", twice weekly for 4 weeks",
            "timing": {"repeat": {"count": 8, "frequency": 2, "period": 1, "periodUnit": "wk"}},
            "route": {"coding": [{"system": SNOMED, "code": "47625008", "display": "Intravenous route"}]},
            "doseAndRate": [{"doseQuantity": dose}],
        }
    ]
    return order


def psychotherapy_order(order_id: str, patient_ref: str, requester: str, reason: str | None) -> JSON:
    """Draft ServiceRequest for a 60-minute integration psychotherapy session (U of U policy MP-054 story)."""
    order: JSON = {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "category": [{"coding": [{"system": SNOMED, "code": "409063005", "display": "Counseling"}]}],
        "code": {
            "coding": [{"system": CPT, "code": "90837", "display": "Psychotherapy, 60 minutes with patient"}],
            "text": "Ketamine-assisted psychotherapy: integration psychotherapy session, 60 minutes",
        },
        "subject": {"reference": patient_ref},
        "authoredOn": "",
        "requester": {"reference": requester},
    }
    if reason:
        order["reasonReference"] = [{"reference": reason}]
    return order


def sandbox_coverage(prefix: str, patient_ref: str, payer: Payer, reference_date: date) -> JSON:
    """The one active Coverage that routes a background patient to one sandbox payer."""
    return {
        "resourceType": "Coverage",
        "id": f"{prefix}-coverage",
        "status": "active",
        "type": {"coding": [dict(SOPT_PRIVATE)]},
        "subscriberId": f"{prefix.upper()}-{payer.identifier_value}",
        "beneficiary": {"reference": patient_ref},
        "relationship": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship", "code": "self"}]
        },
        "period": {"start": date(reference_date.year - 1, 1, 1).isoformat()},
        "payor": [{"reference": f"Organization/{payer.organization_id}", "display": payer.name}],
        "class": [
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "plan"}]
                },
                "value": "commercial",
                "name": payer.plan_name,
            }
        ],
    }


def describe(summary: Summary, seed: int | None, reference_date: date, max_years: int) -> str:
    """Generator provenance and a one-line clinical summary, so a reader can pick a patient without opening it."""
    settings = f"seed {seed}, " if seed is not None else ""
    onset = summary.mdd_onset.year if summary.mdd_onset else "unknown"
    drugs = ", ".join(summary.antidepressants) or "none"
    latest = summary.latest_phq9
    phq = f"latest PHQ-9 {_round(latest[1])} ({latest[0].isoformat()})" if latest else "no PHQ-9"
    return (
        f"Generated by {GENERATOR} ({settings}reference date {reference_date.isoformat()}), trimmed by "
        f"sandbox/synthea_import.py to {max_years} years of dated data; {summary.age}-year-old {summary.gender}, "
        f"depression onset {onset}, {len(summary.antidepressants)} antidepressant(s) ({drugs}), {phq}."
    )


def build_scenario(
    record: SyntheaRecord,
    number: int,
    reference_date: date,
    max_years: int,
    seed: int | None = None,
) -> JSON:
    """The scenario file for background patient `number` (1-based)."""
    scenario_id = f"bg-{number:02d}"
    payer = PAYERS[(number - 1) % len(PAYERS)]
    converted = convert_record(record, scenario_id, _years_before(reference_date, max_years))
    patient = converted.resources[0]
    patient_ref = f"Patient/{patient['id']}"
    summary = summarize(converted.resources, reference_date)
    requester = choose_requester(converted.resources)
    mdd = _latest(
        converted.resources,
        lambda r: r["resourceType"] == "Condition" and bool(set(_codes(r.get("code"), SNOMED)) & MDD_CODES),
    )
    reason = f"Condition/{mdd['id']}" if mdd else None
    if payer is MGB:
        order = ketamine_order(
            f"{scenario_id}-ketamine-iv", patient_ref, requester, reason, latest_weight_kg(converted.resources)
        )
    else:
        order = psychotherapy_order(f"{scenario_id}-kap-90837", patient_ref, requester, reason)
    order["authoredOn"] = reference_date.isoformat()

    extra = [payer_organization(p) for p in PAYERS] + [
        sandbox_coverage(scenario_id, patient_ref, payer, reference_date)
    ]
    resources = [patient, *extra[:2], *converted.resources[1:], extra[2]]
    order_rank = {kind: position for position, kind in enumerate(TYPE_ORDER)}
    resources = sorted(resources, key=lambda r: order_rank.get(r["resourceType"], len(order_rank)))  # stable
    entries = [
        {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}
        for resource in resources
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    check_references(bundle)
    label = "MGB commercial" if payer is MGB else "U of U commercial"
    return {
        "id": scenario_id,
        "title": f"Synthea background patient {number} ({label})",
        "description": describe(summary, seed, reference_date, max_years),
        "anchor_date": reference_date.isoformat(),
        "patient_id": patient["id"],
        "user_id": requester,
        "encounter_id": None,
        "draft_orders": [order],
        "expected": [],
        "expect_no_cards": False,
        "background": True,
        "tags": ["synthea", payer.key],
        "bundle": bundle,
    }


def dangling_references(bundle: JSON) -> list[str]:
    """References in the bundle that point at no entry (`Type/id`) and no contained resource (`#id`)."""
    written = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    problems = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        contained = {f"#{c.get('id')}" for c in resource.get("contained") or [] if isinstance(c, dict)}
        for reference in iter_references(resource):
            if reference not in written and reference not in contained:
                problems.append(f"{resource['resourceType']}/{resource['id']} -> {reference}")
    return problems


def check_references(bundle: JSON) -> None:
    problems = dangling_references(bundle)
    if problems:
        raise ValueError(f"{len(problems)} dangling reference(s), first: {problems[0]}")


def dump(scenario: JSON) -> str:
    """Stable text: header and draft orders indented, one bundle entry per line (small files, per-resource diffs)."""
    parts = []
    for key, value in scenario.items():
        if key == "bundle":
            head = json.dumps({k: v for k, v in value.items() if k != "entry"}, ensure_ascii=False)[:-1]
            lines = ",\n".join("  " + json.dumps(entry, ensure_ascii=False) for entry in value["entry"])
            text = f'{head}, "entry": [\n{lines}\n ]}}'
        else:
            text = json.dumps(value, indent=1, ensure_ascii=False).replace("\n", "\n ")
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


# ------------------------------------------------------------------ the whole run


def import_population(
    input_dir: Path,
    output_dir: Path,
    reference_date: date,
    max_years: int = DEFAULT_MAX_YEARS,
    select: int = DEFAULT_SELECT,
    seed: int | None = None,
) -> list[Path]:
    """Select up to `select` patients from a Synthea output folder and write bg-NN.json files; returns the paths.

    Earlier bg-NN.json files in output_dir are removed first, so a smaller selection leaves no stale patients.
    """
    cutoff = _years_before(reference_date, max_years)
    patient_files, shared_files = find_bundles(input_dir)
    shared = load_shared(shared_files)
    candidates: list[Candidate] = []
    for path in patient_files:
        record = load_record(path, shared)
        if record is None:
            continue
        kept = select_keys(record, cutoff)
        summary = summarize([record.sources[key].resource for key in kept], reference_date)
        if is_candidate(summary):
            candidates.append(Candidate(path, str(record.patient["id"]), summary))
    chosen = rank(candidates)[:select]
    log.info(
        "%d patient bundle(s), %d candidate(s) (alive adult, MDD, PHQ-9 since %s), %d selected",
        len(patient_files),
        len(candidates),
        cutoff.isoformat(),
        len(chosen),
    )
    if len(chosen) < select:
        log.warning("only %d of the %d requested patients qualify; generate a larger population", len(chosen), select)

    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob("bg-*.json"):
        if re.fullmatch(r"bg-\d+\.json", stale.name):
            stale.unlink()
    written = []
    for number, candidate in enumerate(chosen, start=1):
        record = load_record(candidate.path, shared)
        assert record is not None
        scenario = build_scenario(record, number, reference_date, max_years, seed)
        target = output_dir / f"{scenario['id']}.json"
        target.write_text(dump(scenario), encoding="utf-8")
        written.append(target)
        log.info(
            "%s: %d entries, %.0f KB, tags %s",
            target.name,
            len(scenario["bundle"]["entry"]),
            target.stat().st_size / 1024,
            ",".join(scenario["tags"]),
        )
    return written


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox.synthea_import",
        description="Convert Synthea FHIR R4 patient bundles into sandbox background scenario files.",
    )
    parser.add_argument("--input", required=True, type=Path, help="Synthea output folder (the one holding fhir/)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder for bg-NN.json files")
    parser.add_argument(
        "--reference-date",
        required=True,
        type=date.fromisoformat,
        help="Synthea's reference date (YYYY-MM-DD); becomes each scenario's anchor_date",
    )
    parser.add_argument("--max-years", type=int, default=DEFAULT_MAX_YEARS, help="years of dated data to keep")
    parser.add_argument("--select", type=int, default=DEFAULT_SELECT, help="number of patients to write")
    parser.add_argument("--seed", type=int, default=None, help="Synthea seed used, recorded in descriptions only")
    args = parser.parse_args(argv)
    if args.max_years < 1 or args.select < 1:
        parser.error("--max-years and --select must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    written = import_population(args.input, args.output, args.reference_date, args.max_years, args.select, args.seed)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
