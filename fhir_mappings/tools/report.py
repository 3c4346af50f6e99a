"""`ketamine-cds report`: a cohort evaluated in parallel, written as one self-contained HTML page.

Worker processes read and evaluate patients (`cohort.read_patient` + `explain.evaluate_patient`) and send back a
small summary per patient; the page is built from those: outcome counts per policy and plan, per-criterion
met / not-met / unknown plots (matplotlib, inline SVG — no JavaScript, no network), the most frequent
documentation-needed reasons, one row per patient linking to its explanation, and — with `--reference` — the
agreement with past human determinations, a confusion matrix and the likely-authorized-but-denied cases first.
"""

from __future__ import annotations

import csv
import html
import io
import multiprocessing
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from fhir_mappings.mappings import Mappings, SiteConfig
from fhir_mappings.model import Outcome
from fhir_mappings.tools import render
from fhir_mappings.tools.cohort import CohortError, PatientRef, list_patients, read_patient
from fhir_mappings.tools.explain import evaluate_patient, explain
from fhir_mappings.tools.records import InputError

# What a reviewer's determination is compared with: the service's outcome read as approve / deny / pend.
PREDICTED = {
    Outcome.LIKELY_AUTHORIZED.value: "approved",
    Outcome.DOCUMENTATION_NEEDED.value: "pended",
    Outcome.CRITERIA_NOT_MET.value: "denied",
    Outcome.BLOCKED.value: "denied",
    Outcome.NOT_COVERED.value: "denied",
}
DETERMINATIONS = ("approved", "denied", "pended")
_ALIASES = {"approve": "approved", "deny": "denied", "pend": "pended", "pending": "pended", "authorized": "approved"}
OUTCOME_ORDER = [o.value for o in Outcome]

_WORKER: dict[str, Any] = {}


# --- workers -----------------------------------------------------------------------------------------------
def _init_worker(mappings_dir: str | None, site_config: str | None, options: dict[str, Any]) -> None:
    if "mappings" not in _WORKER:  # forked workers inherit the parent's loaded mappings
        site = SiteConfig.from_file(site_config) if site_config else None
        _WORKER["mappings"] = Mappings.load(site, mappings_dir)
    _WORKER["options"] = options


def _keep_detail(criterion: Mapping[str, Any], kind: str) -> bool:
    status = criterion["status"]
    return (
        status == "unknown"
        or (kind == "requirement" and status == "not-met")
        or (kind == "exclusion" and status == "met")
    )


def evaluate_ref(ref: PatientRef) -> dict[str, Any]:
    """One patient, evaluated and explained in a worker; a plain dict travels back to the parent."""
    mappings: Mappings = _WORKER["mappings"]
    options = _WORKER["options"]
    try:
        patient = read_patient(ref, mappings, fhir_token=options.get("fhir_token"))
        evaluation = evaluate_patient(
            mappings, patient, as_of=options.get("as_of"), assume=options.get("assume", "auto")
        )
    except (InputError, CohortError) as exc:
        return {"patient": ref.patient_id or Path(ref.key).stem, "error": str(exc), "decisions": []}
    except Exception as exc:  # one unreadable record is a row of the report, not the end of it
        return {
            "patient": ref.patient_id or Path(ref.key).stem,
            "error": f"{type(exc).__name__}: {exc}",
            "decisions": [],
        }
    route = mappings.router.resolve(evaluation.record)
    plan = route.plan.label if route.plan else (route.reason or "—")
    explanations = []
    decisions = []
    for decision in evaluation.decisions:
        detail = explain(mappings, evaluation, decision)
        kinds = {c.id: c.kind.value for c in decision.criteria}
        for c in detail.get("criteria", []):
            if not _keep_detail(c, kinds.get(c["id"], "requirement")):
                c.pop("rules", None)
                c.pop("facts", None)
        explanations.append(detail)
        decisions.append(
            {
                "extension": decision.to_extension(),
                "policy": decision.policy.id if decision.policy else None,
                "outcome": decision.outcome.value,
                "stage": decision.phase or decision.service,
                "plan": plan,
                "headline": decision.headline,
                "criteria": [
                    {"id": c.id, "title": c.title, "kind": c.kind.value, "status": c.status.value, "missing": c.missing}
                    for c in decision.criteria
                ],
            }
        )
    header = [
        f"Patient {patient.patient_id} ({patient.source}), as of {evaluation.record.now.date().isoformat()}",
        *(f"Note: {n}" for n in evaluation.notes),
    ]
    return {
        "patient": patient.patient_id,
        "label": patient.label or patient.patient_id,
        "plan": plan,
        "decisions": decisions,
        "assumed": evaluation.assumed,
        "explanation": render.text(evaluation.decisions, explanations, header),
    }


def evaluate_cohort(
    refs: list[PatientRef],
    *,
    mappings: Mappings,
    mappings_dir: str | None,
    site_config: str | None,
    options: dict[str, Any],
    workers: int | None,
    progress: bool,
) -> list[dict[str, Any]]:
    workers = max(1, min(workers or os.cpu_count() or 1, len(refs) or 1))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    _WORKER["mappings"] = mappings  # inherited by forked workers: no second load
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(refs), unit="patient", desc="evaluating", leave=False)
    results: list[dict[str, Any]] = []
    try:
        if workers == 1:
            _init_worker(mappings_dir, site_config, options)
            for ref in refs:
                results.append(evaluate_ref(ref))
                if bar:
                    bar.update()
        else:
            with ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(mappings_dir, site_config, options),
            ) as pool:
                futures = [pool.submit(evaluate_ref, ref) for ref in refs]
                for future in as_completed(futures):
                    results.append(future.result())
                    if bar:
                        bar.update()
    finally:
        if bar:
            bar.close()
    return sorted(results, key=lambda r: str(r.get("label") or r["patient"]))


# --- reference determinations ---------------------------------------------------------------------------------
def read_reference(path: str | Path) -> dict[tuple[str, str], str]:
    """(patient id, policy) -> approved | denied | pended, from a CSV with or without a header row."""
    text = Path(path).read_text(encoding="utf-8-sig")
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        raise CohortError(f"{path}: empty reference file")
    header = [c.strip().lower() for c in rows[0]]
    if any("patient" in h for h in header):
        rows = rows[1:]
        pi = next(i for i, h in enumerate(header) if "patient" in h)
        po = next((i for i, h in enumerate(header) if "policy" in h), 1)
        de = next((i for i, h in enumerate(header) if h in ("determination", "decision", "outcome", "status")), 2)
    else:
        pi, po, de = 0, 1, 2
    reference: dict[tuple[str, str], str] = {}
    for number, row in enumerate(rows, 2 if header else 1):
        if len(row) <= max(pi, po, de):
            raise CohortError(f"{path}:{number}: expected patient id, policy and determination")
        value = row[de].strip().lower()
        value = _ALIASES.get(value, value)
        if value not in DETERMINATIONS:
            raise CohortError(f"{path}:{number}: determination {row[de]!r} is not approved, denied or pended")
        reference[(row[pi].strip().removeprefix("Patient/"), row[po].strip())] = value
    return reference


def agreement(results: list[dict[str, Any]], reference: Mapping[tuple[str, str], str]) -> dict[str, Any]:
    matrix: dict[str, Counter[str]] = {d: Counter() for d in DETERMINATIONS}
    compared = agreed = 0
    flagged: list[dict[str, Any]] = []
    not_comparable = 0
    missing = 0
    for result in results:
        for d in result["decisions"]:
            key = (result["patient"], d["policy"] or "")
            truth = reference.get(key)
            if truth is None:
                missing += 1
                continue
            matrix[truth][d["outcome"]] += 1
            predicted = PREDICTED.get(d["outcome"])
            if predicted is None:
                not_comparable += 1
                continue
            compared += 1
            agreed += predicted == truth
            if d["outcome"] == Outcome.LIKELY_AUTHORIZED.value and truth == "denied":
                flagged.append({"patient": result["patient"], "label": result.get("label"), "policy": d["policy"]})
    decided = {(r["patient"], d["policy"] or "") for r in results for d in r["decisions"]}
    return {
        "compared": compared,
        "agreed": agreed,
        "percent": round(100 * agreed / compared, 1) if compared else None,
        "matrix": {truth: dict(counts) for truth, counts in matrix.items()},
        "likely_authorized_but_denied": flagged,
        "not_comparable": not_comparable,
        "without_reference": missing,
        "reference_without_decision": len(set(reference) - decided),
    }


# --- plots ---------------------------------------------------------------------------------------------------------
def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "ketamine-cds", "font.size": 9})
    import matplotlib.pyplot as plt

    return plt


def criterion_plot(policy: str, counts: Mapping[str, Counter[str]], kinds: Mapping[str, str]) -> str:
    """A horizontal stacked bar per criterion: fulfilled (a requirement met, an exclusion clear), failed (a
    requirement not met, an exclusion that holds) and unknown."""
    plt = _pyplot()
    ids = list(counts)
    fig, ax = plt.subplots(figsize=(9, max(2.0, 0.28 * len(ids) + 1.0)))
    left = [0] * len(ids)

    def share(cid: str, what: str) -> int:
        good, bad = ("not-met", "met") if kinds[cid] == "exclusion" else ("met", "not-met")
        return counts[cid].get({"fulfilled": good, "failed": bad, "unknown": "unknown"}[what], 0)

    for what, label, color in (
        ("fulfilled", "met (requirement) / clear (exclusion)", "#2e7d32"),
        ("failed", "not met (requirement) / holds (exclusion)", "#c62828"),
        ("unknown", "unknown: documentation needed", "#f9a825"),
    ):
        values = [share(cid, what) for cid in ids]
        ax.barh(ids, values, left=left, color=color, label=label, edgecolor="white", linewidth=0.5)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("decisions")
    ax.set_title(f"{policy}: criterion status across the cohort")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    svg = _svg(fig)
    plt.close(fig)
    return svg


def outcome_plot(table: Mapping[tuple[str, str], Counter[str]]) -> str:
    plt = _pyplot()
    keys = list(table)
    fig, ax = plt.subplots(figsize=(9, max(1.6, 0.45 * len(keys) + 1.0)))
    left = [0] * len(keys)
    palette = {
        "likely-authorized": "#2e7d32",
        "documentation-needed": "#f9a825",
        "criteria-not-met": "#c62828",
        "blocked": "#6a1b9a",
        "not-covered": "#455a64",
        "plan-variation": "#1565c0",
        "not-applicable": "#90a4ae",
        "no-policy": "#bdbdbd",
    }
    labels = [f"{p} / {plan}" for p, plan in keys]
    for outcome in OUTCOME_ORDER:
        values = [table[k].get(outcome, 0) for k in keys]
        if not any(values):
            continue
        ax.barh(labels, values, left=left, color=palette.get(outcome, "#999"), label=outcome, edgecolor="white")
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("decisions")
    ax.set_title("Outcomes per policy and plan")
    ax.legend(loc="lower right", fontsize=8)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)
    svg = _svg(fig)
    plt.close(fig)
    return svg


# --- the page ------------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _anchor(patient: str) -> str:
    return "p-" + re.sub(r"[^A-Za-z0-9_-]", "-", patient)


def _link(patient: str, label: str | None) -> str:
    return f"<a href='#{_anchor(patient)}'>{_e(label or patient)}</a>"


def _heads(*names: str) -> str:
    return "<tr>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222;max-width:1200px}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}
th{background:#f5f5f5} td.n{text-align:right} .meta{color:#555} .warn{background:#fff3e0}
.flag{background:#ffebee;font-weight:600}
pre{background:#fafafa;border:1px solid #eee;padding:.6rem;overflow-x:auto;font-size:.78rem}
.outcome-likely-authorized{color:#2e7d32;font-weight:600}
.outcome-criteria-not-met,.outcome-blocked{color:#c62828;font-weight:600}
.outcome-documentation-needed{color:#a66f00;font-weight:600} section.patient{margin-top:1.2rem}
svg{max-width:100%;height:auto}
"""


def build_html(
    results: list[dict[str, Any]],
    *,
    source: str,
    mapping_version: str,
    as_of: date | None,
    reference: Mapping[tuple[str, str], str] | None,
    site_config: str | None,
) -> tuple[str, dict[str, Any]]:
    decisions = [(r, d) for r in results for d in r["decisions"]]
    outcome_table: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    criterion_counts: dict[str, dict[str, Counter[str]]] = defaultdict(dict)
    titles: dict[str, str] = {}
    kinds: dict[str, str] = {}
    reasons: Counter[tuple[str, str]] = Counter()
    asks: dict[tuple[str, str], str] = {}
    for _, d in decisions:
        outcome_table[(d["policy"] or "no policy", d["plan"])][d["outcome"]] += 1
        if d["policy"]:
            for c in d["criteria"]:
                criterion_counts[d["policy"]].setdefault(c["id"], Counter())[c["status"]] += 1
                titles[c["id"]], kinds[c["id"]] = c["title"], c["kind"]
        if d["outcome"] == Outcome.DOCUMENTATION_NEEDED.value:
            for c in d["criteria"]:
                if c["status"] == "unknown":
                    key = (d["policy"] or "", c["id"])
                    reasons[key] += 1
                    asks.setdefault(key, c["missing"] or c["title"])
    agree = agreement(results, reference) if reference is not None else None
    flagged = {(f["patient"], f["policy"]) for f in agree["likely_authorized_but_denied"]} if agree else set()

    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>ketamine-cds cohort report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>ketamine-cds cohort report</h1>",
        "<p class='meta'>"
        f"Source: <code>{_e(source)}</code> · {len(results)} patients · {len(decisions)} decisions · "
        f"mapping set <code id='mapping-version'>{_e(mapping_version)}</code>"
        + (f" · site configuration <code>{_e(site_config)}</code>" if site_config else "")
        + f" · evaluated as of {_e(as_of.isoformat() if as_of else 'each record’s date')}"
        + f" · written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}</p>",
    ]
    errors = [r for r in results if r.get("error")]
    if errors:
        parts.append(
            f"<p class='warn'>{len(errors)} patient(s) could not be read: "
            + "; ".join(_e(r["error"]) for r in errors[:10])
            + "</p>"
        )

    if agree is not None:
        parts.append("<h2 id='reference'>Agreement with past determinations</h2>")
        pct = "—" if agree["percent"] is None else f"{agree['percent']} %"
        parts.append(
            f"<p id='agreement'>Agreement: <strong>{pct}</strong> of {agree['compared']} comparable decisions "
            "(likely-authorized ≈ approved, documentation-needed ≈ pended, "
            "criteria-not-met / blocked / not-covered ≈ denied). "
            f"{agree['not_comparable']} decision(s) not comparable (plan variation, not applicable, no policy); "
            f"{agree['without_reference']} without a reference determination; "
            f"{agree['reference_without_decision']} reference row(s) with no decision.</p>"
        )
        if agree["likely_authorized_but_denied"]:
            parts.append("<h3 id='la-denied'>Likely-authorized here, denied by the reviewer</h3><ul class='flag'>")
            for f in agree["likely_authorized_but_denied"]:
                parts.append(f"<li>{_link(f['patient'], f['label'])} — {_e(f['policy'])}</li>")
            parts.append("</ul>")
        else:
            parts.append("<p id='la-denied'>No decision said likely-authorized where the reviewer denied.</p>")
        outcomes_seen = [o for o in OUTCOME_ORDER if any(agree["matrix"][t].get(o) for t in DETERMINATIONS)]
        parts.append(
            "<table id='confusion'><tr><th>reviewer \\ service</th>"
            + "".join(f"<th>{_e(o)}</th>" for o in outcomes_seen)
            + "</tr>"
        )
        for truth in DETERMINATIONS:
            cells = "".join(f"<td class='n'>{agree['matrix'][truth].get(o, 0)}</td>" for o in outcomes_seen)
            parts.append(f"<tr><th>{truth}</th>{cells}</tr>")
        parts.append("</table>")

    parts.append("<h2 id='outcomes'>Outcomes per policy and plan</h2>")
    seen = [o for o in OUTCOME_ORDER if any(c.get(o) for c in outcome_table.values())]
    parts.append(
        "<table id='outcome-table'><tr><th>policy</th><th>plan</th>"
        + "".join(f"<th>{_e(o)}</th>" for o in seen)
        + "<th>total</th></tr>"
    )
    for (policy, plan), counts in sorted(outcome_table.items()):
        cells = "".join(f"<td class='n'>{counts.get(o, 0)}</td>" for o in seen)
        parts.append(
            f"<tr><td>{_e(policy)}</td><td>{_e(plan)}</td>{cells}<td class='n'>{sum(counts.values())}</td></tr>"
        )
    parts.append("</table>")
    if outcome_table:
        parts.append(
            f"<figure class='plot' id='outcome-plot'>{outcome_plot(dict(sorted(outcome_table.items())))}</figure>"
        )

    parts.append("<h2 id='criteria'>How often each criterion is met, not met or unknown</h2>")
    for policy, counts in sorted(criterion_counts.items()):
        parts.append(
            f"<h3>{_e(policy)}</h3><figure class='plot criterion-plot'>{criterion_plot(policy, counts, kinds)}</figure>"
        )
        parts.append(
            "<table class='criterion-table'>" + _heads("criterion", "kind", "met / holds", "not met / clear", "unknown")
        )
        for cid, c in counts.items():
            parts.append(
                f"<tr><td title='{_e(titles[cid])}'><code>{_e(cid)}</code></td><td>{_e(kinds[cid])}</td>"
                + "".join(f"<td class='n'>{c.get(k, 0)}</td>" for k in ("met", "not-met", "unknown"))
                + "</tr>"
            )
        parts.append("</table>")

    parts.append("<h2 id='documentation'>Top reasons for documentation-needed</h2>")
    total_dn = sum(1 for _, d in decisions if d["outcome"] == Outcome.DOCUMENTATION_NEEDED.value)
    if reasons:
        parts.append("<table id='reasons'>" + _heads("policy", "criterion", "decisions", "share", "what to document"))
        for (policy, cid), n in reasons.most_common(15):
            parts.append(
                f"<tr><td>{_e(policy)}</td><td><code>{_e(cid)}</code> {_e(titles.get(cid, ''))}</td>"
                f"<td class='n'>{n}</td>"
                f"<td class='n'>{round(100 * n / total_dn)} %</td><td>{_e(asks[(policy, cid)])}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>No documentation-needed decision.</p>")

    parts.append("<h2 id='patients'>Patients</h2>")
    head = "<tr><th>patient</th><th>policy</th><th>plan</th><th>outcome</th><th>phase / service</th><th>unknown</th>"
    head += "<th>reviewer</th>" if reference is not None else ""
    parts.append(f"<table id='patient-table'>{head}</tr>")
    rows = [(r, d) for r in results for d in (r["decisions"] or [None])]
    rows.sort(
        key=lambda rd: (0 if rd[1] and (rd[0]["patient"], rd[1]["policy"]) in flagged else 1, str(rd[0].get("label")))
    )
    for r, d in rows:
        link = f"<a href='#{_anchor(r['patient'])}'>{_e(r.get('label') or r['patient'])}</a>"
        if d is None:
            parts.append(
                f"<tr><td>{link}</td><td colspan='5'>{_e(r.get('error') or 'no decision (no card)')}</td>"
                + ("<td></td>" if reference is not None else "")
                + "</tr>"
            )
            continue
        unknown = sum(c["status"] == "unknown" for c in d["criteria"])
        css = " class='flag'" if (r["patient"], d["policy"]) in flagged else ""
        truth = reference.get((r["patient"], d["policy"] or "")) if reference is not None else None
        parts.append(
            f"<tr{css}><td>{link}</td><td>{_e(d['policy'])}</td><td>{_e(d['plan'])}</td>"
            f"<td class='outcome-{_e(d['outcome'])}'>{_e(d['outcome'])}</td><td>{_e(d['stage'])}</td>"
            f"<td class='n'>{unknown}</td>"
            + (f"<td>{_e(truth or '—')}</td>" if reference is not None else "")
            + "</tr>"
        )
    parts.append("</table>")

    parts.append("<h2 id='explanations'>Explanations</h2>")
    for r in results:
        parts.append(
            f"<section class='patient' id='{_anchor(r['patient'])}'><h3>{_e(r.get('label') or r['patient'])}</h3>"
            f"<pre>{_e(r.get('explanation') or r.get('error') or '')}</pre>"
            "<p><a href='#patients'>back to the table</a></p></section>"
        )
    parts.append("</body></html>")
    outcomes = Counter(d["outcome"] for _, d in decisions)
    summary: dict[str, Any] = {
        "patients": len(results),
        "decisions": len(decisions),
        "errors": len(errors),
        "outcomes": dict(outcomes),
        "mapping_version": mapping_version,
    }
    if agree is not None:
        summary["agreement"] = agree
    return "\n".join(parts), summary


def run_report(
    source: str,
    *,
    out: Path,
    mappings: Mappings,
    mappings_dir: str | None = None,
    site_config: str | None = None,
    reference: str | None = None,
    as_of: date | None = None,
    assume: str = "auto",
    workers: int | None = None,
    fhir_token: str | None = None,
    max_patients: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    refs = list_patients(source, fhir_token=fhir_token, max_patients=max_patients)
    if not refs:
        raise CohortError(f"{source}: no patients found")
    determinations = read_reference(reference) if reference else None
    options = {"as_of": as_of, "assume": assume, "fhir_token": fhir_token}
    results = evaluate_cohort(
        refs,
        mappings=mappings,
        mappings_dir=mappings_dir,
        site_config=site_config,
        options=options,
        workers=workers,
        progress=progress,
    )
    page, summary = build_html(
        results,
        source=source,
        mapping_version=mappings.version,
        as_of=as_of,
        reference=determinations,
        site_config=site_config,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    summary["out"] = str(out)
    return summary
