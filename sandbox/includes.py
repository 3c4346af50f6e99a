"""`_include` / `_revinclude` (and `:iterate`) of a prefetch search, assembled the way a conformant FHIR server does.

sekmet-fhir answers `_include` but ignores `:iterate` and `_revinclude`; the EHR simulator plays a conformant EHR,
so it completes the Bundle itself: for each include parameter of the query it adds the referenced resources (read
by id), for `_revinclude=PractitionerRole:practitioner` every role that references a Practitioner in the Bundle
(searched), iterating until nothing new arrives. The service never relies on this: it uses what prefetch holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# search parameter (`Type:param`) -> the element path whose References it follows (FHIR R4 search parameters).
INCLUDE_PATHS: dict[str, tuple[str, ...]] = {
    "Coverage:payor": ("payor",),
    "Encounter:participant": ("participant", "individual"),
    "Encounter:service-provider": ("serviceProvider",),
    "Encounter:location": ("location", "location"),
    "Procedure:performer": ("performer", "actor"),
    "Procedure:location": ("location",),
    "CareTeam:participant": ("participant", "member"),
    "Observation:performer": ("performer",),
    "MedicationRequest:medication": ("medicationReference",),
    "MedicationStatement:medication": ("medicationReference",),
    "MedicationDispense:medication": ("medicationReference",),
    "MedicationAdministration:medication": ("medicationReference",),
    "MedicationAdministration:performer": ("performer", "actor"),
    "PractitionerRole:practitioner": ("practitioner",),
    "PractitionerRole:organization": ("organization",),
    "PractitionerRole:location": ("location",),
    "Location:organization": ("managingOrganization",),
}
# `_revinclude` parameters the simulator can assemble: target type -> (search, the referencing search parameter).
REVINCLUDES: dict[str, tuple[str, str]] = {"PractitionerRole:practitioner": ("Practitioner", "practitioner")}
MAX_ITERATIONS = 5

Read = Callable[[str], Any]  # relative URL -> JSON (a resource or a Bundle) or None


def _references(node: Any, path: tuple[str, ...]) -> Iterator[str]:
    if not path:
        reference = node.get("reference") if isinstance(node, dict) else None
        if isinstance(reference, str):
            yield reference
        return
    value = node.get(path[0]) if isinstance(node, dict) else None
    for item in value if isinstance(value, list) else [value]:
        yield from _references(item, path[1:])


def _key(resource: Any) -> str | None:
    if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str) and resource.get("id"):
        return f"{resource['resourceType']}/{resource['id']}"
    return None


def complete_includes(bundle: dict[str, Any], query: str, read: Read, base_url: str) -> dict[str, Any]:
    """The Bundle with every resource its query's include parameters name (search mode `include`), in place."""
    params = parse_qsl(urlsplit(query).query)
    includes = [(name.endswith(":iterate"), value) for name, value in params if name.split(":")[0] == "_include"]
    revincludes = [(name.endswith(":iterate"), value) for name, value in params if name.split(":")[0] == "_revinclude"]
    includes = [(iterate, value) for iterate, value in includes if value in INCLUDE_PATHS]
    revincludes = [(iterate, value) for iterate, value in revincludes if value in REVINCLUDES]
    if not includes and not revincludes:
        return bundle
    entries = bundle.setdefault("entry", [])
    have = {_key(e.get("resource")) for e in entries if isinstance(e, dict)}
    prefix = base_url.rstrip("/") + "/"

    def add(resource: Any) -> dict[str, Any] | None:
        key = _key(resource)
        if key is None or key in have:
            return None
        have.add(key)
        entries.append({"fullUrl": prefix + key, "resource": resource, "search": {"mode": "include"}})
        return resource

    matches = [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
    new: list[dict[str, Any]] = list(matches)
    for iteration in range(MAX_ITERATIONS):
        added: list[dict[str, Any]] = []
        for iterate, parameter in includes:
            if iteration and not iterate:
                continue
            source_type = parameter.split(":")[0]
            for resource in new if iterate else matches:
                if resource.get("resourceType") != source_type:
                    continue
                for reference in _references(resource, INCLUDE_PATHS[parameter]):
                    relative = reference[len(prefix) :] if reference.startswith(prefix) else reference
                    if "://" in relative or relative.startswith("#") or relative.count("/") != 1 or relative in have:
                        continue
                    resource_read = read(relative)
                    if add(resource_read) is not None:
                        added.append(resource_read)
        for iterate, parameter in revincludes:
            if iteration and not iterate:
                continue
            target_type, search_parameter = REVINCLUDES[parameter]
            source = parameter.split(":")[0]
            for resource in new if iterate else matches:
                if resource.get("resourceType") != target_type:
                    continue
                found = read(f"{source}?{search_parameter}={resource['id']}")
                for entry in (found or {}).get("entry", []) if isinstance(found, dict) else []:
                    if isinstance(entry, dict) and add(entry.get("resource")) is not None:
                        added.append(entry["resource"])
        if not added:
            break
        new = added
    return bundle
