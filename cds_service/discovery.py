"""The discovery document (`GET /cds-services`): one order-sign service and how to call it."""

from __future__ import annotations

from typing import Any

from cards import CONFIGURATION_OPTIONS
from cds_service.crd_version import REQUESTED_VERSION, SERVED_VERSIONS
from fhir_mappings.queries import QuerySet

SERVICE_ID = "ketamine-prior-auth"

DESCRIPTION = (
    "Prior-authorization advice for ketamine orders at order signing. Recognises IV ketamine, ketamine for "
    "ketamine-assisted psychotherapy (KAP), esketamine (Spravato), and the infusion (CPT 96365), evaluation "
    "(90791/90792) and integration psychotherapy (90832/90834/90837) services; evaluates them against Mass "
    "General Brigham Health Plan Medical Policy 031 (IV ketamine for treatment-resistant depression) and "
    "U of U Health Plans MP-054 (KAP), chosen from the patient's active Coverage. Returns one card per "
    "decision with every criterion's status and the FHIR evidence behind it, plus a Da Vinci CRD "
    "coverage-information system action per evaluated order. Advisory only: it never blocks signing."
)

USAGE = (
    "Send a JWT (ES384 or RS384) from a trusted issuer on every hook and feedback call. Prefetch is "
    "optional: anything not prefetched is read from fhirServer with fhirAuthorization; only FHIR servers "
    "registered for the caller's issuer are contacted. Da Vinci CRD 2.0 (2.0.1) and 2.2 (2.2.1): send the "
    f'request extension "{REQUESTED_VERSION}": "2.2" for CRD 2.2 answers; without it the answers are CRD 2.0.'
)


def discovery_document(queries: QuerySet) -> dict[str, Any]:
    """Built once at start-up: prefetch templates come from the loaded query definitions (site codes included)."""
    return {
        "services": [
            {
                "hook": "order-sign",
                "id": SERVICE_ID,
                "title": "Ketamine prior-authorization advice (MGB 031, U of U MP-054)",
                "description": DESCRIPTION,
                "usageRequirements": USAGE,
                "prefetch": queries.discovery_prefetch(),
                "extension": {
                    "davinci-crd.version": SERVED_VERSIONS,  # CRD 2.2 dev-1/dev-2: every version served
                    "davinci-crd.configuration-options": CONFIGURATION_OPTIONS,
                },
            }
        ]
    }
