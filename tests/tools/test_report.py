"""`ketamine-cds report`: a cohort (Bundle folder, NDJSON export, FHIR server) evaluated in worker processes into one
self-contained HTML page — checked as data, and in headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fhir_mappings.mappings import Mappings, SiteConfig
from fhir_mappings.tools.explain import evaluate_patient
from fhir_mappings.tools.records import load_patient
from tests.harness import FHIR_BASE, FhirMock
from tests.tools.conftest import SANDBOX_SITE, STORIES, run_cli, run_json

LA_DENIED = "mgb-031-initial-likely-authorized"  # the service says likely-authorized; the reference says denied
REFERENCE = {
    "sc-mla": ("mgbhp-031", "denied"),
    "sc-mdn": ("mgbhp-031", "pended"),
    "sc-m3t": ("mgbhp-031", "denied"),
    "sc-uia": ("uuhp-mp-054", "approved"),
    "sc-mpg": ("mgbhp-031", "approved"),
}
COHORT = [
    "mgb-031-initial-likely-authorized",
    "mgb-031-documentation-needed",
    "mgb-031-three-trials",
    "mgb-031-pregnancy",
    "uuhp-integration-likely-authorized",
    "uuhp-kap-ketamine-not-covered",
    "mgb-medicare-advantage-plan-variation",
    "non-ketamine-lithium-no-cards",
]


class _Page(HTMLParser):
    """Ids, anchors, tables (rows of cell texts) and tags of a page — enough to check it as data."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.tables: dict[str, list[list[str]]] = defaultdict(list)
        self.svgs = 0
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "a" and a.get("href"):
            self.hrefs.append(str(a["href"]))
        if a.get("src"):
            self.srcs.append(str(a["src"]))
        if tag == "svg":
            self.svgs += 1
        if tag == "table":
            self._table = str(a.get("id") or a.get("class") or "table")
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort") / "stories"
    folder.mkdir()
    for name in COHORT:
        shutil.copy(STORIES / f"{name}.json", folder / f"{name}.json")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "decisions.csv"
    path.write_text(
        "patient_id,policy,determination\n" + "".join(f"{p},{pol},{d}\n" for p, (pol, d) in REFERENCE.items())
    )
    return path


@pytest.fixture(scope="module")
def report(cohort: Path, reference: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from cds_service.cli import main

    out = tmp_path_factory.mktemp("report") / "report.html"
    args = ["report", str(cohort), "--out", str(out), "--reference", str(reference), "--workers", "2"]
    args += ["--site-config", str(SANDBOX_SITE), "--format", "json"]
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(args) == 0
    return out, json.loads(buffer.getvalue())


def _expected() -> dict[str, list[Any]]:
    mappings = Mappings.load(SiteConfig.from_file(SANDBOX_SITE))
    return {name: evaluate_patient(mappings, load_patient(STORIES / f"{name}.json")).decisions for name in COHORT}


def test_the_summary_and_the_page_agree_with_offline_evaluation(report: tuple[Path, dict[str, Any]]) -> None:
    out, summary = report
    expected = _expected()
    decisions = [d for ds in expected.values() for d in ds]
    assert summary["patients"] == len(COHORT)
    assert summary["decisions"] == len(decisions)
    outcomes: dict[str, int] = defaultdict(int)
    for d in decisions:
        outcomes[d.outcome.value] += 1
    assert summary["outcomes"] == dict(outcomes)
    page = _Page()
    page.feed(out.read_text())
    version = Mappings.load(SiteConfig.from_file(SANDBOX_SITE)).version
    assert summary["mapping_version"] == version and version in out.read_text()
    table = page.tables["outcome-table"]
    header, rows = table[0], table[1:]
    total = header.index("total")
    assert sum(int(r[total]) for r in rows) == len(decisions)
    for outcome, count in outcomes.items():
        assert sum(int(r[header.index(outcome)]) for r in rows) == count
    assert page.svgs >= 3  # the outcome plot and one criterion plot per policy
    for name in COHORT:  # every patient has a row linking to its explanation
        patient = load_patient(STORIES / f"{name}.json").patient_id
        assert f"p-{patient}" in page.ids
        assert f"#p-{patient}" in page.hrefs
    assert not page.srcs and not [h for h in page.hrefs if not h.startswith("#")]  # self-contained


def test_reference_agreement_confusion_matrix_and_likely_authorized_but_denied_first(
    report: tuple[Path, dict[str, Any]],
) -> None:
    out, summary = report
    agreement = summary["agreement"]
    expected = _expected()
    predicted = {
        "likely-authorized": "approved",
        "documentation-needed": "pended",
        "criteria-not-met": "denied",
        "blocked": "denied",
    }
    compared = agreed = 0
    for name, decisions in expected.items():
        pid = load_patient(STORIES / f"{name}.json").patient_id
        for d in decisions:
            truth = REFERENCE.get(pid)
            if truth and truth[0] == (d.policy.id if d.policy else None) and d.outcome.value in predicted:
                compared += 1
                agreed += predicted[d.outcome.value] == truth[1]
    assert (agreement["compared"], agreement["agreed"]) == (compared, agreed) == (5, 3)
    assert agreement["percent"] == 60.0
    assert [f["patient"] for f in agreement["likely_authorized_but_denied"]] == ["sc-mla"]
    assert agreement["matrix"]["denied"] == {"likely-authorized": 1, "criteria-not-met": 1}
    page = _Page()
    page.feed(out.read_text())
    first = page.tables["patient-table"][1]
    assert first[0] == LA_DENIED and first[3] == "likely-authorized" and first[-1] == "denied"
    confusion = page.tables["confusion"]
    denied = next(r for r in confusion if r[0] == "denied")
    assert denied[confusion[0].index("likely-authorized")] == "1"


def test_the_page_in_headless_chromium(report: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    out, _summary = report
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1300,1800",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(out.resolve().as_uri())
        assert driver.title == "ketamine-cds cohort report"
        assert driver.find_element(By.ID, "mapping-version").text.startswith("ms-")
        assert "60.0 %" in driver.find_element(By.ID, "agreement").text
        flagged = driver.find_elements(By.CSS_SELECTOR, "ul.flag li a")
        assert [a.text for a in flagged] == [LA_DENIED]
        plots = driver.find_elements(By.CSS_SELECTOR, "figure.plot svg")
        assert len(plots) >= 3
        for svg in plots:  # drawn, not an empty box
            assert svg.size["height"] > 80 and svg.size["width"] > 300
        bars = driver.execute_script("return document.querySelectorAll('figure.plot svg path').length")
        assert bars > 20
        first_row = driver.find_element(By.CSS_SELECTOR, "#patient-table tr.flag")
        assert LA_DENIED in first_row.text
        external = driver.execute_script(
            "return [...document.querySelectorAll('[src],link[href],a[href]')]"
            ".map(e => e.getAttribute('src') || e.getAttribute('href')).filter(u => !u.startsWith('#'))"
        )
        assert external == []
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
        first_row.find_element(By.TAG_NAME, "a").click()
        target = driver.find_element(By.ID, "p-sc-mla")
        assert driver.execute_script("return window.scrollY") > 1000
        assert "likely-authorized" in target.text and "decided by" in target.text
    finally:
        driver.quit()


def test_an_ndjson_bulk_export_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "export"
    export.mkdir()
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    names = ["mgb-031-three-trials", "mgb-031-pregnancy", "uuhp-integration-likely-authorized"]
    for name in names:
        for entry in json.loads((STORIES / f"{name}.json").read_text())["bundle"]["entry"]:
            by_type[entry["resource"]["resourceType"]].append(entry["resource"])
    for rtype, resources in by_type.items():
        (export / f"{rtype}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in resources))
    out = tmp_path / "r.html"
    code, summary = run_json(
        capsys, "report", str(export), "--out", str(out), "--workers", "1", "--as-of", "2026-01-15", "--format", "json"
    )
    assert code == 0
    assert summary["patients"] == 3  # type: ignore[index]
    assert summary["decisions"] == 3 and summary["errors"] == 0  # type: ignore[index]
    assert out.read_text().count("<section class='patient'") == 3


def test_the_patients_of_a_fhir_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import responses

    names = ["mgb-031-three-trials", "mgb-031-pregnancy"]
    resources = [
        e["resource"] for n in names for e in json.loads((STORIES / f"{n}.json").read_text())["bundle"]["entry"]
    ]
    mock = FhirMock(resources)
    out = tmp_path / "r.html"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        mock.install(rsps)
        args = ["report", FHIR_BASE, "--fhir-token", "ehr-access-token-123", "--out", str(out), "--workers", "1"]
        code, summary = run_json(capsys, *args, "--as-of", "2026-01-15", "--format", "json")
    assert code == 0
    assert summary["patients"] == 2 and summary["errors"] == 0  # type: ignore[index]
    assert any(re.search(r"/Coverage\?patient=", c) for c in mock.calls)
    assert any("/Practitioner" in c for c in mock.calls)  # references followed, as the service does
    assert summary["decisions"] == 2  # type: ignore[index]
    assert set(summary["outcomes"]) <= {"criteria-not-met", "blocked", "documentation-needed"}  # type: ignore[index]


def test_unreadable_sources_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "report", str(tmp_path / "missing"), "--out", str(tmp_path / "x.html"))
    assert code == 2 and "no such folder" in err and "Traceback" not in err
    bad = tmp_path / "ref.csv"
    bad.write_text("patient,policy,determination\nsc-mla,mgbhp-031,maybe\n")
    code, _, err = run_cli(
        capsys,
        "report",
        str(STORIES / "mgb-031-pregnancy.json"),
        "--reference",
        str(bad),
        "--out",
        str(tmp_path / "x.html"),
    )
    assert code == 2 and "ref.csv:2: determination 'maybe'" in err
