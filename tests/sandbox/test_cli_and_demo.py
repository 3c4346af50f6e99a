"""The sandbox commands and the one-command demo, with stub CDS services standing in for the real one."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pytest

from cds_service.auth import TrustedIssuers
from sandbox.cli import main, register
from sandbox.demo import RunRow, ServiceProcess, latency_summary, percentile, pick_showcase, run_demo
from sandbox.ehr import FireResult, ObservedDecision
from sandbox.fhir_server import FhirServerProcess
from sandbox.scenarios import PATIENTS_DIR, load_scenario
from sandbox.signing import load_key
from tests.sandbox.helpers import EXAMPLE_IDS, StubCdsService, example_responder

STUB_SCRIPT = Path(__file__).with_name("stub_service_main.py")
TEMPLATES = {"patient": "Patient/{{context.patientId}}", "coverage": "Coverage?patient={{context.patientId}}"}


@pytest.fixture
def examples_dir(tmp_path: Path) -> Path:
    """Only the two example scenarios (the real library may grow next to them)."""
    folder = tmp_path / "patients"
    folder.mkdir()
    for scenario_id in EXAMPLE_IDS:
        (folder / f"{scenario_id}.json").write_text((PATIENTS_DIR / f"{scenario_id}.json").read_text())
    return folder


@pytest.fixture
def keys_dir(tmp_path: Path, fhir_server: FhirServerProcess) -> Path:
    out = tmp_path / "keys"
    assert main(["sandbox", "keys", "--out", str(out), "--fhir-server", fhir_server.base_url]) == 0
    return out


# ---------------------------------------------------------------------- argparse wiring


def test_register_adds_sandbox_and_demo_commands() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sandbox", "fire", "some-id", "--service", "http://s", "--fhir-server", "http://f",
                              "--key", "k.json", "--mode", "fallback"])  # fmt: skip
    assert (args.scenario_id, args.mode, args.issuer, args.service_id) == (
        "some-id",
        "fallback",
        "https://ehr.sandbox.ketamine-cds.invalid",
        "ketamine-prior-auth",
    )
    assert callable(args.func)
    demo_args = parser.parse_args(["demo", "--keep-running", "--today", "2026-01-15"])
    assert demo_args.keep_running and demo_args.today == date(2026, 1, 15) and demo_args.fhir_server is None
    with pytest.raises(SystemExit):
        parser.parse_args(["sandbox", "check", "--service", "http://s"])  # --key and --fhir-server are required


# ---------------------------------------------------------------------- commands against real FHIR + stub service


@pytest.mark.fhir_server
def test_keys_writes_a_key_and_a_trusted_issuers_file_the_service_accepts(
    keys_dir: Path, fhir_server: FhirServerProcess
) -> None:
    key = load_key(keys_dir / "sandbox-key.json")
    assert key.alg == "ES384"
    assert oct(os.stat(keys_dir / "sandbox-key.json").st_mode & 0o777) == "0o600"
    issuers = TrustedIssuers.load(keys_dir / "trusted-issuers.json")
    issuer = issuers.get("https://ehr.sandbox.ketamine-cds.invalid")
    assert issuer is not None and issuer.fhir_servers == (fhir_server.base_url,)


@pytest.mark.fhir_server
def test_load_fire_and_check_commands(
    examples_dir: Path, keys_dir: Path, fhir_server: FhirServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    fhir = ["--fhir-server", fhir_server.base_url, "--fhir-token", fhir_server.token or ""]
    assert main(["sandbox", "load", *fhir, "--scenarios", str(examples_dir)]) == 0
    assert "loaded 2 scenarios, 10 resources" in capsys.readouterr().out

    stub = StubCdsService(TEMPLATES, example_responder()).start()
    try:
        service = ["--service", stub.base_url, "--key", str(keys_dir / "sandbox-key.json"), *fhir]
        scenarios = ["--scenarios", str(examples_dir)]

        assert main(["sandbox", "fire", "example-ketamine-minimal", *service, *scenarios]) == 0
        out = capsys.readouterr().out
        assert "example-ketamine-minimal [prefetch] HTTP 200" in out
        assert "decision: mgbhp-031 · criteria-not-met · initial · MedicationRequest/ex-km-ketamine" in out
        assert "matches the expected outcome" in out
        assert stub.hook_calls()[-1]["json"]["prefetch"]["patient"]["id"] == "ex-km-patient"

        assert main(["sandbox", "check", *service, *scenarios]) == 0
        out = capsys.readouterr().out
        assert out.count(" ✓") == 4  # two scenarios × two modes
        assert "4/4 expected outcomes matched; 0 unchecked (background)" in out
        assert "p50=" in out

        stub.responder = example_responder("likely-authorized")
        assert main(["sandbox", "check", *service, *scenarios, "--mode", "fallback"]) == 1
        out = capsys.readouterr().out
        assert "✗ example-ketamine-minimal [fallback]" in out
        assert "got mgbhp-031 likely-authorized initial" in out
        assert "1/2 expected outcomes matched" in out

        assert main(["sandbox", "fire", "no-such-scenario", *service, *scenarios]) == 2
        assert "known ids" in capsys.readouterr().err
    finally:
        stub.stop()


# ---------------------------------------------------------------------- the demo, with a stub service process


@dataclass
class StubServiceControl:
    """What the demo's service subprocess will answer, and the pids it was started with."""

    outcome: str = "criteria-not-met"  # "crash" makes it exit during start-up
    pids: list[int] = field(default_factory=list)


@pytest.fixture
def stub_service(monkeypatch: pytest.MonkeyPatch) -> StubServiceControl:
    """Make the demo start tests/sandbox/stub_service_main.py instead of the real service."""
    control = StubServiceControl()
    original_start = ServiceProcess.start

    def command(self: ServiceProcess) -> list[str]:
        return [sys.executable, str(STUB_SCRIPT), str(self.port), control.outcome]

    def start(self: ServiceProcess) -> ServiceProcess:
        started = original_start(self)
        assert started.process is not None
        control.pids.append(started.process.pid)
        return started

    monkeypatch.setattr(ServiceProcess, "command", command)
    monkeypatch.setattr(ServiceProcess, "start", start)
    return control


def _assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.fhir_server
def test_demo_runs_end_to_end_and_stops_everything(stub_service: StubServiceControl, examples_dir: Path) -> None:
    output = io.StringIO()
    code = run_demo(scenarios_dir=examples_dir, stream=output, today=date(2026, 11, 23))
    text = output.getvalue()

    assert code == 0, text
    assert "2 scenarios read (2 stories, 0 background)" in text
    assert "FHIR server ready at http://127.0.0.1:" in text
    assert "loaded 2 scenarios, 10 resources" in text
    assert "service ready (discovery answered)" in text
    table_rows = [line for line in text.splitlines() if line.startswith("example-")]
    assert len(table_rows) == 4 and all(line.endswith("✓") for line in table_rows)
    assert any("prefetch" in line and "mgbhp-031 criteria-not-met initial" in line for line in table_rows)
    assert "=== example-ketamine-minimal:" in text and "[INFO] mgbhp-031: criteria-not-met" in text
    assert "latency of the hook call (ms):" in text and "all      n=4" in text
    assert "4/4 expected outcomes matched" in text
    for pid in stub_service.pids:
        _assert_gone(pid)
    workdir = text.split("trusted issuers written to ", 1)[1].split()[0]
    assert not Path(workdir).exists(), "the demo's key/audit temp dir is removed"


@pytest.mark.fhir_server
def test_demo_reports_mismatches_with_exit_1(
    stub_service: StubServiceControl, examples_dir: Path, fhir_server: FhirServerProcess
) -> None:
    stub_service.outcome = "blocked"
    output = io.StringIO()
    code = run_demo(
        fhir_server=fhir_server.base_url, fhir_token=fhir_server.token, scenarios_dir=examples_dir, stream=output
    )
    text = output.getvalue()
    assert code == 1, text
    assert "FHIR server ready" not in text  # an external FHIR server is used as given
    assert "✗ example-ketamine-minimal [prefetch]" in text
    assert "expected mgbhp-031 criteria-not-met initial, got mgbhp-031 blocked initial" in text
    assert "2/4 expected outcomes matched" in text
    for pid in stub_service.pids:
        _assert_gone(pid)


@pytest.mark.fhir_server
def test_demo_setup_failure_exits_2_with_the_service_log(
    stub_service: StubServiceControl, examples_dir: Path, fhir_server: FhirServerProcess
) -> None:
    stub_service.outcome = "crash"
    output = io.StringIO()
    code = run_demo(
        fhir_server=fhir_server.base_url, fhir_token=fhir_server.token, scenarios_dir=examples_dir, stream=output
    )
    text = output.getvalue()
    assert code == 2
    assert "FAILED: EhrError: the service exited with code 1 during start-up" in text
    assert "stub service: refusing to start" in text


# ---------------------------------------------------------------------- reporting helpers


def test_percentile_is_nearest_rank() -> None:
    values = [float(value) for value in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.95), percentile(values, 1.0)) == (50.0, 95.0, 100.0)
    assert percentile([7.0], 0.95) == 7.0


def _row(scenario_id: str, mode: str, outcome: str | None, latency: float) -> RunRow:
    scenario = load_scenario(PATIENTS_DIR / f"{scenario_id}.json")
    decisions = [ObservedDecision(scenario.order_refs[0], "mgbhp-031", outcome, None)] if outcome else []
    response = {"cards": [{"summary": "x"}] if outcome else [], "systemActions": []}
    return RunRow(scenario, FireResult(scenario_id, mode, 200, response, latency, decisions), [])  # type: ignore[arg-type]


def test_latency_summary_and_showcase() -> None:
    rows = [
        _row("example-ketamine-minimal", "prefetch", "criteria-not-met", 10.0),
        _row("example-ketamine-minimal", "fallback", "criteria-not-met", 30.0),
        _row("example-non-ketamine", "prefetch", None, 2.0),
        _row("example-non-ketamine", "fallback", None, 4.0),
    ]
    lines = latency_summary(rows)
    assert lines[0].split() == ["prefetch", "n=2", "p50=", "2.0", "p95=", "10.0", "max=", "10.0"]
    assert lines[2].split()[:2] == ["all", "n=4"]
    showcase = pick_showcase(rows)
    assert [(row.scenario.id, row.result.mode) for row in showcase] == [
        ("example-ketamine-minimal", "prefetch"),
        ("example-non-ketamine", "prefetch"),
    ]
    assert [row.scenario.id for row in pick_showcase(rows, ["example-non-ketamine"])] == ["example-non-ketamine"]


def test_keys_json_is_valid(tmp_path: Path) -> None:
    assert main(["sandbox", "keys", "--out", str(tmp_path), "--fhir-server", "http://127.0.0.1:1/fhir"]) == 0
    document = json.loads((tmp_path / "trusted-issuers.json").read_text())
    assert document["issuers"][0]["jwks"]["keys"][0]["crv"] == "P-384"
