"""Where a cohort comes from: a folder of patient Bundles, an NDJSON bulk-export folder, or a FHIR server.

Patients are listed cheaply (`list_patients`) and read one at a time (`read_patient`), so worker processes can
read and evaluate in parallel. A FHIR server is read the way the service reads one: each prefetch query of
the mapping set for the patient (following `next` links), then the references its facts follow
(practitioners and their roles, organizations, locations, medications), in two rounds.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from fhir_mappings.mappings import Mappings
from fhir_mappings.record import reference_key
from fhir_mappings.tools.records import InputError, PatientInput, from_document

Resource = dict[str, Any]
_PATIENT_KEYS = ("subject", "patient", "beneficiary", "for")
_REFERENCED = ("Practitioner", "PractitionerRole", "Organization", "Location", "Medication")
MAX_PAGES = 10


class CohortError(ValueError):
    """The cohort source cannot be read (missing folder, unreachable server, ...)."""


@dataclass(frozen=True)
class PatientRef:
    """Enough to read one patient again in a worker process."""

    source: str  # folder path or FHIR base URL
    kind: str  # "bundle" | "ndjson" | "fhir"
    key: str  # file path (bundle) or patient id (ndjson, fhir)
    patient_id: str | None = None


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _patient_of(resource: Mapping[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        return str(resource.get("id"))
    for key in _PATIENT_KEYS:
        ref = resource.get(key)
        ref = ref.get("reference") if isinstance(ref, Mapping) else None
        if isinstance(ref, str):
            found = reference_key(ref)
            if found and found.startswith("Patient/"):
                return found.split("/", 1)[1]
    return None


def _ndjson_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.ndjson"), *folder.glob("*.ndjson.gz")])


def _read_ndjson(path: Path) -> Iterator[Resource]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                resource = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CohortError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
            if isinstance(resource, dict):
                yield resource


def list_patients(source: str, *, fhir_token: str | None = None, max_patients: int | None = None) -> list[PatientRef]:
    if is_url(source):
        return _list_fhir(source.rstrip("/"), fhir_token, max_patients)
    folder = Path(source)
    if folder.is_file():
        return [PatientRef(str(folder.parent), "bundle", str(folder))]
    if not folder.is_dir():
        raise CohortError(f"{source}: no such folder (give a folder of Bundles, an NDJSON export or a FHIR base URL)")
    ndjson = _ndjson_files(folder)
    if ndjson:
        ids = [str(r.get("id")) for p in ndjson for r in _read_ndjson(p) if r.get("resourceType") == "Patient"]
        return [PatientRef(source, "ndjson", pid, pid) for pid in sorted(set(ids))[:max_patients]]
    refs = []
    for path in sorted(folder.rglob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        bundle = doc.get("bundle") if isinstance(doc, dict) and "bundle" in doc else doc
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            continue
        patients = [
            e["resource"]["id"]
            for e in bundle.get("entry") or []
            if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == "Patient"
        ]
        for pid in patients if len(patients) > 1 else [None]:
            refs.append(PatientRef(source, "bundle", str(path), pid))
    return refs[:max_patients] if max_patients else refs


_NDJSON_CACHE: dict[str, tuple[dict[str, list[Resource]], list[Resource]]] = {}


def _ndjson_index(folder: str) -> tuple[dict[str, list[Resource]], list[Resource]]:
    """Resources of an export grouped by patient, plus those of no patient (practitioners, organizations...)."""
    if folder not in _NDJSON_CACHE:
        by_patient: dict[str, list[Resource]] = {}
        shared: list[Resource] = []
        for path in _ndjson_files(Path(folder)):
            for resource in _read_ndjson(path):
                owner = _patient_of(resource)
                (by_patient.setdefault(owner, []) if owner else shared).append(resource)
        _NDJSON_CACHE[folder] = (by_patient, shared)
    return _NDJSON_CACHE[folder]


def read_patient(ref: PatientRef, mappings: Mappings, *, fhir_token: str | None = None) -> PatientInput:
    if ref.kind == "bundle":
        try:
            doc = json.loads(Path(ref.key).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{ref.key}: cannot read: {exc}") from None
        if ref.patient_id is not None:
            doc = _only_patient(doc, ref.patient_id)
        patient = from_document(doc, ref.key, ref.patient_id)
        patient.label = patient.label if patient.label != Path(ref.key).stem or not ref.patient_id else ref.patient_id
        return patient
    if ref.kind == "ndjson":
        by_patient, shared = _ndjson_index(ref.source)
        resources = [*by_patient.get(ref.key, []), *shared]
        return from_document(resources, f"{ref.source} (Patient/{ref.key})", ref.key)
    resources = _fetch_patient(ref.source, ref.key, mappings, fhir_token)
    return from_document(resources, f"{ref.source}/Patient/{ref.key}", ref.key)


def _only_patient(doc: Any, patient_id: str) -> Any:
    """A multi-patient Bundle reduced to one patient's resources (plus those belonging to no patient)."""
    bundle = doc.get("bundle") if isinstance(doc, dict) and "bundle" in doc else doc
    entries = [
        e
        for e in bundle.get("entry") or []
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and _patient_of(e["resource"]) in (patient_id, None)
    ]
    return {**bundle, "entry": entries}


# --- FHIR server ---------------------------------------------------------------------------------------------
def _session(token: str | None) -> requests.Session:
    session = requests.Session()
    session.headers["Accept"] = "application/fhir+json"
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def _get(session: requests.Session, url: str) -> Any:
    try:
        response = session.get(url, timeout=30)
    except requests.RequestException as exc:
        raise CohortError(f"{url.split('?')[0]}: {type(exc).__name__}") from None
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise CohortError(f"{url.split('?')[0]}: HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError:
        raise CohortError(f"{url.split('?')[0]}: not JSON") from None


def _search(session: requests.Session, base: str, relative: str) -> list[Resource]:
    url: str | None = f"{base}/{relative}"
    found: list[Resource] = []
    for _ in range(MAX_PAGES):
        if url is None:
            break
        body = _get(session, url)
        if not isinstance(body, dict):
            break
        if body.get("resourceType") != "Bundle":
            found.append(body)
            break
        found.extend(
            e["resource"]
            for e in body.get("entry") or []
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        )
        url = next((link.get("url") for link in body.get("link") or [] if link.get("relation") == "next"), None)
    return found


def _list_fhir(base: str, token: str | None, max_patients: int | None) -> list[PatientRef]:
    session = _session(token)
    ids: list[str] = []
    url: str | None = f"{base}/Patient?_count=100&_elements=id"
    while url and (max_patients is None or len(ids) < max_patients):
        body = _get(session, url)
        if not isinstance(body, dict):
            break
        ids += [str(e["resource"]["id"]) for e in body.get("entry") or [] if isinstance(e.get("resource"), dict)]
        url = next((link.get("url") for link in body.get("link") or [] if link.get("relation") == "next"), None)
    return [PatientRef(base, "fhir", pid, pid) for pid in ids[:max_patients]]


def _references(node: Any, out: set[str]) -> set[str]:
    if isinstance(node, Mapping):
        ref = node.get("reference")
        if isinstance(ref, str):
            key = reference_key(ref)
            if key and key.split("/")[0] in _REFERENCED:
                out.add(key)
        for value in node.values():
            _references(value, out)
    elif isinstance(node, list):
        for value in node:
            _references(value, out)
    return out


def _fetch_patient(base: str, patient_id: str, mappings: Mappings, token: str | None) -> list[Resource]:
    session = _session(token)
    resources: dict[str, Resource] = {}
    for query in mappings.queries.queries.values():
        relative = query.render({"patientId": patient_id})
        if relative is None:
            continue
        for resource in _search(session, base, relative):
            resources.setdefault(f"{resource.get('resourceType')}/{resource.get('id')}", resource)
    for _round in range(2):
        wanted = set()
        for resource in list(resources.values()):
            _references(resource, wanted)
        missing = sorted(k for k in wanted if k not in resources)
        by_type: dict[str, list[str]] = {}
        for key in missing:
            rtype, rid = key.split("/", 1)
            by_type.setdefault(rtype, []).append(rid)
        for rtype, ids in by_type.items():
            for i in range(0, len(ids), 50):
                for resource in _search(session, base, f"{rtype}?_id={','.join(ids[i : i + 50])}"):
                    resources.setdefault(f"{resource.get('resourceType')}/{resource.get('id')}", resource)
        practitioners = [k.split("/", 1)[1] for k in resources if k.startswith("Practitioner/")]
        for i in range(0, len(practitioners), 50):
            chunk = ",".join(practitioners[i : i + 50])
            for resource in _search(session, base, f"PractitionerRole?practitioner={chunk}"):
                resources.setdefault(f"{resource.get('resourceType')}/{resource.get('id')}", resource)
    return list(resources.values())
