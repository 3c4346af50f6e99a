"""`--lenient`: accept what real CDS clients send, and nothing more — each tolerance a named, documented item.

Strict mode follows CDS Hooks 2.0 / CRD 2.0.1 to the letter. Real clients do not: the CDS Hooks sandbox web app
(sandbox.cds-hooks.org, the client most developers try a service with first) sends a `MedicationRequest.category`
that is one object where R4 says a list, and a draftOrders Bundle without `type` (requests it really sent are in
`tests/fixtures/recorded/`). In lenient mode `apply_tolerances` rewrites the parsed request **once, before
validation**, into the R4 the client meant, so that

- validation and evaluation see valid R4 (the R4B structural check of the evaluated orders still runs), and
- everything the service echoes — the coverage-information system action carries the draft order back — is
  valid R4 too: the normalised order, never the client's quirk.

Two kinds of tolerance:

- *normalise*: the quirk has one R4 reading, and the request is rewritten to it (`apply` below);
- *accept*: the element is missing and cannot be made up (a requester, …); validation skips its strict-only
  check in lenient mode (`cds_service.hook_request`), and evaluation treats the data as absent — never as met.

The README lists every tolerance (`tests/service/test_tolerances.py` checks the list is the same as here).
Nothing here logs or returns request values: only tolerance names.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ketamine_cds.tolerances")

JsonObject = dict[str, Any]

SANDBOX_APP = "CDS Hooks sandbox web app (sandbox.cds-hooks.org), Rx Sign"

# The value a draft order without `intent` gets: order-sign fires when the clinician signs, i.e. when the draft
# becomes an order — and it is what the sandbox app itself sends whenever a medication is chosen.
DEFAULT_INTENT = "order"
# What a draftOrders Bundle is in CDS Hooks (a set of resources, no transaction semantics).
DEFAULT_BUNDLE_TYPE = "collection"
# Draft order types whose R4 `intent` is required (1..1); R4 CommunicationRequest and VisionPrescription have none.
_TYPES_WITH_REQUIRED_INTENT = frozenset(
    {"MedicationRequest", "ServiceRequest", "DeviceRequest", "NutritionOrder", "Task"}
)


@dataclass(frozen=True)
class Tolerance:
    """One thing a real client sends that strict mode refuses."""

    name: str
    kind: str  # "normalise" | "accept"
    accepts: str  # what the client sends, in a few words
    becomes: str  # what the service makes of it
    seen_from: str | None  # the real client that sends it (None: no recorded client does; kept for compatibility)
    apply: Callable[[JsonObject], bool] | None = None  # normalise: rewrite the draft orders Bundle, True if changed


def _draft_orders(bundle: JsonObject) -> list[JsonObject]:
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    return [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]


def _bundle_type_missing(bundle: JsonObject) -> bool:
    if "type" in bundle:
        return False
    bundle["type"] = DEFAULT_BUNDLE_TYPE
    return True


def _category_single_object(bundle: JsonObject) -> bool:
    changed = False
    for order in _draft_orders(bundle):
        if order.get("resourceType") == "MedicationRequest" and isinstance(order.get("category"), dict):
            order["category"] = [order["category"]]
            changed = True
    return changed


def _intent_missing(bundle: JsonObject) -> bool:
    changed = False
    for order in _draft_orders(bundle):
        if order.get("resourceType") in _TYPES_WITH_REQUIRED_INTENT and "intent" not in order:
            order["intent"] = DEFAULT_INTENT
            changed = True
    return changed


TOLERANCES: tuple[Tolerance, ...] = (
    Tolerance(
        name="category-single-object",
        kind="normalise",
        accepts="`MedicationRequest.category` as one CodeableConcept object (R4: a list)",
        becomes="a one-element list holding that object",
        seen_from=SANDBOX_APP,
        apply=_category_single_object,
    ),
    Tolerance(
        name="bundle-type-missing",
        kind="normalise",
        accepts="`context.draftOrders` Bundle without `type` (R4: required)",
        becomes=f'`type: "{DEFAULT_BUNDLE_TYPE}"`',
        seen_from=SANDBOX_APP,
        apply=_bundle_type_missing,
    ),
    Tolerance(
        name="intent-missing",
        kind="normalise",
        accepts="a draft order without `intent` (R4: required)",
        becomes=f'`intent: "{DEFAULT_INTENT}"` (the order is being signed)',
        seen_from=f"{SANDBOX_APP}, when Sign is pressed before a medication is chosen",
        apply=_intent_missing,
    ),
    Tolerance(
        name="requester-missing",
        kind="accept",
        accepts="a MedicationRequest/ServiceRequest without `requester` (CRD order profiles: required)",
        becomes="accepted; criteria about the prescriber stay unknown (the card asks for them)",
        seen_from=SANDBOX_APP,
    ),
    Tolerance(
        name="subject-missing",
        kind="accept",
        accepts="a MedicationRequest/ServiceRequest without `subject` (strict mode requires it)",
        becomes="accepted; the order is taken to be about `context.patientId`",
        seen_from=None,
    ),
    Tolerance(
        name="hook-instance-not-uuid",
        kind="accept",
        accepts="a `hookInstance` that is not a UUID (CDS Hooks: a UUID)",
        becomes="accepted as an opaque identifier",
        seen_from=None,
    ),
)

TOLERANCES_BY_NAME: dict[str, Tolerance] = {t.name: t for t in TOLERANCES}


def apply_tolerances(body: Any) -> Any:
    """The request with every *normalise* tolerance applied; the caller's object is left as it was.

    Anything that is not shaped like an order-sign request (no object, no `context.draftOrders` object) is returned
    unchanged, so that validation refuses it with its usual message. Only `context.draftOrders` is copied (it is
    small; the prefetch may be large and is never rewritten).
    """
    if not isinstance(body, dict) or not isinstance(body.get("context"), dict):
        return body
    bundle = body["context"].get("draftOrders")
    if not isinstance(bundle, dict):
        return body
    bundle = copy.deepcopy(bundle)
    applied = [t.name for t in TOLERANCES if t.apply is not None and t.apply(bundle)]
    if not applied:
        return body
    log.info("lenient: request normalised by tolerance(s) %s", ", ".join(applied))
    return {**body, "context": {**body["context"], "draftOrders": bundle}}
