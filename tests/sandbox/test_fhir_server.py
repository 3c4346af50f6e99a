"""The real sekmet FHIR server: start, load the examples, search them back, token enforced, clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
import requests

from sandbox.fhir_server import FhirServerError, FhirServerProcess, free_port
from sandbox.loader import LoadError, dependency_order, load_into
from sandbox.scenarios import PATIENTS_DIR, load_scenario
from tests.sandbox.helpers import EXAMPLE_IDS

pytestmark = pytest.mark.fhir_server


def _examples() -> list:
    return [load_scenario(PATIENTS_DIR / f"{scenario_id}.json") for scenario_id in EXAMPLE_IDS]


def test_bearer_token_is_enforced_but_metadata_is_open(fhir_server: FhirServerProcess) -> None:
    assert fhir_server.running
    assert fhir_server.startup_seconds is not None and fhir_server.startup_seconds < 15
    assert requests.get(f"{fhir_server.base_url}/metadata", timeout=5).status_code == 200
    assert requests.get(f"{fhir_server.base_url}/Patient", timeout=5).status_code == 401
    wrong = requests.get(f"{fhir_server.base_url}/Patient", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert wrong.status_code == 401
    assert fhir_server.session().get(f"{fhir_server.base_url}/Patient", timeout=5).status_code == 200


def test_load_examples_and_search_them_back(fhir_server: FhirServerProcess) -> None:
    today = date(2026, 11, 23)
    report = load_into(fhir_server.base_url, _examples(), token=fhir_server.token, today=today)
    assert report.scenario_ids == sorted(EXAMPLE_IDS)
    assert report.resource_count == 10

    session = fhir_server.session()
    base = fhir_server.base_url
    patient = session.get(f"{base}/Patient/ex-km-patient", timeout=5).json()
    assert patient["birthDate"] == (date(1985, 9, 2) + (today - date(2026, 1, 15))).isoformat()
    conditions = session.get(f"{base}/Condition", params={"patient": "ex-km-patient"}, timeout=5).json()
    assert [entry["resource"]["id"] for entry in conditions["entry"]] == ["ex-km-mdd"]
    # the urn:uuid subject was rewritten by the server to the PUT target
    assert conditions["entry"][0]["resource"]["subject"]["reference"].endswith("Patient/ex-km-patient")
    coverage = session.get(
        f"{base}/Coverage",
        params={"patient": "ex-km-patient", "status": "active", "_include": "Coverage:payor"},
        timeout=5,
    ).json()
    assert sorted(entry["resource"]["resourceType"] for entry in coverage["entry"]) == ["Coverage", "Organization"]
    statement = session.get(f"{base}/MedicationStatement/ex-km-sertraline", timeout=5).json()
    assert statement["effectivePeriod"]["start"] == (date(2025, 9, 1) + (today - date(2026, 1, 15))).isoformat()
    # draft orders are what is being signed now: never stored as history
    drafts = session.get(f"{base}/MedicationRequest", params={"patient": "ex-km-patient"}, timeout=5).json()
    assert drafts.get("total", len(drafts.get("entry", []))) == 0


def test_loading_twice_is_idempotent(fhir_server: FhirServerProcess) -> None:
    load_into(fhir_server.base_url, _examples(), token=fhir_server.token)
    load_into(fhir_server.base_url, _examples(), token=fhir_server.token, today=date.today() + timedelta(days=1))
    bundle = fhir_server.session().get(f"{fhir_server.base_url}/Patient", params={"_id": "ex-km-patient"}).json()
    assert len(bundle["entry"]) == 1


def test_refused_transaction_names_the_scenario_with_diagnostics(fhir_server: FhirServerProcess) -> None:
    scenario = _examples()[0]
    scenario.bundle["entry"][0]["resource"]["birthDate"] = "not-a-date"
    with pytest.raises(LoadError) as error:
        load_into(fhir_server.base_url, [scenario], token=fhir_server.token)
    message = str(error.value)
    assert "scenario example-ketamine-minimal" in message
    assert "HTTP 400" in message
    assert "birthDate" in message
    assert '"resourceType": "Bundle"' not in message  # diagnostics, not the bundle


def test_wrong_token_is_a_load_error(fhir_server: FhirServerProcess) -> None:
    with pytest.raises(LoadError, match="HTTP 401"):
        load_into(fhir_server.base_url, _examples(), token="wrong")


def test_dependency_order_puts_writers_first() -> None:
    ketamine, non_ketamine = _examples()
    assert [s.id for s in dependency_order([non_ketamine, ketamine])] == sorted(EXAMPLE_IDS)  # no needs: id order
    ketamine.bundle["entry"][0]["resource"]["link"] = [
        {"other": {"reference": "Patient/ex-nk-patient"}, "type": "seealso"}
    ]  # example-ketamine-minimal now needs a resource example-non-ketamine writes
    assert [s.id for s in dependency_order([ketamine, non_ketamine])] == [
        "example-non-ketamine",
        "example-ketamine-minimal",
    ]
    non_ketamine.bundle["entry"][0]["resource"]["generalPractitioner"] = [
        {"reference": "PractitionerRole/ex-psych-role"}
    ]  # and vice versa: a cycle still yields every scenario exactly once
    assert sorted(s.id for s in dependency_order([non_ketamine, ketamine])) == sorted(EXAMPLE_IDS)


def test_stop_leaves_no_process_and_no_data() -> None:
    server = FhirServerProcess().start()
    pid, workdir = server.pid, server.log_path.parent if server.log_path else None
    assert pid is not None and workdir is not None and workdir.exists()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()
    assert not server.running


def test_context_manager_stops_on_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"), FhirServerProcess() as server:
        pid = server.pid
        raise RuntimeError("boom")
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_start_failure_reports_the_log_tail(fhir_server: FhirServerProcess) -> None:
    clash = FhirServerProcess(start_timeout=10)
    with pytest.raises(FhirServerError) as error:
        clash.start(port=fhir_server.port)  # taken: the new sekmet exits, and the old one must not pass for it
    assert "exited with code" in str(error.value)
    assert "address already in use" in str(error.value).lower()
    assert not clash.running
    assert fhir_server.running


def test_lost_port_race_is_retried_on_another_port(
    fhir_server: FhirServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([fhir_server.port, free_port()])  # the first "free" port gets taken before sekmet binds it
    monkeypatch.setattr("sandbox.fhir_server.free_port", lambda: next(ports))
    with FhirServerProcess().start() as server:
        assert server.port != fhir_server.port
        assert server.session().get(f"{server.base_url}/Patient", timeout=5).status_code == 200


def test_free_port_is_bindable() -> None:
    assert 1024 < free_port() < 65536


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_server_command_leaves_no_orphan_when_killed(sig: signal.Signals) -> None:
    """`sandbox server` stops sekmet on SIGTERM (cleanly) and even on SIGKILL (the kernel's parent-death signal)."""
    command = subprocess.Popen(
        [sys.executable, "-m", "sandbox.cli", "sandbox", "server"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert command.stdout is not None
        first_line = command.stdout.readline()
        assert first_line.startswith("FHIR base URL: http://127.0.0.1:"), first_line
        command.stdout.readline()  # bearer token
        data_dir = Path(command.stdout.readline().split(":", 1)[1].strip())
        assert data_dir.is_dir()
        children = _children(command.pid)
        assert len(children) == 1
        os.kill(command.pid, sig)
        command.wait(timeout=15)
        assert _wait_gone(children[0]), "sekmet outlived the command"
        if sig == signal.SIGTERM:
            assert not data_dir.exists(), "a clean stop deletes the data"
        shutil.rmtree(data_dir, ignore_errors=True)  # after SIGKILL nobody could
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
