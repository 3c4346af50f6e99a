"""The order-sign response: decision cards plus coverage-information system actions, as configured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from cards.card import build_card, card_uuid
from cards.config import CRD_VERSIONS, DEFAULT_CRD_VERSION, TOPIC_BY_OUTCOME, settings_from
from cards.coverage import system_actions
from cards.text import stable_uuid
from fhir_mappings.model import Decision

_PRIORITY = {"critical": 0, "warning": 1, "info": 2}


def build_response(
    decisions: Sequence[Decision],
    draft_orders: Sequence[dict],
    *,
    hook_instance: str,
    patient_id: str,
    user_id: str,
    today: date,
    configuration: Mapping[str, Any] | None = None,
    crd_version: str = DEFAULT_CRD_VERSION,
) -> dict[str, Any]:
    """`{"cards": [...], "systemActions": [...]}` — both keys always present (Inferno: order-sign needs both).

    One card per decision unless its card type is switched off; `max-cards` keeps warnings first but
    preserves the decisions' order. Card uuids do not depend on the configuration or the CRD version.
    `crd_version` is one of CRD_VERSIONS ("2.0": CRD 2.0.1 exactly as before 2.2 was served; "2.2": CRD 2.2.1).
    """
    if crd_version not in CRD_VERSIONS:
        raise ValueError(f"CRD version {crd_version!r} is not one of {', '.join(CRD_VERSIONS)}")
    settings = settings_from(configuration)
    decisions = [d for d in decisions if d is not None]  # evaluate_policy may return None: nothing to say
    cards: list[dict[str, Any]] = []
    used: set[str] = set()
    for decision in decisions:
        uid = base = card_uuid(decision, hook_instance)
        n = 1
        while uid in used:  # two decisions for the same policy and orders: should not happen, stay unique
            n += 1
            uid = stable_uuid(base, str(n))
        used.add(uid)
        if not settings.topic_enabled(TOPIC_BY_OUTCOME[decision.outcome]):
            continue
        cards.append(
            build_card(decision, uuid=uid, patient_id=patient_id, user_id=user_id, today=today, crd_version=crd_version)
        )
    if len(cards) > settings.max_cards:
        ranked = sorted(range(len(cards)), key=lambda i: (_PRIORITY.get(cards[i]["indicator"], 3), i))
        keep = sorted(ranked[: settings.max_cards])
        cards = [cards[i] for i in keep]
    actions = (
        system_actions(decisions, draft_orders, hook_instance=hook_instance, today=today, crd_version=crd_version)
        if settings.coverage_info
        else []
    )
    return {"cards": cards, "systemActions": actions}
