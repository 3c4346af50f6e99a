"""Which Da Vinci CRD version a call is answered in, and the error rules that differ between versions.

Discovery declares every served version on the hook (`davinci-crd.version`, CRD 2.2 dev-1/dev-2); a call asks for
one with the root extension `davinci-crd.requestedVersion` (dev-3). A call without it predates CRD 2.2 (the
extension is 2.2's) and is answered in CRD 2.0 (2.0.1), exactly as before 2.2 was served. A version this service
does not serve is an error (the extension's definition: "If this is not a version supported by the service, it
SHALL return an error"): 422, since the call is valid CDS Hooks and breaks only a CRD rule.

Error statuses (hook-13): CRD 2.0.1 answers 400 only for a body that is not JSON and 422 for any other
nonconformance — unchanged. CRD 2.2 answers 400 when the request fails JSON, FHIR core or CDS Hooks validation and
422 only when it is valid by those but breaks a CRD-specific constraint (issues tagged CRD_RULE); it also answers
400 when the primary Coverage's payer is not one this endpoint handles, including no Coverage and several.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from cards.config import CRD_2_2, CRD_VERSIONS, DEFAULT_CRD_VERSION, HOOK_13_REASONS
from cds_service.errors import CRD_RULE, Issue, ServiceError
from fhir_mappings.model import Decision, Outcome

REQUESTED_VERSION = "davinci-crd.requestedVersion"
SERVED_VERSIONS = list(CRD_VERSIONS)  # discovery's `davinci-crd.version`, oldest first
_SHOWABLE = re.compile(r"^[0-9A-Za-z.\-]{1,16}$")  # a value short and plain enough to quote back

# What the 400 says for each of cards' HOOK_13_REASONS: the primary Coverage does not name a payer this endpoint
# handles ("This includes situations where no Coverage is accessible, multiple Coverages are accessible, or the
# provided Coverage does not have a payer.identifier at all"). A handled payer with an unrecognised plan is not one.
UNHANDLED_COVERAGE: dict[str, tuple[str, str]] = {
    "no-active-coverage": ("no active Coverage for the patient is accessible (prefetch or FHIR server)", "not-found"),
    "coverage-ambiguous": ("several active Coverages are accessible and none is marked primary", "multiple-matches"),
    "payer-not-handled": ("the primary Coverage's payer is not one this CRD service handles", "business-rule"),
}


def requested_version(body: Any) -> str:
    """The CRD version to answer `body` in: its `davinci-crd.requestedVersion`, or 2.0 when it sends none.

    Only a well-formed request names a version; anything else is left to request validation (and answered under
    the default version's rules).
    """
    extension = body.get("extension") if isinstance(body, Mapping) else None
    if not isinstance(extension, Mapping) or REQUESTED_VERSION not in extension:
        return DEFAULT_CRD_VERSION
    value = extension[REQUESTED_VERSION]
    if isinstance(value, str) and value in CRD_VERSIONS:
        return value
    shown = repr(value) if isinstance(value, str) and _SHOWABLE.match(value) else f"a {type(value).__name__}"
    raise ServiceError(
        422,
        [
            Issue(
                f"extension.{REQUESTED_VERSION}: {shown} is not a CRD version this service answers in; "
                f"supported: {', '.join(CRD_VERSIONS)} (major.minor, as discovery's davinci-crd.version lists them)",
                code="not-supported",
                expression=f"extension.{REQUESTED_VERSION}",
                rule=CRD_RULE,
            )
        ],
    )


def error_status(version: str, error: ServiceError) -> int:
    """The HTTP status `error` gets under `version`'s rules (only CRD 2.2 changes a 422 to a 400)."""
    if version != CRD_2_2 or error.status != 422:
        return error.status
    return 422 if error.issues and all(issue.rule == CRD_RULE for issue in error.issues) else 400


def refuse_unhandled_coverage(version: str, decisions: Sequence[Decision]) -> None:
    """CRD 2.2 hook-13: 400 with an OperationOutcome when no decision could use the primary Coverage's payer."""
    if version != CRD_2_2 or not decisions or any(d.outcome is not Outcome.NO_POLICY for d in decisions):
        return
    reasons = {d.program for d in decisions}
    if not reasons <= HOOK_13_REASONS:
        return
    raise ServiceError(
        400,
        [
            Issue(
                f"{UNHANDLED_COVERAGE[reason][0]} (CRD 2.2 hook-13)",
                code=UNHANDLED_COVERAGE[reason][1],
                expression="prefetch.coverage",
            )
            for reason in sorted(str(r) for r in reasons)
        ],
    )
