"""Every server-side check Inferno's CRD test kit (v0.13.0, CRD 2.0.1) makes on an order-sign response, and more.

Inferno tests 8 and 9 (response, cards, links, suggestions, actions), 13 and 14 (coverage-information system
actions: type update, valid extension incl. invariants crd-ci-q1..q5, one coverage-assertion-id per coverage),
plus what Inferno leaves to the Java validator or does not test: each created/updated resource validates with
fhir.resources R4B and carries what the CRD order profiles require; CRD 2.2 invariants q6/q8 and the codes
2.2 removed or added are flagged so a response stays valid for both versions; CDS Hooks' "omit attributes
without a value"; card and suggestion uuids (feedback correlation); house rules: no raw HTML in `detail`,
detail under 6 KB. Each problem is one line starting with the JSON path it concerns.

`crd_version="2.2"` checks a CRD 2.2 response instead (CoverageInformation*.fsh at 2.2.1): the 2.2 value sets
(indeterminate, patient, detail-code), 2.2 cardinalities (doc-needed 0..*, expiry-date 0..1), the removed
`response` sub-extension and `both` code, `detail` with its category/code/value/qualification, `contact` as
ContactDetail, every invariant crd-ci-q1..q9 as its FHIRPath expression states it (q3 also the other way, as its
description says), resp-43 (a technical reason carries text), the 2.2 card-type system, and hook-16 for a
no-policy card that names a Coverage. `discovery_problems` checks a discovery document's CRD extensions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from cards.card import ASSOCIATED_RESOURCE, DECISION_EXTENSION, DETAIL_MAX_BYTES
from cards.config import CARD_TYPE_SYSTEMS, CRD_2_0, CRD_2_2, CRD_VERSIONS, HOOK_13_REASONS, TOPIC_DISPLAY
from cards.coverage import COVERAGE_INFORMATION_URL, CRD_TEMP_SYSTEM, order_index

INDICATORS = {"info", "warning", "critical"}
ACTION_TYPES = {"create", "update", "delete"}
SELECTION_BEHAVIORS = {"at-most-one", "any"}
LINK_TYPES = {"absolute", "smart"}
ORDER_TYPES = {"DeviceRequest", "MedicationRequest", "NutritionOrder", "ServiceRequest", "VisionPrescription"}

# CRD 2.0.1 ext-coverage-information (input/fsh/extensions/CoverageInformation.fsh @2.0.1)
CI_CODES = {
    "covered": {"covered", "not-covered", "conditional"},
    "pa-needed": {"no-auth", "auth-needed", "satisfied", "performpa", "conditional"},
    "doc-needed": {"clinical", "admin", "both", "conditional"},
    "doc-purpose": {"withpa", "withclaim", "withorder", "retain-doc", "OTH"},
    "info-needed": {"performer", "location", "timeframe", "contract-window", "OTH"},
}
CI_ONLY_22 = {"indeterminate", "patient", "detail-code"}  # codes added in CRD 2.2
CI_REMOVED_22 = {"both"}  # doc-needed code removed in CRD 2.2
CI_VALUE = {
    "coverage": "valueReference",
    "covered": "valueCode",
    "pa-needed": "valueCode",
    "doc-needed": "valueCode",
    "doc-purpose": "valueCode",
    "info-needed": "valueCode",
    "billingCode": "valueCoding",
    "reason": "valueCodeableConcept",
    "dependency": "valueReference",
    "questionnaire": "valueCanonical",
    "date": "valueDate",
    "coverage-assertion-id": "valueString",
    "satisfied-pa-id": "valueString",
}
CI_NOT_PORTABLE = {"detail", "contact", "response"}  # shape differs or removed between 2.0.1 and 2.2
CI_CARDINALITY = {"coverage": (1, 1), "covered": (1, 1), "pa-needed": (0, 1), "doc-needed": (0, 1), "date": (1, 1)}
CI_CARDINALITY |= {"coverage-assertion-id": (1, 1), "satisfied-pa-id": (0, 1)}

# CRD 2.2.1 ext-coverage-information (CoverageInformation.fsh, CoverageInformationValuesets.fsh; required bindings)
CI_CODES_22 = {
    "covered": {"not-covered", "covered", "conditional", "indeterminate"},
    "pa-needed": {"no-auth", "auth-needed", "satisfied", "performpa", "conditional", "indeterminate"},
    "doc-needed": {"clinical", "admin", "patient", "conditional", "indeterminate"},
    "doc-purpose": {"withpa", "withclaim", "withorder", "retain-doc", "OTH"},
    "info-needed": {"performer", "location", "timeframe", "contract-window", "detail-code", "OTH"},
}
CI_VALUE_22 = {
    **{k: v for k, v in CI_VALUE.items()},
    "contact": "valueContactDetail",
    "expiry-date": "valueDate",
}
CI_REMOVED_IN_22 = {"response"}  # sub-extension dropped in 2.1 (FHIR-46460)
CI_CARDINALITY_22 = {k: v for k, v in CI_CARDINALITY.items() if k != "doc-needed"} | {"expiry-date": (0, 1)}
# ValueSet coverageAssertionReasons (extensible; crd-ci-q7: a coding outside it needs text)
ASSERTION_REASONS_22 = {
    (CRD_TEMP_SYSTEM, code)
    for code in ("gold-card", "no-member-found", "no-active-coverage", "coverage-not-found", "auth-out-network")
} | {(CRD_TEMP_SYSTEM, "technical")}
DETAIL_CATEGORIES_22 = {"cat-limitation", "cat-decisional", "cat-other"}
DETAIL_VALUES_22 = {"valueBoolean", "valueString", "valueUrl", "valueQuantity", "valuePeriod"}
# crdver-1 reads ^[1-9]\d*\.[1-9]\d*$, which would refuse "2.0" — the very example deviations.md gives ("i.e. 2.0,
# not 2.0.0 or 2.0.1"); the prose wins: major.minor, minor 0 allowed.
_CRD_VERSION = re.compile(r"^[1-9]\d*\.(0|[1-9]\d*)$")

# What the CRD 2.0.1 order profiles (and the US Core profiles under them) require of a request resource.
PROFILE_REQUIRED = {
    "MedicationRequest": ("status", "intent", "medication[x]", "subject", "authoredOn", "requester"),
    "ServiceRequest": ("status", "intent", "code", "subject", "authoredOn", "requester"),
    "DeviceRequest": ("status", "intent", "code[x]", "subject", "authoredOn", "requester"),
}

_TYPE_ID = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
_URL = re.compile(r"^https?://[^/\s?#]+")
_DATE = re.compile(r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?)?$")
_RAW_HTML = re.compile(r"(?<!\\)<\s*[A-Za-z/!?]")


def conformance_problems(
    response: Mapping[str, Any], draft_orders: Sequence[dict] | None = None, *, crd_version: str = CRD_2_0
) -> list[str]:
    """Every problem found, one line each; an empty list means conformant to `crd_version` ("2.0" or "2.2").

    With `draft_orders`, also: update actions target draft orders and change nothing but coverage-information,
    card associated resources are draft orders, and every order a card reports a determination for (outcome
    other than no-policy, with a Coverage; in 2.2 also a no-policy card naming a Coverage) has exactly one
    coverage-information action — so pass `draft_orders` only for responses built with `coverage-info` enabled.
    """
    if crd_version not in CRD_VERSIONS:
        raise ValueError(f"CRD version {crd_version!r} is not one of {', '.join(CRD_VERSIONS)}")
    problems: list[str] = []
    if not isinstance(response, Mapping):
        return ["response: not a JSON object"]
    try:
        json.dumps(response, allow_nan=False)
    except (TypeError, ValueError) as exc:
        problems.append(f"response: not serializable as JSON ({type(exc).__name__})")
    cards = response.get("cards")
    if not isinstance(cards, list):
        problems.append("cards: required array missing")
        cards = []
    actions = response.get("systemActions")
    if "systemActions" not in response:
        problems.append("systemActions: required on order-sign responses (Inferno CRD test 8)")
        actions = []
    elif not isinstance(actions, list):
        problems.append("systemActions: must be an array")
        actions = []
    for key, value in response.items():
        if key not in ("cards", "systemActions"):
            _empty_values(value, key, problems)
    for i, card in enumerate(cards):
        _empty_values(card, f"cards[{i}]", problems)
    for i, action in enumerate(actions):
        _empty_values(action, f"systemActions[{i}]", problems)

    uuids: dict[str, str] = {}
    for i, card in enumerate(cards):
        _card(card, f"cards[{i}]", problems, uuids, crd_version)
    for i, action in enumerate(actions):
        _action(action, f"systemActions[{i}]", problems)
    index = order_index(draft_orders) if draft_orders is not None else None
    _coverage_actions(actions, problems, index, crd_version)
    if index is not None:
        _cards_vs_orders(cards, actions, index, problems, crd_version)
    return problems


# ------------------------------------------------------------------------------------------------- generic


# Our own extension specifies `criteria[].evidence` as an array that is empty when a criterion rests on no
# resource (e.g. an exclusion with nothing on record): CDS Hooks allows empties where a spec says so.
_SPECIFIED_EMPTY = re.compile(r"\.extension\.ketamine-cds\.decision\.criteria\[\d+\]\.evidence$")


def _empty_values(value: Any, path: str, problems: list[str]) -> None:
    """CDS Hooks: "MUST omit" attributes without a value — no null, "", [] or {} anywhere (FHIR agrees)."""
    if value == [] and _SPECIFIED_EMPTY.search(path):
        return
    if value is None or value == "" or value == [] or value == {}:
        problems.append(f"{path}: empty value {value!r} (omit the attribute instead)")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _empty_values(item, f"{path}.{key}", problems)
    elif isinstance(value, list):
        for n, item in enumerate(value):
            _empty_values(item, f"{path}[{n}]", problems)


def _string(obj: Mapping[str, Any], key: str, path: str, problems: list[str], required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            problems.append(f"{path}.{key}: required string missing")
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{path}.{key}: must be a non-empty string")
        return None
    return value


def fhir_problems(resource: Any, path: str) -> list[str]:
    """fhir.resources R4B validation of one resource (the first few errors, PHI-free: locations and types)."""
    if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str):
        return [f"{path}: not a FHIR resource (object with resourceType)"]
    from fhir.resources.R4B import get_fhir_model_class  # imported lazily: only tests and tools pay for it

    try:
        model = get_fhir_model_class(resource["resourceType"])
    except (KeyError, ValueError):
        return [f"{path}: unknown FHIR R4 resourceType {resource['resourceType']!r}"]
    try:
        model.model_validate(dict(resource))
    except ValidationError as exc:
        return [
            f"{path}: R4B validation: {'.'.join(str(p) for p in err['loc']) or '(resource)'}: {err['msg'][:160]}"
            for err in exc.errors()[:5]
        ]
    except (TypeError, ValueError) as exc:
        return [f"{path}: R4B validation: {type(exc).__name__}"]
    return []


def _profile_problems(resource: Mapping[str, Any], path: str) -> list[str]:
    """Elements the CRD 2.0.1 order profiles require (Inferno validates against them; R4B alone does not)."""
    problems: list[str] = []
    rtype = resource.get("resourceType")
    if not resource.get("id"):
        problems.append(f"{path}.id: CRD request resources SHALL have an id")
    for element in PROFILE_REQUIRED.get(str(rtype), ()):
        if element.endswith("[x]"):
            stem = element[:-3]
            if not any(k.startswith(stem) and k[len(stem) : len(stem) + 1].isupper() for k in resource):
                problems.append(f"{path}.{element}: required by the CRD {rtype} profile")
        elif not resource.get(element):
            problems.append(f"{path}.{element}: required by the CRD {rtype} profile")
    if rtype in PROFILE_REQUIRED and resource.get("status") not in (None, "draft"):
        problems.append(f"{path}.status: CRD 2.0.1 order profiles fix status to 'draft'")
    return problems


# --------------------------------------------------------------------------------------------------- cards


def _card(card: Any, path: str, problems: list[str], uuids: dict[str, str], crd_version: str) -> None:
    if not isinstance(card, Mapping):
        problems.append(f"{path}: card must be an object")
        return
    summary = _string(card, "summary", path, problems)
    if summary is not None and len(summary) >= 140:
        problems.append(f"{path}.summary: {len(summary)} characters; must be < 140")
    indicator = _string(card, "indicator", path, problems)
    if indicator is not None and indicator not in INDICATORS:
        problems.append(f"{path}.indicator: {indicator!r} is not info | warning | critical")
    _source(card.get("source"), f"{path}.source", problems, crd_version)

    uid = card.get("uuid")
    if uid is None:
        problems.append(f"{path}.uuid: missing (CRD 2.2: 1..1; feedback cannot be correlated without it)")
    elif not isinstance(uid, str) or not uid:
        problems.append(f"{path}.uuid: must be a non-empty string")
    elif uid in uuids:
        problems.append(f"{path}.uuid: same uuid as {uuids[uid]}")
    else:
        uuids[uid] = path

    if "detail" in card:
        detail = card["detail"]
        if not isinstance(detail, str):
            problems.append(f"{path}.detail: must be a string")
        else:
            if _RAW_HTML.search(detail):
                problems.append(f"{path}.detail: contains raw HTML (EHRs render markdown only)")
            if len(detail.encode()) > DETAIL_MAX_BYTES:
                problems.append(f"{path}.detail: {len(detail.encode())} bytes; keep it under {DETAIL_MAX_BYTES}")

    suggestions = card.get("suggestions")
    if suggestions is not None:
        if not isinstance(suggestions, list):
            problems.append(f"{path}.suggestions: must be an array")
        else:
            behavior = card.get("selectionBehavior")
            if behavior is None:
                problems.append(f"{path}.selectionBehavior: required when suggestions are present")
            elif behavior not in SELECTION_BEHAVIORS:
                problems.append(f"{path}.selectionBehavior: {behavior!r} is not at-most-one | any")
            for n, suggestion in enumerate(suggestions):
                _suggestion(suggestion, f"{path}.suggestions[{n}]", problems, uuids)

    reasons = card.get("overrideReasons")
    if reasons is not None:
        if not isinstance(reasons, list):
            problems.append(f"{path}.overrideReasons: must be an array")
        else:
            for n, reason in enumerate(reasons):
                rpath = f"{path}.overrideReasons[{n}]"
                if not isinstance(reason, Mapping):
                    problems.append(f"{rpath}: must be a Coding object")
                    continue
                for key in ("code", "system", "display"):
                    _string(reason, key, rpath, problems)

    links = card.get("links")
    if links is not None:
        if not isinstance(links, list):
            problems.append(f"{path}.links: must be an array")
        else:
            for n, link in enumerate(links):
                _link(link, f"{path}.links[{n}]", problems)

    extension = card.get("extension")
    if extension is not None:
        if not isinstance(extension, Mapping):
            problems.append(f"{path}.extension: must be an object")
        else:
            associated = extension.get(ASSOCIATED_RESOURCE)
            if associated is not None and (
                not isinstance(associated, list)
                or not all(isinstance(r, str) and _TYPE_ID.match(r) for r in associated)
            ):
                problems.append(f"{path}.extension.{ASSOCIATED_RESOURCE}: must be an array of 'Type/id' strings")


def _source(source: Any, path: str, problems: list[str], crd_version: str) -> None:
    if not isinstance(source, Mapping):
        problems.append(f"{path}: required object missing")
        return
    _string(source, "label", path, problems)
    for key in ("url", "icon"):
        value = _string(source, key, path, problems, required=False)
        if value is not None and not _URL.match(value):
            problems.append(f"{path}.{key}: must be an absolute http(s) URL")
    topic = source.get("topic")
    if not isinstance(topic, Mapping):
        problems.append(f"{path}.topic: required Coding missing (CRD SHALL; Inferno test 8)")
        return
    system = _string(topic, "system", f"{path}.topic", problems)
    code = _string(topic, "code", f"{path}.topic", problems)
    # A CRD card type in the other version's code system (the binding is extensible: other codes are fine).
    expected = CARD_TYPE_SYSTEMS[crd_version]
    if code in TOPIC_DISPLAY and system in CARD_TYPE_SYSTEMS.values() and system != expected:
        problems.append(f"{path}.topic.system: CRD {crd_version} card types are in {expected}")


def _link(link: Any, path: str, problems: list[str]) -> None:
    if not isinstance(link, Mapping):
        problems.append(f"{path}: must be an object")
        return
    _string(link, "label", path, problems)
    url = _string(link, "url", path, problems)
    if url is not None and not _URL.match(url):
        problems.append(f"{path}.url: must be an http(s) URL with a host")
    kind = _string(link, "type", path, problems)
    if kind is not None and kind not in LINK_TYPES:
        problems.append(f"{path}.type: {kind!r} is not absolute | smart")
    if kind == "absolute" and "appContext" in link:
        problems.append(f"{path}.appContext: only allowed on smart links")
    if "autolaunchable" in link and not isinstance(link["autolaunchable"], bool):
        problems.append(f"{path}.autolaunchable: must be a boolean")


def _suggestion(suggestion: Any, path: str, problems: list[str], uuids: dict[str, str]) -> None:
    if not isinstance(suggestion, Mapping):
        problems.append(f"{path}: must be an object")
        return
    _string(suggestion, "label", path, problems)
    uid = _string(suggestion, "uuid", path, problems)  # CRD: all suggestions SHALL have a uuid
    if uid is not None:
        if uid in uuids:
            problems.append(f"{path}.uuid: same uuid as {uuids[uid]}")
        uuids.setdefault(uid, path)
    if "isRecommended" in suggestion and not isinstance(suggestion["isRecommended"], bool):
        problems.append(f"{path}.isRecommended: must be a boolean")
    actions = suggestion.get("actions")
    if actions is not None:
        if not isinstance(actions, list) or not actions:
            problems.append(f"{path}.actions: must be a non-empty array")
            return
        for n, action in enumerate(actions):
            _action(action, f"{path}.actions[{n}]", problems)


# ------------------------------------------------------------------------------------------------- actions


def _action(action: Any, path: str, problems: list[str]) -> None:
    if not isinstance(action, Mapping):
        problems.append(f"{path}: action must be an object")
        return
    kind = _string(action, "type", path, problems)
    _string(action, "description", path, problems)
    if kind is not None and kind not in ACTION_TYPES:
        problems.append(f"{path}.type: {kind!r} is not create | update | delete")
    if kind in ("create", "update"):
        resource = action.get("resource")
        if resource is None:
            problems.append(f"{path}.resource: required for {kind}")
            return
        problems += fhir_problems(resource, f"{path}.resource")
        if isinstance(resource, Mapping) and resource.get("resourceType") in ORDER_TYPES:
            problems += _profile_problems(resource, f"{path}.resource")
    elif kind == "delete":
        rid = _string(action, "resourceId", path, problems)
        if rid is not None and not _TYPE_ID.match(rid):
            problems.append(f"{path}.resourceId: must be a relative reference 'Type/id'")


def _is_ci(extension: Any) -> bool:
    return isinstance(extension, Mapping) and extension.get("url") == COVERAGE_INFORMATION_URL


def _without_ci(resource: Mapping[str, Any]) -> dict[str, Any]:
    copy = dict(resource)
    kept = [e for e in copy.get("extension") or [] if not _is_ci(e)]
    if kept:
        copy["extension"] = kept
    else:
        copy.pop("extension", None)
    return copy


def _coverage_actions(
    actions: list[Any], problems: list[str], index: Mapping[str, Mapping[str, Any]] | None, crd_version: str
) -> None:
    """Inferno tests 13/14: update actions, a valid extension, one assertion id per coverage, one per order."""
    ids_by_coverage: dict[str, set[str]] = {}
    satisfied_by_coverage: dict[str, set[str]] = {}
    orders: dict[str, str] = {}
    for i, action in enumerate(actions):
        if not isinstance(action, Mapping) or not isinstance(action.get("resource"), Mapping):
            continue
        resource = action["resource"]
        extensions = [e for e in resource.get("extension") or [] if _is_ci(e)]
        if not extensions:
            continue
        path = f"systemActions[{i}]"
        if resource.get("resourceType") not in ORDER_TYPES | {"Appointment"}:
            problems.append(f"{path}.resource: coverage-information on a {resource.get('resourceType')}")
        if action.get("type") != "update":
            problems.append(f"{path}.type: coverage-information must be delivered as an 'update'")
        ref = f"{resource.get('resourceType')}/{resource.get('id')}"
        if ref in orders:
            problems.append(f"{path}: second coverage-information action for {ref} (first: {orders[ref]})")
        orders.setdefault(ref, path)
        if index is not None:
            draft = index.get(ref)
            if draft is None:
                problems.append(f"{path}.resource: {ref} is not one of the draft orders")
            elif _without_ci(resource) != _without_ci(draft):
                problems.append(f"{path}.resource: changes {ref} beyond the coverage-information extension")
        coverages: set[str] = set()
        for n, extension in enumerate(extensions):
            epath = f"{path}.resource.extension[coverage-information {n}]"
            check = _coverage_extension_22 if crd_version == CRD_2_2 else _coverage_extension
            values = check(extension, epath, problems)
            coverage = values.get("coverage")
            if coverage is None:
                continue
            if coverage in coverages:
                problems.append(f"{epath}: two coverage-information extensions for {coverage} on one order")
            coverages.add(coverage)
            if values.get("coverage-assertion-id"):
                ids_by_coverage.setdefault(coverage, set()).add(values["coverage-assertion-id"])
            if values.get("satisfied-pa-id"):
                satisfied_by_coverage.setdefault(coverage, set()).add(values["satisfied-pa-id"])
    owner: dict[str, str] = {}
    for coverage, ids in sorted(ids_by_coverage.items()):
        if len(ids) > 1:
            problems.append(f"coverage-information: {len(ids)} coverage-assertion-ids for {coverage}; must be one")
        for cid in ids:
            if cid in owner:
                problems.append(f"coverage-information: {coverage} and {owner[cid]} share coverage-assertion-id")
            owner.setdefault(cid, coverage)
    for coverage, ids in sorted(satisfied_by_coverage.items()):
        if len(ids) > 1:
            problems.append(f"coverage-information: {len(ids)} satisfied-pa-ids for {coverage}; at most one")


def _coverage_extension(extension: Mapping[str, Any], path: str, problems: list[str]) -> dict[str, str]:
    """Structure, codes, cardinality and invariants q1..q5 (2.0.1) plus q6/q8 (2.2) of one extension."""
    if any(str(k).startswith("value") for k in extension):
        problems.append(f"{path}: a complex extension has no value[x]")
    parts = extension.get("extension")
    if not isinstance(parts, list) or not parts:
        problems.append(f"{path}.extension: sub-extensions missing")
        return {}
    codes: dict[str, list[str]] = {}  # sub-extension url -> its values (codes, references, ids)
    for n, part in enumerate(parts):
        ppath = f"{path}.extension[{n}]"
        if not isinstance(part, Mapping) or not isinstance(part.get("url"), str):
            problems.append(f"{ppath}: sub-extension needs a url")
            continue
        url = part["url"]
        ppath = f"{path}.{url}"
        value_keys = [k for k in part if k.startswith("value")]
        if url == "expiry-date":
            problems.append(f"{ppath}: 2.2-only sub-extension; not valid in CRD 2.0.1")
            continue
        if url in CI_NOT_PORTABLE:
            problems.append(f"{ppath}: its shape differs between CRD 2.0.1 and 2.2; do not use it")
            continue
        if url not in CI_VALUE:
            problems.append(f"{ppath}: unknown coverage-information sub-extension")
            continue
        expected = CI_VALUE[url]
        if value_keys != [expected]:
            problems.append(f"{ppath}: needs exactly one {expected}")
            continue
        value = part[expected]
        codes.setdefault(url, [])
        if expected == "valueCode":
            if not isinstance(value, str):
                problems.append(f"{ppath}: valueCode must be a string")
                continue
            codes[url].append(value)
            if value in CI_ONLY_22:
                problems.append(f"{ppath}: code {value!r} exists only in CRD 2.2")
            elif value in CI_REMOVED_22 and url == "doc-needed":
                problems.append(f"{ppath}: code {value!r} was removed in CRD 2.2")
            elif value not in CI_CODES[url]:
                problems.append(f"{ppath}: code {value!r} not in {sorted(CI_CODES[url])}")
        elif expected == "valueReference":
            if not isinstance(value, Mapping) or not isinstance(value.get("reference"), str):
                problems.append(f"{ppath}: valueReference needs a reference")
                continue
            codes[url].append(value["reference"])
        elif expected == "valueCodeableConcept":
            if not isinstance(value, Mapping) or not (value.get("text") or value.get("coding")):
                problems.append(f"{ppath}: reason needs text or a coding")
            codes[url].append("reason")
        elif expected == "valueDate":
            if not isinstance(value, str) or not _DATE.match(value):
                problems.append(f"{ppath}: valueDate must be a FHIR date (YYYY-MM-DD)")
            codes[url].append(str(value))
        else:
            if not isinstance(value, str | Mapping) or not value:
                problems.append(f"{ppath}: {expected} has no value")
            codes[url].append(value if isinstance(value, str) else url)
    for url, (low, high) in CI_CARDINALITY.items():
        count = len(codes.get(url, []))
        if count < low:
            problems.append(f"{path}.{url}: required (min {low})")
        elif count > high:
            problems.append(f"{path}.{url}: {count} repetitions (max {high})")

    covered = (codes.get("covered") or [None])[0]
    pa = (codes.get("pa-needed") or [None])[0]
    doc = (codes.get("doc-needed") or [None])[0]
    if ("questionnaire" in codes or "response" in codes) and not doc:
        problems.append(f"{path}: crd-ci-q1: questionnaire/response only with doc-needed")
    if covered is not None and covered != "not-covered" and pa is None:
        problems.append(f"{path}: crd-ci-q2 (2.0.1): pa-needed required unless covered is not-covered")
    if covered == "not-covered" and pa is not None:
        problems.append(f"{path}: crd-ci-q2 (2.2): no pa-needed when covered is not-covered")
    if "info-needed" in codes and "conditional" not in (covered, pa, doc):
        problems.append(f"{path}: crd-ci-q3: info-needed only when covered, pa-needed or doc-needed is conditional")
    if pa == "satisfied" and "withpa" in codes.get("doc-purpose", []):
        problems.append(f"{path}: crd-ci-q4: no doc-purpose withpa when pa-needed is satisfied")
    if (pa == "satisfied") != bool(codes.get("satisfied-pa-id")):
        problems.append(f"{path}: crd-ci-q5: satisfied-pa-id present if and only if pa-needed is satisfied")
    if "OTH" in codes.get("info-needed", []) and not codes.get("reason"):
        problems.append(f"{path}: crd-ci-q6 (2.2): info-needed OTH needs a reason")
    if codes.get("doc-purpose") and not codes.get("reason"):
        problems.append(f"{path}: crd-ci-q8 (2.2): doc-purpose needs a reason")
    return {k: v[0] for k, v in codes.items() if v and k in ("coverage", "coverage-assertion-id", "satisfied-pa-id")}


def _coverage_extension_22(extension: Mapping[str, Any], path: str, problems: list[str]) -> dict[str, str]:
    """CRD 2.2.1: structure, required bindings, cardinality and invariants crd-ci-q1..q9 of one extension."""
    if any(str(k).startswith("value") for k in extension):
        problems.append(f"{path}: a complex extension has no value[x]")
    parts = extension.get("extension")
    if not isinstance(parts, list) or not parts:
        problems.append(f"{path}.extension: sub-extensions missing")
        return {}
    values: dict[str, list[Any]] = {}
    for n, part in enumerate(parts):
        if not isinstance(part, Mapping) or not isinstance(part.get("url"), str):
            problems.append(f"{path}.extension[{n}]: sub-extension needs a url")
            continue
        url = part["url"]
        ppath = f"{path}.{url}"
        if url in CI_REMOVED_IN_22:
            problems.append(f"{ppath}: removed from coverage-information in CRD 2.1; not valid in CRD 2.2")
            continue
        if url == "detail":
            _detail_22(part, ppath, problems)
            values.setdefault(url, []).append(part)
            continue
        if url not in CI_VALUE_22:
            problems.append(f"{ppath}: unknown coverage-information sub-extension")
            continue
        expected = CI_VALUE_22[url]
        if [k for k in part if k.startswith("value")] != [expected]:
            problems.append(f"{ppath}: needs exactly one {expected}")
            continue
        value = part[expected]
        if expected == "valueCode":
            if not isinstance(value, str):
                problems.append(f"{ppath}: valueCode must be a string")
                continue
            if value == "both" and url == "doc-needed":
                problems.append(f"{ppath}: code 'both' was removed in CRD 2.2")
            elif value not in CI_CODES_22[url]:
                problems.append(f"{ppath}: code {value!r} not in the CRD 2.2 value set {sorted(CI_CODES_22[url])}")
        elif expected == "valueReference":
            if not isinstance(value, Mapping) or not isinstance(value.get("reference"), str):
                problems.append(f"{ppath}: valueReference needs a reference")
                continue
            value = value["reference"]
        elif expected == "valueCodeableConcept":
            _reason_22(value, ppath, problems)
        elif expected == "valueDate":
            if not isinstance(value, str) or not _DATE.match(value):
                problems.append(f"{ppath}: valueDate must be a FHIR date (YYYY-MM-DD)")
        elif expected == "valueContactDetail":
            if not isinstance(value, Mapping) or not (value.get("name") or value.get("telecom")):
                problems.append(f"{ppath}: valueContactDetail needs a name or telecom")
        elif not isinstance(value, str | Mapping) or not value:
            problems.append(f"{ppath}: {expected} has no value")
        values.setdefault(url, []).append(value)
    for url, (low, high) in CI_CARDINALITY_22.items():
        count = len(values.get(url, []))
        if count < low:
            problems.append(f"{path}.{url}: required (min {low})")
        elif count > high:
            problems.append(f"{path}.{url}: {count} repetitions (max {high})")

    def codes(url: str) -> list[str]:
        return [v for v in values.get(url, []) if isinstance(v, str)]

    main = codes("covered") + codes("pa-needed") + codes("doc-needed")
    reasons = [r for r in values.get("reason", []) if isinstance(r, Mapping)]
    if "questionnaire" in values and "doc-needed" not in values:
        problems.append(f"{path}: crd-ci-q1: questionnaire only when doc-needed exists")
    if "not-covered" in codes("covered") and "pa-needed" in values:
        problems.append(f"{path}: crd-ci-q2: no pa-needed when covered is not-covered")
    if "conditional" in main and "info-needed" not in values:
        problems.append(f"{path}: crd-ci-q3: info-needed required when covered, pa-needed or doc-needed is conditional")
    if "info-needed" in values and "conditional" not in main:
        problems.append(f"{path}: crd-ci-q3: info-needed only when covered, pa-needed or doc-needed is conditional")
    no_pa = {"satisfied", "no-auth", "noauth", "not-covered"}  # q4's FHIRPath says 'noauth'; the code is 'no-auth'
    if set(codes("pa-needed")) & no_pa and "withpa" in codes("doc-purpose"):
        problems.append(f"{path}: crd-ci-q4: no doc-purpose withpa when pa-needed is satisfied, no-auth or not-covered")
    if ("satisfied" in codes("pa-needed")) != ("satisfied-pa-id" in values):
        problems.append(f"{path}: crd-ci-q5: satisfied-pa-id present if and only if pa-needed is satisfied")
    if "OTH" in codes("info-needed") and not reasons:
        problems.append(f"{path}: crd-ci-q6: info-needed OTH needs a reason")
    for reason in reasons:
        codings = [c for c in reason.get("coding") or [] if isinstance(c, Mapping)]
        in_vs = any((c.get("system"), c.get("code")) in ASSERTION_REASONS_22 for c in codings)
        if codings and not in_vs and not reason.get("text"):
            problems.append(f"{path}.reason: crd-ci-q7: a coding outside coverageAssertionReasons needs text")
    if any(v != "conditional" for v in codes("doc-purpose")) and not reasons:
        problems.append(f"{path}: crd-ci-q8: doc-purpose needs a reason")
    if "indeterminate" in main:
        if not reasons:
            problems.append(f"{path}: crd-ci-q9: indeterminate needs a reason")
        elif not any(_technical(r) and r.get("text") for r in reasons):
            problems.append(f"{path}.reason: resp-43: indeterminate needs a reason coded technical, with text")
    for reason in reasons:
        if _technical(reason) and not reason.get("text"):
            problems.append(f"{path}.reason: resp-43: a technical reason gives its details in reason.text")
    date_value, expiry = (codes("date") or [None])[0], (codes("expiry-date") or [None])[0]
    if date_value and expiry and _DATE.match(date_value) and _DATE.match(expiry) and expiry < date_value:
        problems.append(f"{path}.expiry-date: {expiry} is before the assertion date {date_value}")
    keep = ("coverage", "coverage-assertion-id", "satisfied-pa-id")
    return {k: v[0] for k, v in values.items() if k in keep and v and isinstance(v[0], str)}


def _technical(reason: Mapping[str, Any]) -> bool:
    codings = [c for c in reason.get("coding") or [] if isinstance(c, Mapping)]
    return any((c.get("system"), c.get("code")) == (CRD_TEMP_SYSTEM, "technical") for c in codings)


def _reason_22(value: Any, path: str, problems: list[str]) -> None:
    if not isinstance(value, Mapping) or not (value.get("text") or value.get("coding")):
        problems.append(f"{path}: reason needs text or a coding")
        return
    for n, coding in enumerate(value.get("coding") or []):
        if not isinstance(coding, Mapping) or not coding.get("system") or not coding.get("code"):
            problems.append(f"{path}.coding[{n}]: needs system and code")


def _detail_22(part: Mapping[str, Any], path: str, problems: list[str]) -> None:
    """detail: category (required binding) 1..1, code 1..1, value 1..1 (boolean|string|url|Quantity|Period),
    qualification 0..1; a policy-link's value is a url."""
    if any(str(k).startswith("value") for k in part):
        problems.append(f"{path}: a complex extension has no value[x]")
    subs = part.get("extension")
    if not isinstance(subs, list):
        problems.append(f"{path}.extension: category, code and value missing")
        return
    found: dict[str, list[Mapping[str, Any]]] = {}
    for sub in subs:
        if not isinstance(sub, Mapping) or sub.get("url") not in ("category", "code", "value", "qualification"):
            problems.append(
                f"{path}: unknown detail sub-extension {sub.get('url') if isinstance(sub, Mapping) else sub!r}"
            )
            continue
        found.setdefault(sub["url"], []).append(sub)
    for url, low, high in (("category", 1, 1), ("code", 1, 1), ("value", 1, 1), ("qualification", 0, 1)):
        count = len(found.get(url, []))
        if not low <= count <= high:
            problems.append(f"{path}.{url}: {count} repetitions (expected {low}..{high})")
    for sub in found.get("category", []):
        if sub.get("valueCode") not in DETAIL_CATEGORIES_22:
            problems.append(f"{path}.category: valueCode must be one of {sorted(DETAIL_CATEGORIES_22)}")
    policy_link = False
    for sub in found.get("code", []):
        concept = sub.get("valueCodeableConcept")
        if not isinstance(concept, Mapping) or not (concept.get("coding") or concept.get("text")):
            problems.append(f"{path}.code: needs a valueCodeableConcept")
            continue
        policy_link = any(
            isinstance(c, Mapping) and c.get("code") == "policy-link" for c in concept.get("coding") or []
        )
    for sub in found.get("value", []):
        keys = [k for k in sub if k.startswith("value")]
        if len(keys) != 1 or keys[0] not in DETAIL_VALUES_22:
            problems.append(f"{path}.value: needs exactly one of {sorted(DETAIL_VALUES_22)}")
        elif policy_link and (keys[0] != "valueUrl" or not _URL.match(str(sub["valueUrl"]))):
            problems.append(f"{path}.value: a policy-link's value is an absolute http(s) valueUrl")
    for sub in found.get("qualification", []):
        if not isinstance(sub.get("valueString"), str) or not sub["valueString"]:
            problems.append(f"{path}.qualification: needs a valueString")


def _cards_vs_orders(
    cards: list[Any], actions: list[Any], index: Mapping[str, Mapping[str, Any]], problems: list[str], crd_version: str
) -> None:
    """Cards name draft orders; every order with a determination carries coverage-information (2.2 hook-16: also
    a no-policy decision that names a Coverage — the service answers 400 for the others)."""
    with_ci = {
        f"{a['resource'].get('resourceType')}/{a['resource'].get('id')}"
        for a in actions
        if isinstance(a, Mapping)
        and isinstance(a.get("resource"), Mapping)
        and any(_is_ci(e) for e in a["resource"].get("extension") or [])
    }
    for i, card in enumerate(cards):
        extension = card.get("extension") if isinstance(card, Mapping) else None
        if not isinstance(extension, Mapping):
            continue
        refs = extension.get(ASSOCIATED_RESOURCE)
        refs = [r for r in refs if isinstance(r, str)] if isinstance(refs, list) else []
        for ref in refs:
            if ref not in index:
                problems.append(f"cards[{i}].extension.{ASSOCIATED_RESOURCE}: {ref} is not a draft order")
        decision = extension.get(DECISION_EXTENSION)
        if not isinstance(decision, Mapping):
            continue
        if decision.get("outcome") == "no-policy" and crd_version == CRD_2_2:
            if decision.get("program") in HOOK_13_REASONS:
                problems.append(
                    f"cards[{i}]: a no-policy card for {decision['program']}: CRD 2.2 answers HTTP 400 (hook-13)"
                )
                continue
        elif decision.get("outcome") == "no-policy":
            continue
        if not decision.get("coverage"):
            continue
        for ref in refs:
            if ref in index and ref not in with_ci:
                problems.append(
                    f"cards[{i}]: {ref} has a {decision.get('outcome')} determination "
                    "but no coverage-information action"
                )


# ----------------------------------------------------------------------------------------------- discovery


def discovery_problems(document: Mapping[str, Any]) -> list[str]:
    """A discovery document's services and their CRD extensions (deviations.md dev-1, dev-2, dev-4, dev-8)."""
    if not isinstance(document, Mapping) or not isinstance(document.get("services"), list):
        return ["services: required array missing"]
    problems: list[str] = []
    ids: set[tuple[str, str]] = set()
    for i, service in enumerate(document["services"]):
        path = f"services[{i}]"
        if not isinstance(service, Mapping):
            problems.append(f"{path}: must be an object")
            continue
        _empty_values(service, path, problems)
        hook, sid = (_string(service, key, path, problems) for key in ("hook", "id"))
        _string(service, "description", path, problems)
        if hook and sid:
            if (hook, sid) in ids:
                problems.append(f"{path}: a second {hook} service with id {sid!r}")
            ids.add((hook, sid))
        extension = service.get("extension")
        if not isinstance(extension, Mapping):
            problems.append(f"{path}.extension: required for davinci-crd.version (dev-1)")
            continue
        versions = extension.get("davinci-crd.version")
        vpath = f"{path}.extension.davinci-crd.version"
        if not isinstance(versions, list) or not versions:
            problems.append(f"{vpath}: SHALL list at least one CRD version (dev-1)")
        else:
            for version in versions:
                if not isinstance(version, str) or not _CRD_VERSION.match(version):
                    problems.append(f"{vpath}: {version!r} is not a CRD major.minor version")
            if len(set(map(str, versions))) != len(versions):
                problems.append(f"{vpath}: versions repeat")
        options = extension.get("davinci-crd.configuration-options")
        if options is not None:
            _configuration_options(options, f"{path}.extension.davinci-crd.configuration-options", problems)
    return problems


def _configuration_options(options: Any, path: str, problems: list[str]) -> None:
    if not isinstance(options, list):
        problems.append(f"{path}: must be an array")
        return
    seen: dict[str, set[str]] = {"code": set(), "name": set(), "description": set()}
    for n, option in enumerate(options):
        opath = f"{path}[{n}]"
        if not isinstance(option, Mapping):
            problems.append(f"{opath}: must be an object")
            continue
        for key in ("code", "type", "name", "description"):
            value = _string(option, key, opath, problems)
            if value is not None and key in seen:
                if value in seen[key]:
                    problems.append(f"{opath}.{key}: {value!r} is not unique within the service (dev-8)")
                seen[key].add(value)
        kind = option.get("type")
        if kind not in ("boolean", "integer"):
            problems.append(f"{opath}.type: must be boolean or integer")
        if "default" not in option:
            problems.append(f"{opath}.default: required (dev-4)")
        else:
            default = option["default"]
            ok = (
                isinstance(default, bool)
                if kind == "boolean"
                else isinstance(default, int) and not isinstance(default, bool)
            )
            if kind in ("boolean", "integer") and not ok:
                problems.append(f"{opath}.default: must be a JSON {kind}")
