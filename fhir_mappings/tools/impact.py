"""`mappings impact`: the same patients decided by two mapping sets, and what changed — the review artefact of a
mapping change.

"Before" is `--against`: a directory with the mapping layout, or a git revision of this repository whose
`fhir_mappings/` files are extracted with `git archive` into a temporary directory. "After" is `--mappings DIR`
or the mappings in use (the working tree). Patients: the policy fixture cases, the sandbox stories (with the
sandbox's site configuration unless one is given), and any cohort.
"""

from __future__ import annotations

import importlib.util
import io
import multiprocessing
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_mappings.mappings import MAPPINGS_DIR, MappingError, Mappings, SiteConfig
from fhir_mappings.model import Decision
from fhir_mappings.tools.cases import CaseError, Engines, branch_of, case_files, evaluate_case
from fhir_mappings.tools.records import InputError, load_patient


class ImpactError(ValueError):
    """A mapping set cannot be had (unknown revision, invalid set); the message says which and why."""


@dataclass(frozen=True)
class Change:
    patient: str  # "mgbhp-031/phq9-29-days", a story id, a cohort patient id
    source: str  # "case" | "story" | "cohort"
    policy: str
    order: str
    before: str  # outcome (+ phase/service), or "—" when there was no decision
    after: str
    criteria: tuple[tuple[str, str, str], ...]  # (criterion id, before branch, after branch)

    def to_json(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "source": self.source,
            "policy": self.policy,
            "order": self.order,
            "before": self.before,
            "after": self.after,
            "criteria": [{"id": c, "before": b, "after": a} for c, b, a in self.criteria],
        }


@dataclass
class ImpactReport:
    before: str  # what was compared: revision or directory, and mapping-set versions
    after: str
    before_version: str
    after_version: str
    evaluated: dict[str, int] = field(default_factory=dict)  # source -> patients
    changes: list[Change] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "before": {"mappings": self.before, "version": self.before_version},
            "after": {"mappings": self.after, "version": self.after_version},
            "evaluated": self.evaluated,
            "changed": len(self.changes),
            "changes": [c.to_json() for c in self.changes],
            "errors": self.errors,
        }

    def _summary(self) -> str:
        names = {"case": ("fixture case", "fixture cases"), "story": ("sandbox story", "sandbox stories")}
        names["cohort"] = ("cohort patient", "cohort patients")
        counts = ", ".join(f"{n} {names[k][n != 1]}" for k, n in self.evaluated.items())
        return f"{len(self.changes)} decision(s) changed; evaluated {counts or 'nothing'}"

    def text(self) -> str:
        lines = [
            f"before: {self.before} ({self.before_version})",
            f"after:  {self.after} ({self.after_version})",
            self._summary(),
        ]
        if self.changes:
            width = max(len(c.patient) for c in self.changes)
            outcome = max(len(c.before + c.after) + 4 for c in self.changes)
            lines.append("")
            lines.append(
                f"{'patient':<{width}}  {'policy':<12} {'outcome before -> after':<{outcome}}  criteria changed"
            )
        for c in self.changes:
            crit = "; ".join(f"{cid} {b} -> {a}" for cid, b, a in c.criteria) or "-"
            lines.append(f"{c.patient:<{width}}  {c.policy:<12} {c.before + ' -> ' + c.after:<{outcome}}  {crit}")
        lines.extend(f"error: {e}" for e in self.errors)
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        lines = [
            "## Mapping change impact",
            "",
            f"- before: `{self.before}` ({self.before_version})",
            f"- after: `{self.after}` ({self.after_version})",
            f"- {self._summary()}",
            "",
        ]
        if self.changes:
            lines += [
                "| patient | source | policy | outcome before → after | criteria changed |",
                "|---|---|---|---|---|",
            ]
            for c in self.changes:
                crit = "<br>".join(f"`{cid}` {b} → {a}" for cid, b, a in c.criteria) or "—"
                lines.append(f"| {c.patient} | {c.source} | {c.policy} | {c.before} → {c.after} | {crit} |")
        lines.extend(f"\n> error: {e}" for e in self.errors)
        return "\n".join(lines) + "\n"


# --- the two mapping sets ----------------------------------------------------------------------------------
def repository_root(start: Path = MAPPINGS_DIR) -> Path:
    try:
        out = subprocess.run(
            ["git", "-C", str(start), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        raise ImpactError(f"{start} is not inside a git repository: give --against a directory instead") from None
    return Path(out.stdout.strip())


def extract_revision(revision: str, into: Path, mappings_dir: Path = MAPPINGS_DIR) -> Path:
    """The mapping directory `mappings_dir` as it was in a git revision of its repository, extracted into `into`
    (`git archive`); returns the extracted mapping directory."""
    repo = repository_root(mappings_dir)
    subdir = mappings_dir.resolve().relative_to(repo.resolve()).as_posix()
    try:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", revision, subdir],
            capture_output=True,
            check=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        reason = exc.stderr.decode(errors="replace").strip().splitlines()
        raise ImpactError(f"git revision {revision!r}: {reason[-1] if reason else 'unknown revision'}") from None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / subdir


def _load(directory: Path, site: Path | None, label: str) -> Mappings:
    try:
        return Mappings.load(SiteConfig.from_file(site) if site else None, directory)
    except MappingError as exc:
        raise ImpactError(f"{label}: the mapping set does not load: {str(exc).splitlines()[0]}") from None


# --- comparing decisions --------------------------------------------------------------------------------------
def _summary(decision: Decision | None) -> str:
    if decision is None:
        return "—"
    stage = decision.phase or decision.service
    return decision.outcome.value + (f" ({stage})" if stage else "")


def _branches(decision: Decision | None) -> dict[str, str]:
    return {c.id: branch_of(c) for c in decision.criteria} if decision else {}


def compare(patient: str, source: str, before: list[Decision | None], after: list[Decision | None]) -> list[Change]:
    """Changes between two decision lists, matched by (policy, orders)."""

    def key(d: Decision) -> tuple[str, tuple[str, ...]]:
        return (d.policy.id if d.policy else "—", d.order_refs)

    old = {key(d): d for d in before if d is not None}
    new = {key(d): d for d in after if d is not None}
    changes = []
    for k in [*old, *(k for k in new if k not in old)]:
        b, a = old.get(k), new.get(k)
        bb, ab = _branches(b), _branches(a)
        criteria = tuple(
            (cid, bb.get(cid, "—"), ab.get(cid, "—"))
            for cid in [*bb, *(c for c in ab if c not in bb)]
            if bb.get(cid) != ab.get(cid)
        )
        if _summary(b) != _summary(a) or criteria:
            changes.append(Change(patient, source, k[0], ", ".join(k[1]), _summary(b), _summary(a), criteria))
    return changes


def stories_dir() -> Path | None:
    spec = importlib.util.find_spec("sandbox")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "patients"
    return folder if folder.is_dir() else None


_STATE: dict[str, Any] = {}  # what worker processes evaluate with (inherited by fork)


def _run_job(job: tuple[Any, ...]) -> tuple[str, list[Change], str | None]:
    """One patient decided by both mapping sets: (source, changes, error)."""
    from fhir_mappings.tools.cohort import CohortError, read_patient
    from fhir_mappings.tools.explain import evaluate_patient

    kind = job[0]
    try:
        if kind == "case":
            _, name, targets = job
            decisions = [
                [evaluate_case(target, engines.for_folder(target.parent)).decision]
                for engines, target in zip(_STATE["engines"], targets, strict=True)
            ]
            return "case", compare(name, "case", decisions[0], decisions[1]), None
        if kind == "story":
            _, path = job
            before, after = _STATE["story_sets"]
            patient = load_patient(path)
            b = evaluate_patient(before, patient, as_of=_STATE["as_of"]).decisions
            a = evaluate_patient(after, load_patient(path), as_of=_STATE["as_of"]).decisions
            return "story", compare(patient.label, "story", list(b), list(a)), None
        _, ref = job
        before, after = _STATE["sets"]
        patient = read_patient(ref, after, fhir_token=_STATE["fhir_token"])
        b = evaluate_patient(before, patient, as_of=_STATE["as_of"]).decisions
        a = evaluate_patient(after, patient, as_of=_STATE["as_of"]).decisions
        return "cohort", compare(patient.label or patient.patient_id, "cohort", list(b), list(a)), None
    except (CaseError, MappingError, KeyError, InputError, CohortError) as exc:
        label = job[1] if kind == "case" else (job[1].stem if kind == "story" else job[1].key)
        return kind, [], f"{kind} {label}: {exc}"


def _run_jobs(jobs: list[tuple[Any, ...]], workers: int | None) -> list[tuple[str, list[Change], str | None]]:
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_run_job(job) for job in jobs]
    context = multiprocessing.get_context("fork")  # workers inherit the loaded mapping sets
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_run_job, jobs, chunksize=max(1, len(jobs) // (workers * 4))))


def run_impact(
    *,
    against: str,
    mappings_dir: str | None = None,
    site_config: str | None = None,
    cohorts: Iterable[str] = (),
    include_cases: bool = True,
    include_stories: bool = True,
    fhir_token: str | None = None,
    as_of: Any = None,
    only: Iterable[str] = (),
    workers: int | None = None,
) -> ImpactReport:
    from fhir_mappings.tools.cohort import CohortError, list_patients

    filters = tuple(only)

    def wanted(name: str) -> bool:
        return not filters or any(f in name for f in filters)

    after_dir = Path(mappings_dir).resolve() if mappings_dir else MAPPINGS_DIR
    site = Path(site_config) if site_config else None
    with tempfile.TemporaryDirectory(prefix="ketamine-cds-impact-") as tmp:
        if Path(against).is_dir():
            before_dir, before_label = Path(against).resolve(), str(against)
        else:
            before_dir, before_label = extract_revision(against, Path(tmp), after_dir), f"git {against}"
        after_label = str(mappings_dir) if mappings_dir else "working tree"
        before = _load(before_dir, site, before_label)
        after = _load(after_dir, site, after_label)
        report = ImpactReport(before_label, after_label, before.version, after.version)
        _STATE.update(sets=(before, after), as_of=as_of, fhir_token=fhir_token)
        jobs: list[tuple[Any, ...]] = []

        if include_cases:
            # Cases keep their own site configuration (a folder's site.yaml), as `mappings test` runs them.
            reuse = site is None  # the sets just loaded are what cases without a site.yaml run with
            engines = (Engines(before_dir, before if reuse else None), Engines(after_dir, after if reuse else None))
            paths = {p.relative_to(after_dir): p for p in case_files(after_dir)}
            for p in case_files(before_dir):
                paths.setdefault(p.relative_to(before_dir), p)
            for rel, path in sorted(paths.items()):
                name = f"{path.parent.name.removesuffix('.cases')}/{path.stem}"
                if not wanted(name):
                    continue
                targets = tuple(base / rel if (base / rel).is_file() else path for base in (before_dir, after_dir))
                for engine, target in zip(engines, targets, strict=True):
                    try:
                        engine.for_folder(target.parent)  # load each folder's set once, before the workers fork
                    except MappingError as exc:
                        raise ImpactError(f"{target.parent}: the mapping set does not load: {exc}") from None
                jobs.append(("case", name, targets))
            _STATE["engines"] = engines

        if include_stories and (folder := stories_dir()) is not None:
            story_site = site or (folder.parent / "site-config.yaml")
            old_s = before if site else _load(before_dir, story_site, before_label)
            new_s = after if site else _load(after_dir, story_site, after_label)
            _STATE["story_sets"] = (old_s, new_s)
            jobs += [("story", path) for path in sorted(folder.glob("*.json")) if wanted(path.stem)]

        for source in cohorts:
            try:
                refs = list_patients(source, fhir_token=fhir_token)
            except CohortError as exc:
                report.errors.append(f"cohort {source}: {exc}")
                continue
            jobs += [("cohort", ref) for ref in refs if wanted(ref.patient_id or Path(ref.key).stem)]

        for kind in dict.fromkeys(job[0] for job in jobs):
            report.evaluated[kind] = 0
        for kind, changes, error in _run_jobs(jobs, workers):
            if error is not None:
                report.errors.append(error)
                continue
            report.evaluated[kind] += 1
            report.changes += changes
    return report
