"""Latency and throughput of the service, printed as numbers (not a test).

Starts the real stack — sekmet-fhir with every sandbox scenario loaded, the service under gunicorn
(`ketamine-cds serve`, real JWT) — and measures, over real HTTP on loopback:

1. the hot path: order-sign for a non-ketamine order (triage answers at once, no FHIR access);
2. ketamine orders evaluated from prefetch and from the FHIR server (fallback), per scenario;
3. throughput with concurrent clients on a mix of the two;
4. in process: gathering-free evaluation (`Mappings.decide` + cards) on the MGB 031 base patient.

    python benchmarks/latency.py [--rounds 5] [--hot 500] [--clients 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import threading
import time
import uuid
from datetime import date, datetime
from pathlib import Path

import requests

from cards import build_response
from fhir_mappings.mappings import load_engine
from fhir_mappings.record import PatientRecord
from sandbox.demo import ServiceProcess, write_sandbox_keys
from sandbox.ehr import DEFAULT_ISSUER, EhrSimulator
from sandbox.fhir_server import FhirServerProcess
from sandbox.loader import load_into
from sandbox.scenarios import load_all
from sandbox.signing import sign_cds_jwt

ROOT = Path(__file__).resolve().parents[1]


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    return f"n={len(ordered):5d}  p50={pct(50):7.1f}  p95={pct(95):7.1f}  p99={pct(99):7.1f}  max={ordered[-1]:7.1f} ms"


def non_ketamine_body() -> dict:
    return {
        "hook": "order-sign",
        "hookInstance": str(uuid.uuid4()),
        "context": {
            "userId": "Practitioner/p1",
            "patientId": "pt1",
            "draftOrders": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [
                    {
                        "resource": {
                            "resourceType": "MedicationRequest",
                            "id": "amox",
                            "status": "draft",
                            "intent": "order",
                            "subject": {"reference": "Patient/pt1"},
                            "requester": {"reference": "Practitioner/p1"},
                            "medicationCodeableConcept": {
                                "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "308182"}]
                            },
                        }
                    }
                ],
            },
        },
    }


def hot_path(service_url: str, key, n: int) -> list[float]:
    url = f"{service_url}/cds-services/ketamine-prior-auth"
    session = requests.Session()
    times = []
    for _ in range(n):
        token = sign_cds_jwt(key, iss=DEFAULT_ISSUER, aud=url)
        started = time.perf_counter()
        r = session.post(url, json=non_ketamine_body(), headers={"Authorization": f"Bearer {token}"}, timeout=10)
        times.append((time.perf_counter() - started) * 1000)
        assert r.status_code == 200 and r.json() == {"cards": [], "systemActions": []}, r.text
    return times


def in_process(repeats: int) -> tuple[float, float]:
    """Mean ms of decide() and of decide()+cards on the MGB 031 base patient (record already gathered)."""
    base = json.loads((ROOT / "fhir_mappings/policies/mgbhp-031.cases/base.json").read_text())
    engine = load_engine()
    resources = [e["resource"] for e in base["bundle"]["entry"]]
    now = datetime.fromisoformat(base["anchor_date"] + "T17:00:00+00:00")
    groups = engine.triage(base["draft_orders"])
    decide_ms, full_ms = [], []
    for _ in range(repeats):
        record = PatientRecord.from_resources(
            base["patient_id"],
            now,
            copy.deepcopy(resources),
            engine.queries.supplied_types(),
            base["draft_orders"],
            user_id=base["user_id"],
            encounter_id=base["encounter_id"],
            references_resolvable=True,
        )
        started = time.perf_counter()
        decisions = engine.decide(record, groups)
        middle = time.perf_counter()
        build_response(
            decisions,
            base["draft_orders"],
            hook_instance=str(uuid.uuid4()),
            patient_id=base["patient_id"],
            user_id=base["user_id"],
            today=now.date(),
        )
        done = time.perf_counter()
        decide_ms.append((middle - started) * 1000)
        full_ms.append((done - started) * 1000)
    return statistics.mean(decide_ms), statistics.mean(full_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="evaluations per scenario and mode")
    parser.add_argument("--hot", type=int, default=500, help="non-ketamine calls")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput test")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the throughput test")
    args = parser.parse_args()

    decide_ms, full_ms = in_process(200)
    print(f"in process, MGB 031 base patient: decide {decide_ms:.1f} ms, decide + cards {full_ms:.1f} ms (mean of 200)")

    workdir = Path(tempfile.mkdtemp(prefix="ketamine-cds-bench-"))
    scenarios = load_all(include_background=True)
    stories = [s for s in scenarios if not s.background and s.has_expectations]
    with FhirServerProcess() as fhir:
        started = time.perf_counter()
        load_into(fhir.base_url, scenarios, token=fhir.token)
        print(f"loaded {len(scenarios)} scenarios into sekmet-fhir in {time.perf_counter() - started:.1f} s")
        key = write_sandbox_keys(workdir, [fhir.base_url])
        service = ServiceProcess(workdir, workdir / "trusted-issuers.json").start()
        try:
            simulator = EhrSimulator(service.base_url, fhir.base_url, fhir_token=fhir.token, key=key)
            service.wait_ready(simulator)
            print(f"\nover HTTP (gunicorn, {len(stories)} stories + {len(scenarios) - len(stories)} background):")
            print(f"  non-ketamine (triage only)   {percentiles(hot_path(service.base_url, key, args.hot))}")
            today = date.today()
            for mode in ("prefetch", "fallback"):
                times = []
                for _ in range(args.rounds):
                    for scenario in scenarios:
                        if scenario.expect_no_cards:
                            continue
                        result = simulator.fire(scenario, mode, today=today)
                        if result.status == 200:
                            times.append(result.latency_ms)
                print(f"  ketamine, {mode:8}           {percentiles(times)}")

            stop = time.monotonic() + args.seconds
            counts = {"calls": 0, "errors": 0}
            lock = threading.Lock()
            ketamine = [s for s in stories if not s.expect_no_cards]

            def client(index: int) -> None:
                own = EhrSimulator(service.base_url, fhir.base_url, fhir_token=fhir.token, key=key)
                i = index
                while time.monotonic() < stop:
                    scenario = ketamine[i % len(ketamine)]
                    result = own.fire(scenario, "prefetch" if i % 2 else "fallback", today=today)
                    i += args.clients
                    with lock:
                        counts["calls"] += 1
                        counts["errors"] += result.status != 200

            threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
            began = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - began
            print(
                f"  throughput: {counts['calls'] / elapsed:.1f} ketamine evaluations/s with {args.clients} clients "
                f"({counts['calls']} calls, {counts['errors']} errors, {elapsed:.1f} s; client-side prefetch "
                "queries included for half of them)"
            )
        finally:
            service.stop()


if __name__ == "__main__":
    main()
