"""End to end, as a user would: the real CDS Hooks sandbox web app in headless Chromium against this project.

    python tests/e2e/sandbox_app_e2e.py [--source DIR] [--artifacts DIR] [--cache-dir DIR]

What it does (the README's walkthrough, step by step):

1. builds the app from its source (`../shared/clients/cds-hooks-sandbox`, copied, ketamine added to its medication
   list; npm install and build cached under `--cache-dir`) and serves `build/` on loopback;
2. starts the open sandbox FHIR server with every scenario loaded, and the service with `--lenient` and the
   shipped `sandbox/cds-hooks-sandbox-issuers.json` (its `fhir_servers` pointed at that FHIR server);
3. drives Debian's Chromium (`chromium` + `chromium-driver`, selenium): *Change FHIR Server* → patient (the picker
   for patients on its first page, the printed launch URL for the others) → *Add CDS Services* → *Rx Sign* →
   choose the medication → *Sign Order* → the card is shown → *Dismiss* (with an override reason where the card
   offers them) — and checks, in the service's audit database, the decision of every call and the stored feedback;
4. saves a screenshot of every step in `--artifacts` (CI keeps `.ci-artifacts/sandbox-app/`).

Exit code 0 when every patient got the expected outcome and its feedback was stored. `tests/e2e/test_sandbox_app.py`
runs it under pytest (CI always does: `.ci/run` installs Chromium).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

from sandbox.fhir_server import FhirServerProcess, child_preexec, free_port, terminate_process_group  # noqa: E402
from sandbox.loader import load_into  # noqa: E402
from sandbox.scenarios import load_all  # noqa: E402
from sandbox.web_app import DEFAULT_CACHE_DIR, StaticSite, build_app, launch_url  # noqa: E402

APP_SOURCE_ENV = "KETAMINE_CDS_SANDBOX_APP_SOURCE"
APP_SOURCE_RELATIVE = Path("shared/clients/cds-hooks-sandbox")
ISSUERS_FILE = REPO / "sandbox" / "cds-hooks-sandbox-issuers.json"
SITE_CONFIG = REPO / "sandbox" / "site-config.yaml"
DEFAULT_ARTIFACTS = REPO / ".ci-artifacts" / "sandbox-app"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # without these the browser's own background traffic meets the closed network and connections get refused
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1900",
)
WAIT_SECONDS = 90.0  # one page load of the 5 MB app takes ~10 s on a loaded 2-core machine


@dataclass(frozen=True)
class Visit:
    """One patient in the app: how it is reached, what is signed, and what the service must decide."""

    patient_id: str
    medication: str  # the Rx Sign list entry to choose
    search: str  # what the user types to find it
    outcome: str | None  # the decision's outcome; None: no card at all (not a ketamine order)
    policy: str | None = None
    via_picker: str | None = None  # the patient's name in the Change Patient picker (first page only)
    override: bool = False  # dismiss with the card's first override reason
    unknown: frozenset[str] | None = None  # exactly the criteria left unknown (what the card asks for)

    @property
    def label(self) -> str:
        return f"{self.patient_id}-{self.outcome or 'no-cards'}"


KETAMINE_10 = "ketamine 10 MG/ML Injectable Solution"
VISITS: tuple[Visit, ...] = (
    # on the picker's first page: a non-ketamine order (no card), then ketamine for an MGB member with gaps
    Visit("ex-nk-patient", "Lithium Carbonate 300 MG Oral Tablet", "lithium carbonate 300", None, None, "Nora Example"),
    # (its record lacks a recent PHQ-9 and a release of information; the app's order a route, location, performer)
    Visit(
        "sc-mdn",
        KETAMINE_10,
        "ketamine 10",
        "documentation-needed",
        "mgbhp-031",
        "Kevin O'Brien",
        unknown=frozenset(
            {"iv-route", "initial-3-severity", "initial-6-setting-monitoring", "exclusion-16-ongoing-care-release"}
        ),
    ),
    # beyond the first page: the launch URLs `ketamine-cds sandbox server --open` prints
    # (every clinical criterion documented: only what the app's order lacks stays unknown)
    Visit(
        "sc-mla",
        KETAMINE_10,
        "ketamine 10",
        "documentation-needed",
        "mgbhp-031",
        unknown=frozenset({"iv-route", "initial-6-setting-monitoring"}),
    ),
    Visit("sc-mpg", KETAMINE_10, "ketamine 10", "blocked", "mgbhp-031", override=True),
    Visit("sc-ukk", KETAMINE_10, "ketamine 10", "not-covered", "uuhp-mp-054"),
    Visit("sc-nocov", KETAMINE_10, "ketamine 10", "no-policy"),
)


# ---------------------------------------------------------------------- prerequisites


def find_app_source() -> Path | None:
    """The app's source: $KETAMINE_CDS_SANDBOX_APP_SOURCE, else `shared/clients/cds-hooks-sandbox` beside an
    ancestor of the checkout (`../shared` of the main checkout, `../../shared` of a worktree)."""
    configured = os.environ.get(APP_SOURCE_ENV)
    if configured:
        return Path(configured) if (Path(configured) / "package.json").is_file() else None
    for ancestor in REPO.parents:
        candidate = ancestor / APP_SOURCE_RELATIVE
        if (candidate / "package.json").is_file():
            return candidate
    return None


def missing_prerequisites() -> list[str]:
    """Why the e2e cannot run here (empty: it can)."""
    missing = []
    if find_app_source() is None:
        missing.append(
            f"the CDS Hooks sandbox source ({APP_SOURCE_RELATIVE} beside an ancestor of {REPO}, or ${APP_SOURCE_ENV})"
        )
    for program, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(program) is None:
            missing.append(f"{program} (Debian: apt-get install -y {package})")
    if shutil.which("npm") is None:
        missing.append("npm (Node 20)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    return missing


# ---------------------------------------------------------------------- the stack


class ServiceUnderTest:
    """`ketamine-cds serve --lenient` with the shipped sandbox-app issuers file, as a child process."""

    def __init__(self, workdir: Path, fhir_base: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.database = workdir / "audit.db"
        self.log_path = workdir / "service.log"
        issuers = json.loads(ISSUERS_FILE.read_text(encoding="utf-8"))
        issuers["issuers"][0]["fhir_servers"] = [fhir_base]  # the README: edit fhir_servers to your server
        self.issuers_path = workdir / "cds-hooks-sandbox-issuers.json"
        self.issuers_path.write_text(json.dumps(issuers), encoding="utf-8")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceUnderTest:
        command = [
            sys.executable,
            "-m",
            "cds_service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--public-base-url",
            self.base_url,
            "--lenient",
            "--trusted-issuers",
            str(self.issuers_path),
            "--site-config",
            str(SITE_CONFIG),
            "--database",
            f"sqlite:///{self.database}",
            "--workers",
            "1",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=child_preexec(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited during start-up:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"the service did not answer /healthz within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            terminate_process_group(process)

    # the audit database, read as an operator would
    def _query(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        connection = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=10)
        connection.row_factory = sqlite3.Row
        try:
            return list(connection.execute(sql, params))
        except sqlite3.OperationalError:  # not created yet
            return []
        finally:
            connection.close()

    def hook_calls(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM hook_calls WHERE endpoint = 'hook' ORDER BY id")
        return [{**dict(r), "cards": json.loads(r["cards"]), "decisions": json.loads(r["decisions"])} for r in rows]

    def feedback_for(self, card_uuid: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM feedback WHERE card_uuid = ?", card_uuid)]


# ---------------------------------------------------------------------- the browser


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
    """Poll `condition` until it returns something truthy (readiness, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


class App:
    """The sandbox app in one Chromium session, driven through its UI."""

    def __init__(self, url: str, artifacts: Path, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        # the driver from Debian's package: selenium must not try to download one
        self.driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or ""))
        self.driver.set_page_load_timeout(WAIT_SECONDS)
        self.url = url
        self.artifacts = artifacts
        self.shots: list[Path] = []
        self.quirks: set[str] = set()  # the app's own oddities met on the way (reported, not failures)

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.driver.quit()

    # -- helpers
    def _until(self, condition: Any, timeout: float = WAIT_SECONDS) -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.25).until(condition)

    def clickable(self, xpath: str, timeout: float = WAIT_SECONDS) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self._until(ec.element_to_be_clickable((By.XPATH, xpath)), timeout)

    def visible(self, xpath: str, timeout: float = WAIT_SECONDS) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self._until(ec.visibility_of_element_located((By.XPATH, xpath)), timeout)

    def gone(self, xpath: str, timeout: float = WAIT_SECONDS) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        self._until(ec.invisibility_of_element_located((By.XPATH, xpath)), timeout)

    def click(self, xpath: str, timeout: float = WAIT_SECONDS) -> None:
        """Click the element once it is clickable (scrolled into view first)."""

        def click_it() -> None:
            element = self.clickable(xpath, timeout)
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
            element.click()

        self._retrying(click_it, timeout)

    def type_slowly(self, element: Any, text: str) -> None:
        """Type as a person does: the app's medication field drops keys typed faster than its 150 ms debounce."""
        for char in text:
            element.send_keys(char)
            time.sleep(0.2)

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{len(self.shots) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.shots.append(path)
        return path

    def dialog_open(self) -> bool:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        try:
            return any(d.is_displayed() for d in self.driver.find_elements(By.XPATH, "//div[@role='dialog']"))
        except StaleElementReferenceException:  # one was just removed: ask again
            return True

    # -- the steps of the walkthrough
    def open(self, url: str | None = None) -> None:
        self.driver.get(url or self.url)
        self.visible("//button[normalize-space()='Rx Sign']")

    def gear(self, item: str) -> None:
        self.click("(//header//button)[last()]")
        self.click(f"//li[normalize-space()={json.dumps(item)}]")

    def _retrying(self, action: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
        """Run `action` (which looks its elements up by XPath) again when React replaced one under us."""
        from selenium.common.exceptions import (
            ElementClickInterceptedException,
            ElementNotInteractableException,
            StaleElementReferenceException,
        )

        deadline = time.monotonic() + timeout
        while True:
            try:
                return action()
            except (StaleElementReferenceException, ElementClickInterceptedException, ElementNotInteractableException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def type_into(self, xpath: str, text: str, *, slowly: bool = False) -> None:
        def type_text() -> None:
            element = self.clickable(xpath)
            if slowly:
                self.type_slowly(element, text)
            else:
                element.send_keys(text)

        self._retrying(type_text)

    def value(self, xpath: str) -> str:
        return str(self._retrying(lambda: self.visible(xpath).get_attribute("value")) or "")

    def change_fhir_server(self, fhir_base: str) -> None:
        """The app asks by itself when its default server is unreachable (offline); else use the gear menu."""
        field = "//input[@name='fhir-server-input']"
        try:
            self.clickable(field, timeout=15)
        except Exception:
            self.gear("Change FHIR Server")
        self.type_into(field, fhir_base)
        self.screenshot("change-fhir-server")
        self.click("//div[@role='dialog']//button[normalize-space()='Next']")
        self.gone(field)

    def change_patient(self, name: str, patient_id: str) -> None:
        """Pick a patient in the Change Patient dialog (opened by the app after a server change, or from the gear)."""
        select = "//div[@role='dialog']//input[starts-with(@id, 'react-select')]"
        try:
            self.clickable(select, timeout=15)
        except Exception:
            self.gear("Change Patient")
        self.type_into(select, name)
        self.screenshot("change-patient")
        self.click(
            f"//div[starts-with(@id, 'react-select') and contains(@id, '-option-')][contains(., {json.dumps(name)})]"
        )
        self.click("//div[@role='dialog']//button[normalize-space()='Save']")
        self.patient_shown(patient_id)  # in context once the page behind the dialog shows it
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self.dialog_open(), "the Change Patient dialog to close", timeout=5)
        if self.dialog_open():
            # The app's quirk: opened from the gear menu, the dialog stays open after Save although the patient
            # changed; a user closes it with Cancel.
            self.quirks.add("Change Patient from the gear menu stays open after Save (closed with Cancel)")
            self.click("//div[@role='dialog']//button[normalize-space()='Cancel']")
            wait_for(lambda: not self.dialog_open(), "the Change Patient dialog to close after Cancel")

    def add_cds_services(self, discovery_url: str) -> None:
        self.gear("Add CDS Services")
        self.type_into("//input[@name='discovery-endpoint-input']", discovery_url)
        self.screenshot("add-cds-services")
        self.click("//div[@role='dialog']//button[normalize-space()='Save']")
        wait_for(lambda: not self.dialog_open(), "the Add CDS Services dialog to close")

    def patient_shown(self, patient_id: str) -> None:
        """The patient banner (not a dialog, nor anything holding one) shows this patient's id."""
        self.visible(
            "//*[not(ancestor-or-self::div[@role='dialog']) and not(.//div[@role='dialog'])]"
            f"[contains(normalize-space(), {json.dumps('ID: ' + patient_id)})]"
        )

    def choose_medication(self, search: str, medication: str) -> None:
        from selenium.webdriver.common.keys import Keys

        self.click("//button[normalize-space()='Rx Sign']")
        # the developer panel lists the service for this hook: discovery answered (a signed call, the inline key)
        self.visible("//*[normalize-space()='ketamine-prior-auth']")
        field = "//input[@name='medication-input']"

        def clear() -> None:
            element = self.clickable(field)
            element.click()
            element.send_keys(Keys.CONTROL, "a")
            element.send_keys(Keys.DELETE)

        self._retrying(clear)
        wait_for(lambda: self.value(field) == "", "the medication field to clear")
        self.type_into(field, search, slowly=True)
        self.click(f"//div[contains(@class, 'MuiListItemButton')][normalize-space()={json.dumps(medication)}]")
        wait_for(lambda: self.value(field) == medication, f"{medication} to be chosen")

    def press_sign(self) -> None:
        self.click("//button[normalize-space()='Sign Order']")

    def card(self, summary: str) -> Any:
        xpath = f"//div[contains(@class, 'decision-card')][.//*[normalize-space()={json.dumps(summary)}]]"
        self.visible(xpath)
        self.driver.execute_script("window.scrollTo(0, 0);")  # the form, then the card from its summary down
        return xpath

    def dismiss(self, card_xpath: str, override: bool) -> str | None:
        """Dismiss the card; with `override`, through its first override reason. Returns the reason chosen."""
        if not override:
            self.click(f"{card_xpath}//button[normalize-space()='Dismiss']")
            return None
        self.click(f"{card_xpath}//button[@aria-label='select dismiss reason']")
        item = self.clickable("//ul[@role='menu']//li[starts-with(normalize-space(), 'Override:')]")
        reason = item.text.split(":", 1)[1].strip()
        self.screenshot("override-reasons")
        item.click()
        return reason


# ---------------------------------------------------------------------- the run


@dataclass
class VisitResult:
    visit: Visit
    summary: str | None = None
    outcome: str | None = None
    policy: str | None = None
    feedback: list[dict[str, Any]] = field(default_factory=list)
    override_reason: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    results: list[VisitResult]
    timings: dict[str, float]
    screenshots: list[Path]
    launch_urls: dict[str, str]
    quirks: list[str]

    @property
    def problems(self) -> list[str]:
        return [f"{r.visit.label}: {p}" for r in self.results for p in r.problems]

    def text(self) -> str:
        lines = [f"{'patient':<16} {'expected':<22} {'got':<22} feedback  card"]
        for r in self.results:
            expected = r.visit.outcome or "no cards"
            got = r.outcome or ("no cards" if r.summary is None and not r.problems else "?")
            stored = f"{len(r.feedback)} row" if r.visit.outcome else "-"
            lines.append(f"{r.visit.patient_id:<16} {expected:<22} {got:<22} {stored:<9} {r.summary or ''}")
        lines.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        lines.append(
            f"{len(self.screenshots)} screenshots in {self.screenshots[0].parent if self.screenshots else '-'}"
        )
        lines.extend(f"app quirk: {q}" for q in self.quirks)
        lines.extend(f"PROBLEM {p}" for p in self.problems)
        return "\n".join(lines)


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = time.perf_counter() - started


def _new_call(service: ServiceUnderTest, before: int, visit: Visit) -> dict[str, Any]:
    """The audited call of this Sign: the first new one — for a ketamine order, the first about this patient (a
    refused call, whose patient is not recorded, counts too)."""

    def matching() -> dict[str, Any] | None:
        for call in service.hook_calls()[before:]:
            if visit.outcome is None or (
                call["patient_id"] in (visit.patient_id, None) and call["outcome"] != "triaged-out"
            ):
                return call
        return None

    return wait_for(matching, f"the service to audit the order-sign call for {visit.patient_id}")


def _visit(app: App, service: ServiceUnderTest, visit: Visit, result: VisitResult) -> None:
    app.choose_medication(visit.search, visit.medication)
    before = len(service.hook_calls())  # counted last: a tab click may re-send the previous order
    app.press_sign()
    call = _new_call(service, before, visit)
    if call["status_code"] != 200:
        result.problems.append(f"HTTP {call['status_code']} from the service: {call['error']}")
        app.screenshot(f"{visit.label}-refused")
        return
    if visit.outcome is None:
        if call["cards"] or call["outcome"] != "triaged-out":
            result.problems.append(f"expected no card, the service answered {call['outcome']} {call['cards']}")
        app.screenshot(f"{visit.label}-signed")
        return
    decisions = call["decisions"]
    if len(call["cards"]) != 1 or len(decisions) != 1:
        result.problems.append(f"expected one card and one decision, got {len(call['cards'])} / {len(decisions)}")
        return
    card = call["cards"][0]
    result.summary, result.outcome, result.policy = card["summary"], decisions[0]["outcome"], decisions[0]["policy"]
    if (result.outcome, result.policy) != (visit.outcome, visit.policy):
        result.problems.append(f"expected {visit.policy} {visit.outcome}, got {result.policy} {result.outcome}")
    criteria = card.get("extension", {}).get("ketamine-cds.decision", {}).get("criteria", [])
    unknown = frozenset(c["id"] for c in criteria if c["status"] == "unknown")
    if visit.unknown is not None and unknown != visit.unknown:
        result.problems.append(f"unknown criteria {sorted(unknown)}, expected {sorted(visit.unknown)}")
    xpath = app.card(card["summary"])  # the card the service sent is what the browser shows
    app.screenshot(f"{visit.label}-card")
    result.override_reason = app.dismiss(xpath, visit.override)
    result.feedback = wait_for(lambda: service.feedback_for(card["uuid"]), "the Dismiss feedback in the audit store")
    app.gone(xpath)
    app.screenshot(f"{visit.label}-dismissed")
    (row,) = result.feedback
    if row["outcome"] != "overridden":
        result.problems.append(f"feedback outcome {row['outcome']!r}, expected 'overridden'")
    has_reason = bool(row["override_reason"] and json.loads(row["override_reason"]))
    if has_reason != visit.override:
        result.problems.append(f"override reason stored: {has_reason}, expected {visit.override}")


def run(source: Path, artifacts: Path, cache_dir: Path = DEFAULT_CACHE_DIR) -> Report:
    """Everything above; never raises for a wrong outcome (see Report.problems), only when the stack cannot run."""
    artifacts.mkdir(parents=True, exist_ok=True)
    for old in artifacts.glob("*.png"):
        old.unlink()
    timings: dict[str, float] = {}
    results = [VisitResult(v) for v in VISITS]
    app: App | None = None
    with tempfile.TemporaryDirectory(prefix="sandbox-app-e2e-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        with _timed(timings, "build app"):
            build = build_app(source, cache_dir, progress=lambda m: print(f"  {m}", flush=True))
        with _timed(timings, "open FHIR server + scenarios"):
            fhir = stack.enter_context(FhirServerProcess(open_access=True).start())
            load_into(fhir.base_url, load_all(), token=None)
        service = ServiceUnderTest(workdir, fhir.base_url)
        stack.callback(service.stop)
        with _timed(timings, "service"):
            service.start()
        site = stack.enter_context(StaticSite(build))
        discovery = f"{service.base_url}/cds-services"
        urls = {
            v.patient_id: launch_url(
                site.url, fhir_server=fhir.base_url, patient_id=v.patient_id, discovery_url=discovery
            )
            for v in VISITS
        }
        with _timed(timings, "browser"):
            app = App(site.url, artifacts, workdir / "chromium-profile")
            stack.callback(app.quit)
            app.open()
            app.change_fhir_server(fhir.base_url)
            services_added = False
            for visit, result in zip(VISITS, results, strict=True):
                try:
                    if visit.via_picker:
                        app.change_patient(visit.via_picker, visit.patient_id)
                        if not services_added:
                            app.add_cds_services(discovery)
                            services_added = True
                    else:
                        app.open(urls[visit.patient_id])
                    app.patient_shown(visit.patient_id)
                    _visit(app, service, visit, result)
                except Exception as exc:  # one broken visit must not hide the others
                    first_line = str(exc).splitlines()[0] if str(exc) else ""
                    result.problems.append(f"{type(exc).__name__}: {first_line}")
                    with contextlib.suppress(Exception):
                        app.screenshot(f"{visit.label}-failed")
        if any(r.problems for r in results):
            (artifacts / "service.log").write_text(service.log_tail(20000), encoding="utf-8")
    return Report(results, timings, list(app.shots) if app else [], urls, sorted(app.quirks) if app else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, default=None, help=f"the app's source (default: ../{APP_SOURCE_RELATIVE})"
    )
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS, help="where screenshots go")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="npm install and build cache")
    args = parser.parse_args(argv)
    missing = missing_prerequisites() if args.source is None else []
    if missing:
        print("cannot run: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = run(args.source or find_app_source(), args.artifacts, args.cache_dir)  # type: ignore[arg-type]
    print(report.text())
    print(f"total {time.perf_counter() - started:.1f} s")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
