"""The pass/fail table and the coverage summary of `mappings test` (text)."""

from __future__ import annotations

from fhir_mappings.tools.cases import CaseResult, Coverage


def results_text(results: list[CaseResult], *, verbose: bool = False) -> str:
    lines = [f"{'policy':<14} {'case':<48} result"]
    for r in results:
        if r.passed and not verbose:
            continue
        lines.append(f"{r.policy:<14} {r.name:<48} {'pass' if r.passed else 'FAIL'}")
        if r.error:
            lines.append(f"    error: {r.error}")
        if not r.passed and r.description:
            lines.append(f"    {r.description}")
        for m in r.mismatches:
            lines.append(f"    {m.what:<40} expected {m.expected:<14} got {m.got}")
            if m.note:
                lines.append(f"    {'':<40} ({m.note[:160]})")
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed, {len(results)} cases")
    return "\n".join(lines)


def coverage_text(coverage: Coverage, minimum: float | None) -> str:
    covered, total = coverage.totals()
    lines = ["", f"criterion coverage: {covered}/{total} rule branches reached ({coverage.percent:.1f} %)"]
    for policy, criteria in coverage.branches.items():
        counts = coverage.counts[policy]
        reached = sum(1 for cid, bs in criteria.items() for b in bs if counts[cid].get(b, 0))
        size = sum(len(bs) for bs in criteria.values())
        lines.append(f"  {policy}: {reached}/{size}")
        for cid, branches in criteria.items():
            cells = "  ".join(f"{b} {counts[cid].get(b, 0)}" for b in branches)
            lines.append(f"    {cid:<44} {cells}")
    uncovered = coverage.uncovered()
    if uncovered:
        lines.append("uncovered branches:")
        lines.extend(f"  {p} {c}: {b}" for p, c, b in uncovered)
    if minimum is not None:
        verdict = "ok" if coverage.percent >= minimum else "BELOW"
        lines.append(f"minimum coverage {minimum:g} %: {verdict}")
    return "\n".join(lines)
