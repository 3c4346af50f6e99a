"""`mappings test` (fixture cases, branch coverage) and `mappings impact` (what a mapping change does)."""

from __future__ import annotations

import functools
import json
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from fhir_mappings.mappings import MAPPINGS_DIR, Mappings, SiteConfig, load_engine
from fhir_mappings.record import PatientRecord
from fhir_mappings.tools.cases import Engines, build_case, case_files
from fhir_mappings.tools.explain import evaluate_patient
from fhir_mappings.tools.records import build_record, evaluation_time, load_patient
from tests.tools.conftest import SANDBOX_SITE, STORIES, copy_mappings, replace_once, run_cli, run_json


@pytest.fixture(scope="module")
def with_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_mappings(tmp_path_factory.mktemp("cases") / "mappings", with_cases=True)


# --- mappings test -----------------------------------------------------------------------------------------
def test_the_shipped_cases_pass_and_coverage_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(capsys, "mappings", "test", "--format", "json")
    assert code == 0
    assert doc["failed"] == 0  # type: ignore[index]
    assert doc["passed"] == len(case_files()) > 100  # type: ignore[index]
    coverage = doc["coverage"]  # type: ignore[index]
    assert set(coverage["criteria"]) == {"mgbhp-031", "uuhp-mp-054"}
    assert 0 < coverage["covered"] <= coverage["total"]
    age = coverage["criteria"]["mgbhp-031"]["initial-age"]
    assert set(age) == {"met", "not-met", "unknown"} and all(n > 0 for n in age.values())
    assert coverage["criteria"]["mgbhp-031"]["exclusion-8-aneurysm-avm"]["lifted"] > 0
    assert coverage["criteria"]["mgbhp-031"]["initial-1-unipolar-mdd"]["case-by-case"] > 0
    assert coverage["criteria"]["uuhp-mp-054"]["ketamine-for-kap-not-covered"]["applies"] > 0
    listed = {(u["policy"], u["criterion"], u["branch"]) for u in coverage["uncovered"]}
    counted = {
        (p, c, b)
        for p, crit in coverage["criteria"].items()
        for c, branches in crit.items()
        for b, n in branches.items()
        if n == 0
    }
    assert listed == counted


def test_a_failing_case_shows_expected_and_got_without_traceback(
    with_cases: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = with_cases / "policies" / "mgbhp-031.cases" / "age-17.json"
    original = case.read_text()
    spec = json.loads(original)
    spec["expect"]["outcome"] = "likely-authorized"
    spec["expect"]["criteria"]["initial-age"] = "met"
    case.write_text(json.dumps(spec))
    broken = with_cases / "policies" / "mgbhp-031.cases" / "zz-broken-patch.json"
    broken.write_text(
        json.dumps(
            {
                "description": "patches a resource the base lacks",
                "set": [{"ref": "Observation/none", "path": "status", "value": "final"}],
                "expect": {"outcome": "likely-authorized"},
            }
        )
    )
    try:
        code, out, err = run_cli(
            capsys, "mappings", "test", str(with_cases), "--only", "mgbhp-031/age-17", "--only", "zz-broken"
        )
        assert code == 1
        assert "Traceback" not in out + err
        lines = out.splitlines()
        assert any(
            line.startswith("mgbhp-031") and "age-17" in line and line.rstrip().endswith("FAIL") for line in lines
        )
        outcome = next(line for line in lines if line.strip().startswith("outcome"))
        assert "expected likely-authorized" in outcome and "got criteria-not-met" in outcome
        age = next(line for line in lines if line.strip().startswith("initial-age"))
        assert "expected met" in age and "got not-met" in age
        assert any("error: CaseError" in line and "does not fit the base patient" in line for line in lines)
        assert "1 passed" not in out and "0 passed, 2 failed, 2 cases" in out
    finally:
        case.write_text(original)
        broken.unlink()


def test_min_coverage_fails_below_the_threshold(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "mappings", "test", "--only", "mgbhp-031/age-1", "--min-coverage", "99")
    assert code == 1 and "minimum coverage 99 %: BELOW" in out
    code, out, _ = run_cli(capsys, "mappings", "test", "--only", "mgbhp-031/age-1", "--min-coverage", "1")
    assert code == 0 and "minimum coverage 1 %: ok" in out


def test_adding_a_case_file_covers_a_branch(with_cases: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def uncovered() -> set[tuple[str, str, str]]:
        code, doc = run_json(capsys, "mappings", "test", str(with_cases), "--only", "mgbhp-031/", "--format", "json")
        assert code == 0
        return {(u["policy"], u["criterion"], u["branch"]) for u in doc["coverage"]["uncovered"]}  # type: ignore[index]

    branch = ("mgbhp-031", "exclusion-3-dementia", "unknown")
    new = with_cases / "policies" / "mgbhp-031.cases" / "conditions-unavailable.json"
    new.unlink(missing_ok=True)  # the shipped case that reaches the branch: without it the branch is uncovered
    assert branch in uncovered()
    new.write_text(
        json.dumps(
            {
                "description": "No Condition could be read: the diagnoses and exclusions that need them are unknown.",
                "unavailable": ["Condition"],
                "expect": {"outcome": "documentation-needed", "criteria": {"exclusion-3-dementia": "unknown"}},
            }
        )
    )
    try:
        assert branch not in uncovered()
    finally:
        new.unlink()


# --- mappings impact --------------------------------------------------------------------------------------
def _phq9_in_window(record: PatientRecord, low: float, high: float, days: int = 30) -> tuple[bool, bool]:
    """(a final PHQ-9 total in [low, high) within the window, one >= high) — read straight from the resources."""
    in_band = above = False
    today = record.now.date()
    for obs in record.of_type("Observation"):
        codings = (obs.get("code") or {}).get("coding") or []
        if not any(c.get("code") == "44261-6" for c in codings) or obs.get("status") not in (
            "final",
            "amended",
            "corrected",
        ):
            continue
        when = obs.get("effectiveDateTime") or (obs.get("effectivePeriod") or {}).get("start") or obs.get("issued")
        value = (obs.get("valueQuantity") or {}).get("value", obs.get("valueInteger"))
        if not isinstance(when, str) or not isinstance(value, int | float):
            continue
        age = (today - _date(when)).days
        if age > days:
            continue
        in_band |= low <= value < high
        above |= value >= high
    return in_band, above


def _date(text: str) -> Any:
    from fhir_mappings.facts import parse_fhir_date

    return parse_fhir_date(text)


def _other_scales(record: PatientRecord) -> bool:
    """Any HAM-D / MADRS / QIDS-SR16 total on record (each could make severity met on its own)."""
    registry = load_engine().registry
    sets = [registry.get(v) for v in ("obs_hamd_total", "obs_madrs_total", "obs_qids_sr16_total")]
    return any(vs.match_concept(obs.get("code")) for obs in record.of_type("Observation") for vs in sets)


@functools.cache
def expected_phq9_changes() -> set[str]:
    """Who changes when phq9_severe goes 15 -> 20: initial-phase decisions whose only severe score is a PHQ-9 of
    15-19 in the last 30 days. Cases and sandbox stories; computed from the records, not by the impact tool."""
    changed = set()
    engines = Engines()
    for path in case_files():
        if not path.parent.name.startswith("mgbhp-031"):
            continue
        case, record, _ = build_case(path, engines.for_folder(path.parent))
        in_band, above = _phq9_in_window(record, 15, 20)
        initial = case["expect"].get("phase") == "initial"  # the shipped cases pass, so this is the phase decided
        if initial and in_band and not above and not _other_scales(record):
            changed.add(f"mgbhp-031/{path.stem}")
    stories = Mappings.load(SiteConfig.from_file(SANDBOX_SITE))
    for path in sorted(STORIES.glob("*.json")):
        patient = load_patient(path)
        decisions = evaluate_patient(stories, patient).decisions
        record = build_record(patient, stories, evaluation_time(patient.as_of), patient.draft_orders)
        in_band, above = _phq9_in_window(record, 15, 20)
        initial = any(d.phase == "initial" and d.policy and d.policy.id == "mgbhp-031" for d in decisions)
        if initial and in_band and not above and not _other_scales(record):
            changed.add(patient.label)
    return changed


@pytest.fixture(scope="module")
def phq9_20(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mappings = copy_mappings(tmp_path_factory.mktemp("phq9") / "mappings", with_cases=True)
    replace_once(mappings / "policies" / "mgbhp-031.yaml", "  phq9_severe: 15\n", "  phq9_severe: 20\n")
    return mappings


def test_impact_of_phq9_15_to_20_lists_exactly_the_patients_that_change(
    phq9_20: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = run_json(
        capsys, "mappings", "impact", "--against", str(MAPPINGS_DIR), "--mappings", str(phq9_20), "--format", "json"
    )
    assert code == 0
    changes = doc["changes"]  # type: ignore[index]
    expected = expected_phq9_changes()
    assert len(expected) > 20
    assert {c["patient"] for c in changes} == expected
    for change in changes:
        assert change["policy"] == "mgbhp-031"
        assert change["criteria"] == [{"id": "initial-3-severity", "before": "met", "after": "not-met"}]
    assert doc["evaluated"]["case"] == len(case_files())  # type: ignore[index]
    assert doc["evaluated"]["story"] == len(list(STORIES.glob("*.json")))  # type: ignore[index]
    assert doc["before"]["version"] != doc["after"]["version"]  # type: ignore[index]
    assert doc["errors"] == []  # type: ignore[index]


def test_impact_against_a_git_revision(phq9_20: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    copy_mappings(repo / "fhir_mappings", with_cases=True)
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "mappings"], check=True)
    replace_once(repo / "fhir_mappings" / "policies" / "mgbhp-031.yaml", "  phq9_severe: 15\n", "  phq9_severe: 20\n")
    args = ["mappings", "impact", "--against", "HEAD", "--mappings", str(repo / "fhir_mappings"), "--no-stories"]
    args += ["--only", "mgbhp-031/phq9", "--only", "mgbhp-031/age-", "--only", "uuhp-mp-054/base"]
    code, doc = run_json(capsys, *args, "--format", "json")
    assert code == 0
    assert doc["before"]["mappings"] == "git HEAD"  # type: ignore[index]
    case_changes = {c["patient"] for c in doc["changes"]}  # type: ignore[index]
    picked = ("mgbhp-031/phq9", "mgbhp-031/age-", "uuhp-mp-054/base")
    assert doc["evaluated"] == {
        "case": len([p for p in case_files() if any(f in f"{p.parent.name[:-6]}/{p.stem}" for f in picked)])
    }  # type: ignore[index]
    assert case_changes == {p for p in expected_phq9_changes() if p.startswith(picked)}
    assert case_changes  # the fixture library has PHQ-9 cases in the 15-19 band
    code, out, _ = run_cli(capsys, *args, "--format", "markdown")
    assert code == 0 and "| mgbhp-031/phq9-29-days | case | mgbhp-031 |" in out
    code, _, err = run_cli(
        capsys, "mappings", "impact", "--against", "no-such-rev", "--mappings", str(repo / "fhir_mappings")
    )
    assert code == 2 and "git revision 'no-such-rev'" in err and len(err.strip().splitlines()) == 1


def test_no_change_no_rows_and_fail_on_change(phq9_20: Path, capsys: pytest.CaptureFixture[str]) -> None:
    only = ["--no-stories", "--only", "mgbhp-031/age-1", "--fail-on-change"]
    code, out, _ = run_cli(capsys, "mappings", "impact", "--against", str(MAPPINGS_DIR), *only)
    assert code == 0 and "0 decision(s) changed; evaluated 3 fixture cases" in out
    args = ["mappings", "impact", "--against", str(MAPPINGS_DIR), "--mappings", str(phq9_20), *only]
    code, out, _ = run_cli(capsys, *args)
    assert code == 1 and "initial-3-severity met -> not-met" in out


def test_impact_on_a_cohort_folder(phq9_20: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    story = json.loads((STORIES / "mgb-031-initial-likely-authorized.json").read_text())
    (cohort / "one.json").write_text(json.dumps(story["bundle"]))  # a plain Bundle: an assumed IV ketamine order
    args = [
        "mappings",
        "impact",
        "--against",
        str(MAPPINGS_DIR),
        "--mappings",
        str(phq9_20),
        "--no-cases",
        "--no-stories",
    ]
    code, doc = run_json(capsys, *args, "--cohort", str(cohort), "--format", "json")
    assert code == 0
    assert doc["evaluated"] == {"cohort": 1}  # type: ignore[index]
    patient = load_patient(cohort / "one.json")
    record = build_record(patient, Mappings.load(), evaluation_time(date.today()))
    in_band, above = _phq9_in_window(record, 15, 20)
    assert bool(doc["changes"]) == (in_band and not above)  # type: ignore[index]


def test_the_tools_read_fixture_cases_exactly_as_the_pytest_runner_does() -> None:
    """Two implementations of the case format (the pytest runner's and the tools'): they must not drift apart."""
    from fhir_mappings.policies import test_policy_cases as runner

    engines = Engines()
    for path in case_files():
        mine, record, policy = build_case(path, engines.for_folder(path.parent))
        theirs, expected, expected_policy = runner.build_case(path)
        assert (mine, policy) == (theirs, expected_policy)
        assert record.now == expected.now and record.draft_orders == expected.draft_orders, path.name
        assert record.resources == expected.resources, path.name
        assert {k: q.availability for k, q in record.queries.items()} == {
            k: q.availability for k, q in expected.queries.items()
        }, path.name
