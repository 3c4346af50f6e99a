"""Text and Markdown renderings of offline decisions and their explanations (JSON is the data itself)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fhir_mappings.model import Decision

_MARK = {"met": "met", "not-met": "not met", "unknown": "unknown"}


def _status(criterion: Mapping[str, Any], kind: str) -> str:
    status = str(criterion["status"])
    if kind == "exclusion":
        return {"met": "HOLDS", "not-met": "clear", "unknown": "unknown"}[status] + (
            " (lifted)" if criterion.get("cleared") or criterion.get("lifted") else ""
        )
    return _MARK[status] + (" (case review)" if criterion.get("caseByCase") or criterion.get("case_by_case") else "")


def _title(decision: Decision) -> str:
    policy = f"{decision.policy.id} ({decision.policy.number})" if decision.policy else "no policy"
    stage = decision.phase or decision.service
    return f"{policy}: {decision.outcome.value}" + (f" [{stage}]" if stage else "")


def _fact_lines(fact: Mapping[str, Any], indent: str) -> list[str]:
    definition = fact.get("definition") or {}
    how = (
        f"derive {definition['derive']}"
        if "derive" in definition
        else f"{definition.get('resource', '?')} in {', '.join(definition.get('valuesets', []))}"
        if definition
        else ""
    )
    head = f"{indent}fact {fact['name']} = {fact['state']}" + (f"  ({how})" if how else "")
    if "value" in fact and fact["value"] not in (None, [], ()):
        head += f": {fact['value']}"
    lines = [head]
    if fact.get("detail"):
        lines.append(f"{indent}  {fact['detail']}")
    for item in fact.get("items", []):
        parts = [item["reference"]]
        for key in ("date", "code", "value", "note"):
            if item.get(key):
                parts.append(str(item[key]))
        lines.append(f"{indent}  - {'  '.join(parts)}")
        if item.get("path"):
            lines.append(f"{indent}      at {item['path']}")
        for key, where in (item.get("paths") or {}).items():
            lines.append(f"{indent}      {key} from {where}")
        for entry in item.get("valueset_entries", []):
            lines.append(f"{indent}      value set {entry['valueset']}: {entry['entry']}")
        fields = item.get("fields") or {}
        if fields:
            shown = ", ".join(f"{k}={v}" for k, v in fields.items())
            lines.append(f"{indent}      fields: {shown[:300]}")
    if fact.get("more_items"):
        lines.append(f"{indent}  … {fact['more_items']} more")
    for ev in fact.get("evidence", []):
        extra = "  ".join(str(ev[k]) for k in ("date", "code", "value", "note") if ev.get(k))
        lines.append(f"{indent}  - {ev['reference']}  {extra}".rstrip())
        if ev.get("path"):
            lines.append(f"{indent}      at {ev['path']}")
    return lines


def _trace_lines(name: str, trace: Mapping[str, Any], indent: str) -> list[str]:
    evidence = f"  [{', '.join(trace['evidence'][:4])}]" if trace.get("evidence") else ""
    lines = [f"{indent}{name}{trace['rule']} → {trace['value']}{evidence}"]
    for part in trace.get("parts", []):
        lines.extend(_trace_lines("", part, indent + "  "))
    return lines


def text(
    decisions: list[Decision],
    explanations: list[Mapping[str, Any]] | None,
    header: Iterable[str],
) -> str:
    lines = list(header)
    if not decisions:
        lines.append("No decision (no card).")
    for i, decision in enumerate(decisions):
        ext = decision.to_extension()
        lines += ["", f"== {_title(decision)}", f"   orders: {', '.join(decision.order_refs)}"]
        if decision.coverage_ref:
            lines.append(f"   coverage: {decision.coverage_ref}" + (f" ({decision.payer})" if decision.payer else ""))
        if decision.program:
            lines.append(f"   program: {decision.program}")
        if decision.headline:
            lines.append(f"   {decision.headline}")
        explained = {c["id"]: c for c in (explanations[i].get("criteria", []) if explanations else [])}
        if explanations:
            explanation = explanations[i]
            route = explanation["route"]
            lines.append(
                f"   route: {route['kind']}"
                + (f", payer {route['payer']}" if route.get("payer") else "")
                + (f", plan {route['plan']}" if route.get("plan") else "")
                + (f" ({route['reason']})" if route.get("reason") else "")
            )
            if "scope" in explanation:
                lines.append(f"   scope rule {explanation['scope']['id']} decided ({explanation['scope']['outcome']})")
            if "phase" in explanation:
                phase = explanation["phase"]
                lines.append(f"   phase: {phase['id']}" + (f" — {phase['note']}" if phase.get("note") else ""))
                for tested in phase.get("tested", []):
                    lines.extend(_trace_lines(f"{tested['id']} when: ", tested["when"], "     "))
        for criterion, result in zip(ext.get("criteria", []), decision.criteria, strict=True):
            status = _status(criterion, criterion["kind"])
            refs = ", ".join(criterion.get("evidence", [])[:4])
            lines.append(f"   {status:<16} {criterion['id']:<38} {result.title}")
            if refs:
                lines.append(f"   {'':<16} evidence: {refs}")
            if result.status.value == "unknown" and result.missing:
                lines.append(f"   {'':<16} ask: {result.missing}")
            if criterion["id"] in explained:
                detail = explained[criterion["id"]]
                lines.append(f"   {'':<16} decided by: {detail.get('branch', '')}")
                for key, trace in detail.get("rules", {}).items():
                    lines.extend(_trace_lines(f"{key}: ", trace, " " * 20))
                for fact in detail.get("facts", []):
                    lines.extend(_fact_lines(fact, " " * 20))
        for note in decision.notes:
            lines.append(f"   note: {note}")
    return "\n".join(lines) + "\n"


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(
    decisions: list[Decision],
    explanations: list[Mapping[str, Any]] | None,
    header: Iterable[str],
) -> str:
    lines = [f"> {h}" if h else "" for h in header]
    if not decisions:
        lines.append("\nNo decision (no card).")
    for i, decision in enumerate(decisions):
        ext = decision.to_extension()
        lines += ["", f"## {_md(_title(decision))}", ""]
        lines.append(
            f"Orders: {', '.join(decision.order_refs)}"
            + (f" · coverage {decision.coverage_ref}" if decision.coverage_ref else "")
        )
        if decision.headline:
            lines += ["", f"**{_md(decision.headline)}**"]
        lines += ["", "| status | criterion | title | evidence | to document |", "|---|---|---|---|---|"]
        for criterion, result in zip(ext.get("criteria", []), decision.criteria, strict=True):
            ask = result.missing if result.status.value == "unknown" else ""
            lines.append(
                f"| {_status(criterion, criterion['kind'])} | `{criterion['id']}` | {_md(result.title)} | "
                f"{_md(', '.join(criterion.get('evidence', [])[:4]))} | {_md(ask)} |"
            )
        if explanations:
            for detail in explanations[i].get("criteria", []):
                lines += [
                    "",
                    f"### `{detail['id']}` — {_md(detail['status'])}",
                    "",
                    f"Decided by: **{detail.get('branch', '')}**",
                    "",
                ]
                lines.append("```")
                for key, trace in detail.get("rules", {}).items():
                    lines.extend(_trace_lines(f"{key}: ", trace, ""))
                for fact in detail.get("facts", []):
                    lines.extend(_fact_lines(fact, ""))
                lines.append("```")
        for note in decision.notes:
            lines += ["", f"- {_md(note)}"]
    return "\n".join(lines) + "\n"
