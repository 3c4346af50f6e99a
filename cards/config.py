"""CRD configuration options: what discovery advertises and how a request's `davinci-crd.configuration` is read.

CRD (deviations.md): servers SHALL offer a boolean per card type they return, SHALL behave as configured, and
SHALL ignore unsupported configuration — so an unknown code or a value of the wrong JSON type is ignored and
the default applies; a request never fails because of its configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fhir_mappings.model import Outcome

# The CRD versions this service answers in (major.minor, as `davinci-crd.version` declares them), and the one a
# call gets when it does not ask: `davinci-crd.requestedVersion` was introduced by CRD 2.2, so a client that does
# not send it predates 2.2 and gets 2.0 (CRD 2.0.1) answers, exactly as before 2.2 was served.
CRD_2_0 = "2.0"
CRD_2_2 = "2.2"
CRD_VERSIONS = (CRD_2_0, CRD_2_2)
DEFAULT_CRD_VERSION = CRD_2_0

# No-policy reasons (Decision.program) that CRD 2.2 hook-13 answers with HTTP 400 instead of a response: the
# primary Coverage does not name a payer this endpoint handles — no Coverage, several, or another payer.
HOOK_13_REASONS = frozenset({"no-active-coverage", "coverage-ambiguous", "payer-not-handled"})

CARD_TYPE_SYSTEM = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"  # CRD 2.0.1 card types
# CRD 2.2 ValueSet cardType = all codes of HL7 Terminology's cdshooks-card-type (same codes; the CRD temp system
# is kept "for backwards compatibility only").
CARD_TYPE_SYSTEM_22 = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
CARD_TYPE_SYSTEMS = {CRD_2_0: CARD_TYPE_SYSTEM, CRD_2_2: CARD_TYPE_SYSTEM_22}
COVERAGE_INFO = "coverage-info"
GUIDELINE = "guideline"
OFF_GUIDELINE = "off-guideline"
MAX_CARDS = "max-cards"
DEFAULT_MAX_CARDS = 10

TOPIC_DISPLAY = {
    COVERAGE_INFO: "Coverage Information",
    GUIDELINE: "Guideline",
    OFF_GUIDELINE: "Off Guideline",
}

# The one documented mapping from outcome to CRD card type (source.topic). `coverage-info` is the type of the
# coverage-information system action itself; a card carries it only when there is no determination to put on
# the order (no-policy: no / ambiguous coverage, payer or plan not handled).
TOPIC_BY_OUTCOME: dict[Outcome, str] = {
    Outcome.LIKELY_AUTHORIZED: GUIDELINE,
    Outcome.DOCUMENTATION_NEEDED: GUIDELINE,
    Outcome.PLAN_VARIATION: GUIDELINE,
    Outcome.NOT_APPLICABLE: GUIDELINE,
    Outcome.CRITERIA_NOT_MET: OFF_GUIDELINE,
    Outcome.BLOCKED: OFF_GUIDELINE,
    Outcome.NOT_COVERED: OFF_GUIDELINE,
    Outcome.NO_POLICY: COVERAGE_INFO,
}

CONFIGURATION_OPTIONS: list[dict[str, Any]] = [
    {
        "code": COVERAGE_INFO,
        "type": "boolean",
        "name": "Coverage information",
        "description": (
            "Add the Da Vinci CRD coverage-information extension to each evaluated draft order (system action), "
            "and show a card when no payer policy could be applied (no or ambiguous coverage, payer not handled)."
        ),
        "default": True,
    },
    {
        "code": GUIDELINE,
        "type": "boolean",
        "name": "Policy criteria cards",
        "description": (
            "Informational cards comparing the payer policy's prior-authorization criteria with the record: "
            "criteria appear met, documentation needed, plan variation, or another policy governs the order."
        ),
        "default": True,
    },
    {
        "code": OFF_GUIDELINE,
        "type": "boolean",
        "name": "Policy exception cards",
        "description": (
            "Warning cards when the record shows a policy requirement is not met, a policy exclusion applies, "
            "or the payer does not cover the ordered service."
        ),
        "default": True,
    },
    {
        "code": MAX_CARDS,
        "type": "integer",
        "name": "Maximum number of cards",
        "description": "At most this many cards per response; warnings are kept first. 0 returns no cards.",
        "default": DEFAULT_MAX_CARDS,
    },
]


@dataclass(frozen=True)
class Settings:
    """The configuration in effect for one request (advertised defaults overridden by valid request values)."""

    coverage_info: bool = True
    topics: Mapping[str, bool] | None = None  # topic code -> enabled; None: all enabled
    max_cards: int = DEFAULT_MAX_CARDS

    def topic_enabled(self, topic: str) -> bool:
        return True if self.topics is None else self.topics.get(topic, True)


def settings_from(configuration: Mapping[str, Any] | None) -> Settings:
    """Valid values override defaults; unknown codes and wrong JSON types are ignored (CRD SHALL)."""
    if not isinstance(configuration, Mapping):
        return Settings()

    def boolean(code: str, default: bool) -> bool:
        value = configuration.get(code)
        return value if isinstance(value, bool) else default

    max_cards = configuration.get(MAX_CARDS)
    if isinstance(max_cards, bool) or not isinstance(max_cards, int) or max_cards < 0:
        max_cards = DEFAULT_MAX_CARDS
    return Settings(
        coverage_info=boolean(COVERAGE_INFO, True),
        topics={topic: boolean(topic, True) for topic in TOPIC_DISPLAY},
        max_cards=max_cards,
    )
