"""The draft order itself: route, kind, stated reasons, what it (or an order signed with it) mentions."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

from fhir_mappings.derive.common import mention, reasons, valueset_ids
from fhir_mappings.facts import DeriveFact, FactContext, derivation, format_value, reference_of
from fhir_mappings.model import Evidence, Fact, FactState
from fhir_mappings.reading.dates import DateSpan, first_span
from fhir_mappings.record import as_list
from fhir_mappings.rules import Item


def order_span(ctx: FactContext) -> DateSpan | None:
    """When the ordered service happens: occurrence[x], else authoredOn, else None (the caller decides)."""
    if ctx.group is None:
        return None
    span, _ = first_span(ctx.group.primary.resource, ("occurrenceDateTime", "occurrencePeriod.start", "authoredOn"))
    return span


def order_date(ctx: FactContext) -> tuple[date, str]:
    """The ordered service's day: occurrence[x] or authoredOn when it is a full date, else the evaluation day."""
    span = order_span(ctx)
    if span is not None and span.exact:
        return span.low, span.text
    return ctx.today, ctx.today.isoformat()


@derivation("order_route", params={}, reads=())
def order_route(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """The administration route of the ordered service (IV, IM, nasal, oral, sublingual, other, unknown)."""
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, None, (), "no order")
    route = ctx.group.route
    evidence = tuple(Evidence(o.ref, value=o.route.value, note="route") for o in ctx.group.orders)
    if route.value == "unknown":
        return Fact(fact.name, FactState.UNAVAILABLE, None, evidence, "the order states no route")
    return Fact(fact.name, FactState.PRESENT, route.value, evidence)


@derivation("order_kind", params={}, reads=())
def order_kind(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, None)
    return Fact(fact.name, FactState.PRESENT, ctx.group.kind.value, tuple(Evidence(r) for r in ctx.group.refs))


@derivation("order_reasons", params={"classes": "valuesets", "psychiatric": "valuesets"}, reads=("Condition",))
def order_reasons(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """The indications stated on the draft orders (reasonCode, reasonReference → the referenced code).

    Item codes = the `classes` value sets the reason is in (for `code_in`); field `psychiatric` is True when
    the reason is in any of the `psychiatric` value sets. ABSENT when no order states a reason.
    """
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, ())
    classes = valueset_ids(params["classes"])
    psychiatric = valueset_ids(params["psychiatric"])
    items: list[Item] = []
    known = True
    for order in ctx.group.orders:
        stated, resolved = reasons(ctx, order.resource)
        known = known and resolved
        for concept, holder in stated:
            matched = [vs for vs in classes if ctx.match(vs, [concept])]
            is_psych = bool(matched) or any(ctx.match(vs, [concept]) for vs in psychiatric)
            first = ctx.match(matched[0], [concept]) if matched else None
            items.append(
                Item(
                    Evidence(
                        reference_of(holder),
                        code=first.label() if first else None,
                        display=format_value(concept),
                        note="order reason",
                        path="reasonCode" if holder is order.resource else "code",
                    ),
                    date=ctx.today,
                    fields={"psychiatric": is_psych},
                    codes=frozenset(matched),
                    text_only=first is not None and first.via == "text",
                )
            )
    if items:
        return Fact(fact.name, FactState.PRESENT, tuple(items), tuple(i.evidence for i in items), "", known)
    return Fact(
        fact.name, FactState.ABSENT if known else FactState.UNAVAILABLE, (), (), "no reason on the order", known
    )


@derivation("order_mentions", params={"valuesets": "valuesets"}, reads=())
def order_mentions(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Whether the order (or another draft order signed with it) names one of the value sets — by code or in
    its code text, order details, reason, notes or instructions (read with ConText: "not for KAP" does not
    count; "consider KAP" is undecided)."""
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, ())
    valuesets = valueset_ids(params["valuesets"])
    own = {o.ref for o in ctx.group.orders}
    items: list[Item] = []
    for resource, how in [(o.resource, "this order") for o in ctx.group.orders] + [
        (s, "signed together") for s in ctx.record.draft_orders if reference_of(s) not in own
    ]:
        said = mention(ctx, resource, valuesets, topic=True)
        if said is None or said.said is False:
            continue
        items.append(
            Item(
                Evidence(
                    reference_of(resource),
                    code=said.match.label() if said.match else None,
                    display=said.match.display if said.match else None,
                    note=f"{how}; {said.note()}",
                ),
                date=ctx.today,
                certain=said.said is True,
            )
        )
    return ctx.make_fact(fact.name, items, ())


@derivation("order_has", params={"element": "str"}, reads=())
def order_has(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Whether any draft order of the group carries an element (e.g. `performer`): lets a rule say
    "the requester counts only when no performer is named"."""
    if ctx.group is None:
        return Fact(fact.name, FactState.UNAVAILABLE, ())
    items = [
        Item(Evidence(o.ref, note=f"has {params['element']}"), date=ctx.today)
        for o in ctx.group.orders
        if as_list(o.resource.get(params["element"]))
    ]
    return ctx.make_fact(fact.name, items, ())
