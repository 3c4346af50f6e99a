"""End to end, as in production: a real FHIR R4 server process (sekmet-fhir), the service under gunicorn
(`ketamine-cds serve`, real JWT, real HTTP), every sandbox scenario loaded and fired in prefetch and in
fallback mode — each answer compared with the scenario's expectation and checked against the Inferno CRD
rules — and the documented `gunicorn cds_service.wsgi:app` deployment."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
import requests

from cards import conformance_problems
from sandbox.demo import ServiceProcess, write_sandbox_keys
from sandbox.ehr import DEFAULT_ISSUER, EhrSimulator, check
from sandbox.fhir_server import FhirServerProcess, free_port
from sandbox.loader import load_into
from sandbox.scenarios import load_all
from sandbox.signing import load_key, sign_cds_jwt

pytestmark = pytest.mark.fhir_server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EhrSimulator, list, FhirServerProcess]]:
    workdir = tmp_path_factory.mktemp("e2e")
    fhir = FhirServerProcess().start()
    service = None
    try:
        scenarios = load_all(include_background=True)
        load_into(fhir.base_url, scenarios, token=fhir.token)
        key = write_sandbox_keys(workdir, [fhir.base_url])
        service = ServiceProcess(workdir, workdir / "trusted-issuers.json").start()
        simulator = EhrSimulator(service.base_url, fhir.base_url, fhir_token=fhir.token, key=key)
        service.wait_ready(simulator)
        yield simulator, scenarios, fhir
    finally:
        if service is not None:
            service.stop()
        fhir.stop()


@pytest.mark.parametrize("mode", ["prefetch", "fallback"])
def test_every_scenario_gets_its_expected_outcome(stack, mode: str) -> None:
    simulator, scenarios, _ = stack
    mismatches: dict[str, list[str]] = {}
    fired = 0
    today = date.today()
    for scenario in scenarios:
        # Background (Synthea-sized) patients too in fallback: searches ask for `_count` pages, so their records
        # are read to the end instead of stopping partial at the page bound.
        result = simulator.fire(scenario, mode, today=today)
        fired += 1
        problems = check(scenario, result)
        if result.response is not None and result.status == 200:
            sent_orders = scenario.shifted(today).draft_orders  # what the simulator signed, dates moved to today
            problems += [f"CRD: {p}" for p in conformance_problems(result.response, sent_orders)]
        if problems:
            mismatches[scenario.id] = problems
    assert fired == len(scenarios)
    assert not mismatches, "\n".join(f"{sid}: {'; '.join(p)}" for sid, p in mismatches.items())


def test_fallback_reads_the_record_from_the_fhir_server_with_the_bearer_token(stack) -> None:
    """A request without prefetch is answered from the FHIR server: the same outcome as with prefetch."""
    simulator, scenarios, _ = stack
    story = next(s for s in scenarios if not s.background and s.expected)
    with_prefetch = simulator.fire(story, "prefetch")
    without = simulator.fire(story, "fallback")
    assert without.prefetch_keys == ()
    assert with_prefetch.status == without.status == 200
    assert [d.outcome for d in with_prefetch.decisions] == [d.outcome for d in without.decisions]


class WorkerLog:
    """The lines a server process writes to stderr, read by a thread (a full pipe would block the server)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._process = process
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stderr is not None
        for raw in self._process.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, *, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(text in line for line in self.lines) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._process.poll() is not None:
                    return False
                self._changed.wait(min(remaining, 0.5))
            return True

    def tail(self) -> str:
        with self._changed:
            return "".join(self.lines)[-3000:]


def test_gunicorn_wsgi_module_serves_the_app(tmp_path: Path) -> None:
    """The README's production recipe: gunicorn 'cds_service.wsgi:app' configured by KETAMINE_CDS_* variables."""
    key = write_sandbox_keys(tmp_path, ["https://ehr.test/fhir"])
    port = free_port()
    env = {
        **os.environ,
        "KETAMINE_CDS_TRUSTED_ISSUERS": str(tmp_path / "trusted-issuers.json"),
        "KETAMINE_CDS_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "KETAMINE_CDS_DATABASE": f"sqlite:///{tmp_path / 'audit.db'}",
    }
    gunicorn = Path(sys.executable).with_name("gunicorn")
    process = subprocess.Popen(
        [
            str(gunicorn),
            "--bind",
            f"127.0.0.1:{port}",
            "--worker-class",
            "gthread",
            "--workers",
            "2",
            "--threads",
            "4",
            "cds_service.wsgi:app",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Readiness, not luck: the master accepts connections before its workers have loaded the app, so a
        # request can sit unanswered for as long as loading takes (a read timeout under load). Wait until
        # every worker has logged that its app is ready; only then speak HTTP.
        stderr = WorkerLog(process)
        assert stderr.wait_for("ketamine-cds ready", count=2, timeout=120), stderr.tail()
        r = requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=30)
        assert r.status_code == 200 and r.json()["services"][0]["id"] == "ketamine-prior-auth"
        body = {
            "hook": "order-sign",
            "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {
                "userId": "Practitioner/p",
                "patientId": "pt",
                "draftOrders": {
                    "resourceType": "Bundle",
                    "type": "collection",
                    "entry": [
                        {
                            "resource": {
                                "resourceType": "ServiceRequest",
                                "id": "lab",
                                "status": "draft",
                                "intent": "order",
                                "subject": {"reference": "Patient/pt"},
                                "requester": {"reference": "Practitioner/p"},
                                "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                            }
                        }
                    ],
                },
            },
        }
        url = f"http://127.0.0.1:{port}/cds-services/ketamine-prior-auth"
        token = sign_cds_jwt(load_key(tmp_path / "sandbox-key.json"), iss=DEFAULT_ISSUER, aud=url)
        assert key is not None
        answer = requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code == 200 and answer.json() == {"cards": [], "systemActions": []}
        # the same token again, very likely to another worker: the replay is refused (shared jti store)
        replay = requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert replay.status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=15)
