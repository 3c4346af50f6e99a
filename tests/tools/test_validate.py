"""`ketamine-cds mappings validate`: the shipped set is valid; each typical informaticist mistake is refused with
file:line and a one-line reason, alone and all together; the service refuses to start with the same lines."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from cds_service.app import create_app
from cds_service.config import ServiceConfig
from fhir_mappings.validation import MappingsInvalid, validate
from tests.harness import free_port
from tests.tools.conftest import SANDBOX_SITE, copy_mappings, replace_once, run_cli, run_json


@dataclass(frozen=True)
class Mistake:
    id: str
    file: str  # relative to the mapping directory; "site.yaml" is the site configuration
    old: str
    new: str
    reason: str  # a substring of the one-line reason
    occurrence: int = 1
    line_offset: int = 0  # the reported line relative to where the replacement starts
    at: str | None = None  # the reported line is where this text is (instead of the replacement)


MISTAKES = [
    Mistake(
        "threshold-as-string",
        "policies/mgbhp-031.yaml",
        "  phq9_severe: 15\n",
        '  phq9_severe: "15"\n',
        "must be a number",
    ),
    Mistake(
        "misspelt-field",
        "policies/mgbhp-031.yaml",
        "    not_met_text: The member is younger",
        "    not_met_txt: The member is younger",
        "did you mean 'not_met_text'",
    ),
    Mistake(
        "duplicate-key",
        "policies/mgbhp-031.yaml",
        "  min_trials: 4\n",
        "  min_trials: 4\n  min_trials: 5\n",
        "duplicate key 'min_trials'",
        line_offset=1,
    ),
    Mistake(
        "malformed-icd10cm",
        "valuesets/diagnoses.yaml",
        '{code: "F33.2"',
        '{code: "F3.32"',
        "not a well-formed ICD-10-CM code",
    ),
    Mistake(
        "nonexistent-icd10cm", "valuesets/diagnoses.yaml", '{code: "F33.2"', '{code: "F33.99"', "not an ICD-10-CM code"
    ),
    Mistake(
        "loinc-check-digit",
        "valuesets/observations.yaml",
        '{code: "44261-6"',
        '{code: "44261-5"',
        "check digit should be 6",
    ),
    Mistake(
        "snomed-check-digit", "valuesets/orders.yaml", '{code: "47625008"', '{code: "47625009"', "Verhoeff check digit"
    ),
    Mistake(
        "malformed-cpt", "valuesets/procedures.yaml", '{code: "90834"', '{code: "9083"', "not a well-formed CPT code"
    ),
    Mistake(
        "malformed-rxnorm", "valuesets/orders.yaml", '{code: "238082"', '{code: "238O82"', "not a well-formed RxNorm"
    ),
    Mistake("unquoted-code", "valuesets/procedures.yaml", '{code: "90837"', "{code: 90837", "must be text (quote it)"),
    Mistake(
        "verification-enum",
        "valuesets/coverage.yaml",
        "\n    verification: verified",
        "\n    verification: verfied",
        "did you mean 'verified'",
        line_offset=1,
    ),
    Mistake(
        "unknown-enum-kind",
        "policies/mgbhp-031.yaml",
        "    kind: requirement\n    phases: [initial]\n    title: Unipolar",
        "    kind: requirment\n    phases: [initial]\n    title: Unipolar",
        "did you mean 'requirement'",
    ),
    Mistake(
        "unknown-outcome",
        "policies/mgbhp-031.yaml",
        "    outcome: not-applicable",
        "    outcome: not-applicible",
        "did you mean 'not-applicable'",
    ),
    Mistake(
        "unknown-fact-in-rule",
        "policies/mgbhp-031.yaml",
        'met_when: {value: age_years, ">=": "@min_age"}',
        'met_when: {value: age_yeers, ">=": "@min_age"}',
        "unknown fact 'age_yeers'",
    ),
    Mistake(
        "unknown-threshold",
        "policies/mgbhp-031.yaml",
        'not_met_when: {value: age_years, "<": "@min_age"}',
        'not_met_when: {value: age_years, "<": "@min_agee"}',
        "unknown threshold '@min_agee'",
    ),
    Mistake(
        "unknown-phase",
        "policies/mgbhp-031.yaml",
        "    phases: [initial]\n    title: Age",
        "    phases: [inital]\n    title: Age",
        "unknown phase 'inital'",
    ),
    Mistake(
        "missing-quote",
        "policies/mgbhp-031.yaml",
        "    quote: >-\n      Intravenous ketamine may be considered medically necessary for members 18 years of age"
        " or older\n",
        "",
        "missing 'quote'",
        at="  - id: initial-age",
    ),
    Mistake(
        "text-contradicts-threshold",
        "policies/mgbhp-031.yaml",
        "(PHQ-9 ≥ {phq9_severe}, HAM-D ≥ {hamd_severe}",
        "(PHQ-9 ≥ 20, HAM-D ≥ {hamd_severe}",
        "disagrees with the thresholds",
    ),
    Mistake(
        "text-restates-threshold",
        "policies/mgbhp-031.yaml",
        "Record a depression rating within the last {severity_window_days} days",
        "Record a depression rating within the last 30 days",
        "restates threshold severity_window_days",
    ),
    Mistake(
        "unknown-placeholder",
        "policies/mgbhp-031.yaml",
        "MADRS ≥ {madrs_severe} or QIDS-SR16 ≥ {qids_severe})",
        "MADRS ≥ {madrs_sever} or QIDS-SR16 ≥ {qids_severe})",
        "unknown threshold {madrs_sever}; did you mean",
    ),
    Mistake(
        "unknown-derive-param",
        "policies/mgbhp-031.yaml",
        "mg_per_kg: 0.5",
        "mg_per_kilo: 0.5",
        "unknown key 'mg_per_kilo'",
    ),
    Mistake(
        "derive-param-wrong-type", "policies/mgbhp-031.yaml", "minutes: 40", 'minutes: "40"', "must be a whole number"
    ),
    Mistake(
        "unknown-valueset-in-fact",
        "facts.yaml",
        "    valueset: dx_mdd\n",
        "    valueset: dx_mddd\n",
        "did you mean 'dx_mdd'",
    ),
    Mistake("invalid-jsonpath", "facts.yaml", 'code: "$.code"', 'code: "$.code[?"', "invalid jsonpath"),
    Mistake("unknown-derive-function", "facts.yaml", "    derive: age_years", "    derive: age_yrs", "is not one of"),
    Mistake("filter-enum", "facts.yaml", "missing: fail}", "missing: skip}", "not one of pass, fail"),
    Mistake(
        "routing-unknown-policy",
        "routing.yaml",
        "fallback: mgbhp-031",
        "fallback: mgbhp-31",
        "unknown policy 'mgbhp-31'",
    ),
    Mistake(
        "routing-unknown-valueset",
        "routing.yaml",
        "type_in: coverage_medicare_advantage",
        "type_in: coverage_medicare_advantag",
        "unknown value set",
    ),
    Mistake(
        "queries-unknown-valueset",
        "queries.yaml",
        "      - obs_phq9_total\n",
        "      - obs_phq9_totl\n",
        "unknown value set 'obs_phq9_totl'",
    ),
    Mistake(
        "queries-misspelt-key",
        "queries.yaml",
        "    supplies: [Condition]",
        "    supplys: [Condition]",
        "unknown key 'supplys'",
    ),
    Mistake("site-boolean-no", "site.yaml", "no_policy_card: true", 'no_policy_card: "no"', "must be true or false"),
    Mistake(
        "site-misspelt-clinic-key", "site.yaml", 'value: "1516593930"', 'valu: "1516593930"', "did you mean 'value'"
    ),
    Mistake(
        "site-unknown-valueset", "site.yaml", "obs_hamd_total:", "obs_hamd_totl:", "unknown value set 'obs_hamd_totl'"
    ),
    Mistake(
        "site-unknown-payer", "site.yaml", "  mgbhp: {identifiers", "  mgbh: {identifiers", "unknown payer id 'mgbh'"
    ),
]

SITE = """# a site configuration
credentialed_clinics:
  - {system: "http://hl7.org/fhir/sid/us-npi", value: "1516593930", name: "Wasatch Behavioral Health KAP Clinic"}
valuesets:
  obs_hamd_total: [{system: "urn:oid:1.2.3.4.5", code: "HAMD17", display: "HAM-D 17 total"}]
payers:
  mgbhp: {identifiers: [{system: "http://example.org/naic", value: "12345"}]}
no_policy_card: true
"""


def _apply(mistake: Mistake, mappings: Path, site: Path) -> Path:
    path = site if mistake.file == "site.yaml" else mappings / mistake.file
    replace_once(path, mistake.old, mistake.new, mistake.occurrence)
    return path


def _line(mistake: Mistake, path: Path) -> int | None:
    """Where the mistake is in the file as it is now (after every edit); None when that is ambiguous."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if mistake.at is not None:
        return next(i for i, text in enumerate(lines, 1) if text.startswith(mistake.at))
    text = path.read_text(encoding="utf-8")
    if text.count(mistake.new) != 1:
        return None
    return text[: text.index(mistake.new)].count("\n") + 1 + mistake.line_offset


# Each of these used to load without a word, or is a kind of check of its own: refused alone as well.
ALONE = {
    "threshold-as-string",
    "misspelt-field",
    "duplicate-key",
    "malformed-icd10cm",
    "nonexistent-icd10cm",
    "loinc-check-digit",
    "unknown-enum-kind",
    "missing-quote",
    "text-contradicts-threshold",
    "invalid-jsonpath",
    "unknown-derive-param",
    "site-boolean-no",
    "routing-unknown-policy",
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_mappings(tmp_path_factory.mktemp("pristine") / "mappings")


@pytest.fixture
def workspace(pristine: Path, tmp_path: Path) -> tuple[Path, Path]:
    mappings = tmp_path / "mappings"
    shutil.copytree(pristine, mappings)
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    return mappings, site


def test_at_least_twenty_kinds_of_mistake() -> None:
    assert len(MISTAKES) >= 20
    assert len({m.id for m in MISTAKES}) == len(MISTAKES)


def test_the_shipped_mappings_and_the_sandbox_site_configuration_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(capsys, "mappings", "validate", "--site-config", str(SANDBOX_SITE), "--format", "json")
    assert code == 0
    assert doc == {"valid": True, "problems": []}


def test_an_unbroken_copy_and_site_configuration_are_valid(workspace: tuple[Path, Path]) -> None:
    mappings, site = workspace
    assert validate(mappings, site) == []


@pytest.mark.parametrize("mistake", [m for m in MISTAKES if m.id in ALONE], ids=lambda m: m.id)
def test_a_mistake_alone_is_refused_with_file_and_line(
    mistake: Mistake, workspace: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mappings, site = workspace
    path = _apply(mistake, mappings, site)
    line = _line(mistake, path)
    code, out, _err = run_cli(capsys, "mappings", "validate", str(mappings), "--site-config", str(site))
    assert code == 1
    lines = out.splitlines()
    hits = [text for text in lines if text.startswith(f"{path}:{line}:") and mistake.reason in text]
    assert hits, f"expected {path.name}:{line} ... {mistake.reason!r} in:\n" + "\n".join(lines)
    assert "Traceback" not in out


@pytest.fixture(scope="module")
def everything_broken(
    pristine: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[tuple[Mistake, Path]], list[dict[str, object]], int]:
    root = tmp_path_factory.mktemp("broken")
    mappings = root / "mappings"
    shutil.copytree(pristine, mappings)
    site = root / "site.yaml"
    site.write_text(SITE)
    applied = []
    for m in MISTAKES:
        path = site if m.file == "site.yaml" else mappings / m.file
        if m.old in path.read_text(encoding="utf-8"):  # two mistakes may rewrite the same text: the first stands
            applied.append((m, _apply(m, mappings, site)))
    problems = [p.to_json() for p in validate(mappings, site)]
    return applied, problems, len(MISTAKES)


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
def test_every_mistake_is_reported_at_once_with_file_and_line(
    mistake: Mistake, everything_broken: tuple[list[tuple[Mistake, Path]], list[dict[str, object]], int]
) -> None:
    applied, problems, _ = everything_broken
    found = {m.id: path for m, path in applied}
    if mistake.id not in found:
        pytest.skip("its text was already rewritten by another mistake")  # pragma: no cover - none today
    path = found[mistake.id]
    line = _line(mistake, path)
    mine = [p for p in problems if p["file"] == str(path) and mistake.reason in str(p["message"])]
    assert mine, f"{mistake.id}: no problem with {mistake.reason!r} in {path.name}"
    if line is not None:
        assert any(p["line"] == line for p in mine), (
            f"{mistake.id}: expected line {line}, got {[p['line'] for p in mine]}"
        )


def test_all_mistakes_were_applied_together(
    everything_broken: tuple[list[tuple[Mistake, Path]], list[dict[str, object]], int],
) -> None:
    applied, problems, total = everything_broken
    assert len(applied) == total
    assert len(problems) >= total


def test_a_yaml_syntax_error_is_located(workspace: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    mappings, _ = workspace
    line = replace_once(mappings / "routing.yaml", "  no_policy_card: true", "  no_policy_card: [true")
    code, out, _ = run_cli(capsys, "mappings", "validate", str(mappings))
    assert code == 1
    (problem,) = [p for p in out.splitlines() if "routing.yaml" in p]
    file_line = problem.split(": ")[0]
    assert file_line.startswith(f"{mappings / 'routing.yaml'}:")
    assert int(file_line.split(":")[1]) >= line
    assert "not valid YAML" in problem


def test_a_duplicate_value_set_across_files_names_the_first_definition(workspace: tuple[Path, Path]) -> None:
    mappings, _ = workspace
    extra = mappings / "valuesets" / "zz-local.yaml"
    extra.write_text(
        "valuesets:\n  dx_mdd:\n    title: again\n    verification: gap\n    source: test\n    include: []\n"
    )
    problems = validate(mappings)
    assert any(p.file.endswith("zz-local.yaml") and p.line == 2 and "already defined in" in p.message for p in problems)


def test_json_output_is_for_scripts(workspace: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    mappings, site = workspace
    _apply(MISTAKES[0], mappings, site)
    code, doc = run_json(capsys, "mappings", "validate", str(mappings), "--format", "json")
    assert code == 1
    (problem,) = doc["problems"]  # type: ignore[index]
    assert set(problem) == {"file", "line", "column", "message", "check"}
    assert problem["check"] == "schema"


def test_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["mappings", "validate"], ["mappings", "test"], ["mappings", "impact"], ["evaluate"], ["report"]):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(capsys, *command, "--help")
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "example:" in out and "ketamine-cds " in out.split("example:")[1], command
        assert "--format" in out


# --- the service refuses to start on the same problems ----------------------------------------------------------
def test_serve_refuses_to_start_with_the_same_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE.replace("no_policy_card: true", 'no_policy_card: "no"'))
    code, out, _ = run_cli(capsys, "mappings", "validate", "--site-config", str(site))
    assert code == 1
    expected = out.strip().splitlines()
    assert expected
    port = free_port()
    args = ["serve", "--insecure-no-auth", "--port", str(port), "--database", f"sqlite:///{tmp_path / 'a.db'}"]
    code, _, err = run_cli(capsys, *args, "--site-config", str(site))
    assert code == 2
    for line in expected:
        assert line in err.splitlines()
    with pytest.raises(MappingsInvalid) as refused:
        create_app(
            ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{tmp_path / 'b.db'}", site_config=str(site))
        )
    assert str(refused.value).splitlines() == expected


def test_published_schemas_validate_the_shipped_files_as_an_editor_would() -> None:
    import jsonschema
    import yaml

    from fhir_mappings.mappings import MAPPINGS_DIR
    from fhir_mappings.validation import policy_files
    from fhir_mappings.validation.schemas import SCHEMA_DIR, stale

    assert stale() == [], "run `ketamine-cds mappings schemas --write`"
    pairs = [
        ("policy", policy_files(MAPPINGS_DIR)),
        ("valuesets", sorted((MAPPINGS_DIR / "valuesets").glob("*.yaml"))),
        ("facts", [MAPPINGS_DIR / "facts.yaml"]),
        ("queries", [MAPPINGS_DIR / "queries.yaml"]),
        ("routing", [MAPPINGS_DIR / "routing.yaml"]),
        ("site-config", [SANDBOX_SITE]),
    ]
    for name, files in pairs:
        schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
        for path in files:
            jsonschema.validate(yaml.safe_load(path.read_text()) or {}, schema)
    broken = json.loads((SCHEMA_DIR / "site-config.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"no_policy_card": "no"}, broken)


def test_derive_parameters_in_the_schema_come_from_the_registry() -> None:
    from fhir_mappings.facts import DERIVATIONS, derivation
    from fhir_mappings.validation.schemas import derive_param_schemas

    @derivation("test_only_derivation", params={"window_days": "int", "codes": "valueset"}, reads=())
    def _test_only(ctx, params, fact):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    try:
        branch = next(
            b for b in derive_param_schemas() if b["if"]["properties"]["derive"]["const"] == "test_only_derivation"
        )
        params = branch["then"]["properties"]["params"]
        assert params["properties"]["window_days"] == {"type": "integer"}
        assert params["required"] == ["codes", "window_days"]
        assert params["additionalProperties"] is False
    finally:
        DERIVATIONS.pop("test_only_derivation")
