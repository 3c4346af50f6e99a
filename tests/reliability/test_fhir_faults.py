"""FHIR access bounded per call and isolated between calls, proven against a fault-injecting FHIR server.

Every fault (trickling body or headers, a socket that never answers, 401/403/500, non-JSON, truncated,
`next` loops, a 50 MB chunked Bundle, connection refused) is answered within the call's budget, never as
"likely authorized", with nothing left behind (the fault server sees every connection closed, the client has
no fetch in flight). The key test: 20 concurrent calls against a trickling server do not delay a normal call
against a healthy one. The caller's token stays with its own `fhirServer`; large records are read to the
end with large pages, and a record cut by the page bound says so on the card.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cds_service.fhir_client import WATCHDOG, FhirClient
from fhir_mappings.record import Availability
from tests.reliability import corpus
from tests.reliability.fault_server import FaultServer, closed_port
from tests.reliability.fuzz import decision_outcomes
from tests.reliability.service import RunningService, run_service

FHIR_TIMEOUT, FETCH_BUDGET = 1.0, 2.0
ANSWER_MARGIN = 2.0  # seconds beyond the fetch budget for everything else a call does (generous on purpose)
FAULTS = [
    "trickle",
    "trickle-headers",
    "hang",
    "401",
    "403",
    "500",
    "nonjson",
    "truncated",
    "loop",
    "endless",
    "huge",
    "refused",
]
SLOW = {"trickle", "trickle-headers", "hang", "huge"}  # connections the client must cut and close itself
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def fault() -> Iterator[FaultServer]:
    server = FaultServer(corpus.resources()).start()
    yield server
    server.stop()


REFUSED = f"http://127.0.0.1:{closed_port()}/refused/fhir"


def _base(fault: FaultServer, mode: str) -> str:
    return REFUSED if mode == "refused" else fault.base(mode)


@pytest.fixture(scope="module")
def service(fault: FaultServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    bases = [_base(fault, mode) for mode in [*FAULTS, "healthy"]]
    running = run_service(
        tmp_path_factory.mktemp("faults"), bases, fhir_timeout=FHIR_TIMEOUT, fetch_budget=FETCH_BUDGET
    )
    yield running
    running.stop()


def _prefetch_without(*missing: str) -> dict[str, Any]:
    prefetch = corpus.full_prefetch()
    for key in missing:
        del prefetch[key]
    return prefetch


def _assert_nothing_left_behind(service: RunningService, fault: FaultServer, mode: str) -> None:
    deadline = time.monotonic() + 5
    while service.state.fhir.in_flight() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service.state.fhir.in_flight() == 0, "a fetch thread is still busy after the answer"
    if mode in SLOW:
        assert fault.wait_live(lambda live: live == 0, timeout=5), f"{fault.live} connection(s) left open"


@pytest.mark.parametrize("mode", FAULTS)
def test_each_fault_is_answered_within_the_budget_and_never_likely_authorized(
    service: RunningService, fault: FaultServer, mode: str
) -> None:
    """Observations are not prefetched and come from the faulty server: they are unavailable, so the PHQ-9
    severity criterion is unknown and the answer is "documentation needed", within the budget."""
    body = corpus.hook_request(prefetch=_prefetch_without("observations"), fhir_server=_base(fault, mode))

    response, elapsed = service.call(body)

    TIMINGS[mode] = elapsed
    print(f"\nfault {mode}: HTTP {response.status_code} in {elapsed:.2f} s")
    assert response.status_code == 200, response.text
    assert elapsed < FETCH_BUDGET + ANSWER_MARGIN
    outcomes = decision_outcomes(response.json())
    assert outcomes and "likely-authorized" not in outcomes
    detail = response.json()["cards"][0]["detail"]
    assert "Record not fully read: observations" in detail
    _assert_nothing_left_behind(service, fault, mode)


@pytest.mark.parametrize("mode", ["trickle", "hang", "refused", "huge"])
def test_nothing_prefetched_is_412_within_the_budget(service: RunningService, fault: FaultServer, mode: str) -> None:
    response, elapsed = service.call(corpus.hook_request(fhir_server=_base(fault, mode)))

    assert response.status_code == 412 and response.json()["resourceType"] == "OperationOutcome"
    assert elapsed < FETCH_BUDGET + ANSWER_MARGIN
    _assert_nothing_left_behind(service, fault, mode)


def test_a_healthy_server_gives_the_complete_answer(service: RunningService, fault: FaultServer) -> None:
    """The control: the same call against the healthy server is read completely and likely authorized."""
    response, elapsed = service.call(corpus.hook_request(fhir_server=fault.base("healthy")))

    TIMINGS["healthy"] = elapsed
    assert response.status_code == 200, response.text
    assert decision_outcomes(response.json()) == ["likely-authorized"]


def test_twenty_calls_against_a_trickling_server_do_not_delay_a_healthy_one(tmp_path: Path) -> None:
    """The key isolation test. 20 calls whose whole record comes from a trickling server saturate that
    server's fetch slots; a normal call against another (healthy) server, started while they are all still
    running, is answered well inside its own budget — before any of the trickling calls is."""
    trickling = FaultServer().start()
    healthy = FaultServer(corpus.resources()).start()
    fetch_budget = 4.0
    service = run_service(
        tmp_path,
        [trickling.base("trickle"), healthy.base("healthy")],
        fhir_timeout=3.0,
        fetch_budget=fetch_budget,
        fhir_concurrency=16,
    )
    finished: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def slow_call() -> None:
        response, _ = service.call(corpus.hook_request(fhir_server=trickling.base("trickle")))
        with lock:
            finished.append(time.monotonic())
            statuses.append(response.status_code)

    try:
        threads = [threading.Thread(target=slow_call) for _ in range(20)]
        for thread in threads:
            thread.start()
        # Readiness, not a sleep: the trickling server holds as many connections as one server may get.
        assert trickling.wait_live(lambda live: live >= 16, timeout=10)
        started = time.monotonic()
        response, elapsed = service.call(corpus.hook_request(fhir_server=healthy.base("healthy")))
        with lock:
            trickling_done_before = len(finished)
        for thread in threads:
            thread.join(timeout=60)

        print(
            f"\nisolation: healthy call {elapsed:.2f} s while 20 trickling calls ran; those answered "
            f"{min(finished) - started:.2f}..{max(finished) - started:.2f} s after it started (HTTP {set(statuses)})"
        )
        TIMINGS["healthy during 20 trickling calls"] = elapsed
        assert response.status_code == 200 and decision_outcomes(response.json()) == ["likely-authorized"]
        assert elapsed < fetch_budget, "the healthy call was held up by the trickling server"
        assert trickling_done_before == 0, "the healthy call should finish while the trickling calls still run"
        assert statuses == [412] * 20  # each trickling call: answered, required data unavailable
        assert trickling.wait_live(lambda live: live == 0, timeout=5)
        assert service.state.fhir.in_flight() == 0
    finally:
        service.stop()
        trickling.stop()
        healthy.stop()


def test_the_callers_token_stays_with_its_own_fhir_server(tmp_path: Path) -> None:
    """Both servers are allowed for the issuer, but the call named only the first: its `next` link to the
    second server is not followed, so the token never reaches it."""
    second = FaultServer(corpus.resources()).start()
    first = FaultServer(next_target=second.base("healthy") + "/Observation?patient=mgb-base").start()
    service = run_service(tmp_path, [first.base("elsewhere"), second.base("healthy")])
    try:
        body = corpus.hook_request(
            prefetch=_prefetch_without("observations"), fhir_server=first.base("elsewhere"), access_token="tok-first"
        )
        response, _ = service.call(body)

        assert response.status_code == 200
        assert [m for m, _, _ in first.requests_seen] and all(
            auth == "Bearer tok-first" for _, _, auth in first.requests_seen
        )
        assert second.requests_seen == []  # nothing, and so no token, went to the other server
        assert "next link outside allowed server" in response.json()["cards"][0]["detail"]
    finally:
        service.stop()
        first.stop()
        second.stop()


def _many_observations(n: int) -> list[dict[str, Any]]:
    template = {
        "resourceType": "Observation",
        "status": "final",
        "subject": {"reference": "Patient/mgb-base"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "effectiveDateTime": "2025-06-01T10:00:00Z",
        "valueQuantity": {"value": 70, "unit": "/min"},
    }
    return [{**copy.deepcopy(template), "id": f"hr-{i}"} for i in range(n)]


def test_a_large_record_is_read_to_the_end_with_large_pages(tmp_path: Path) -> None:
    """A Synthea-sized record (2,500 extra observations): `_count` pages, read completely, still likely
    authorized; the same server with the default 20-per-page would have hit the page bound."""
    server = FaultServer(corpus.resources() + _many_observations(2_500)).start()
    service = run_service(tmp_path, [server.base("healthy")], fhir_timeout=5.0, fetch_budget=10.0)
    try:
        response, elapsed = service.call(corpus.hook_request(fhir_server=server.base("healthy")))

        observation_requests = [p for _, p, _ in server.requests_seen if "/Observation?" in p]
        print(f"\nlarge record: {len(observation_requests)} Observation page(s), answered in {elapsed:.2f} s")
        assert response.status_code == 200
        assert all("_count=1000" in p for p in observation_requests) and len(observation_requests) == 3
        assert decision_outcomes(response.json()) == ["likely-authorized"]
        assert "Record not fully read" not in response.json()["cards"][0]["detail"]
    finally:
        service.stop()
        server.stop()


def test_a_record_cut_by_the_page_bound_is_partial_and_says_so(tmp_path: Path) -> None:
    server = FaultServer(corpus.resources() + _many_observations(10_500)).start()
    service = run_service(tmp_path, [server.base("healthy")], fhir_timeout=5.0, fetch_budget=15.0)
    try:
        response, _ = service.call(corpus.hook_request(fhir_server=server.base("healthy")))

        assert response.status_code == 200
        detail = response.json()["cards"][0]["detail"]
        assert "observations partial (page limit)" in detail
        assert decision_outcomes(response.json()) != ["likely-authorized"]
    finally:
        service.stop()
        server.stop()


def test_pools_are_keyed_by_the_allow_list_entry(service: RunningService, fault: FaultServer) -> None:
    """Sub-paths a caller varies under one allowed base share that entry's one pool (no pool per URL)."""
    for suffix in ("", "/", "/a", "/b/c", "/d"):
        body = corpus.hook_request(prefetch=_prefetch_without("observations"), fhir_server=fault.base("500") + suffix)
        response, _ = service.call(body)
        assert response.status_code == 200
    keys = service.state.fhir.pool_keys()
    assert len([k for k in keys if "/500/" in k]) == 1, keys


def test_idle_and_excess_pools_are_evicted() -> None:
    client = FhirClient(max_servers=2, idle_evict_seconds=3600)
    try:
        for n in range(5):
            client.fetch_many(
                f"http://127.0.0.1:{closed_port()}/fhir",
                {"a": "Patient/x"},
                token=None,
                deadline=time.monotonic() + 1,
                max_pages=1,
                url_allowed=lambda url: True,
                pool_key=f"server-{n}",
            )
        assert len(client.pool_keys()) <= 3  # the bound, plus the one in use
        client.idle_evict_seconds = 0.0
        client.fetch_many(
            f"http://127.0.0.1:{closed_port()}/fhir",
            {"a": "Patient/x"},
            token=None,
            deadline=time.monotonic() + 1,
            max_pages=1,
            url_allowed=lambda url: True,
            pool_key="last",
        )
        assert client.pool_keys() == ["last"]
    finally:
        client.close()


def test_the_watchdog_cuts_a_trickle_on_a_direct_fetch(fault: FaultServer) -> None:
    with FhirClient(timeout=0.5) as client:
        cut_before = WATCHDOG.cut
        started = time.monotonic()
        result = client.fetch(
            fault.base("trickle"),
            "Observation?patient=x",
            token=None,
            deadline=time.monotonic() + 5,
            max_pages=1,
            url_allowed=lambda url: True,
        )
        elapsed = time.monotonic() - started
    assert result.availability is Availability.UNAVAILABLE and result.reason == "timeout"
    assert elapsed < 0.5 + 1.0
    assert WATCHDOG.cut > cut_before
    assert fault.wait_live(lambda live: live == 0, timeout=5)


def test_fault_timings_summary() -> None:
    """Prints the figures (run the module with -s)."""
    if TIMINGS:
        print("\nfault timings: " + ", ".join(f"{mode} {seconds:.2f} s" for mode, seconds in TIMINGS.items()))
    assert all(seconds < 60 for seconds in TIMINGS.values())


def test_a_trickling_jwks_endpoint_is_cut_at_its_timeout(fault: FaultServer) -> None:
    """The issuer's JWKS URL trickles: the token is refused after the JWKS timeout, the socket closed."""
    from cds_service.auth import AuthError, JwtVerifier, TrustedIssuers
    from sandbox.signing import generate_key, sign_cds_jwt

    key = generate_key("ES384")
    jwks_url = fault.base("trickle") + "/jwks.json"
    issuers = TrustedIssuers.from_document({"issuers": [{"iss": "https://iss.test", "jwks_url": jwks_url}]})
    verifier = JwtVerifier(issuers, jwks_timeout=0.5)
    token = sign_cds_jwt(key, iss="https://iss.test", aud="https://cds.test/hook")

    started = time.monotonic()
    with pytest.raises(AuthError, match="JWKS"):
        verifier.verify(f"Bearer {token}", "https://cds.test/hook")
    assert time.monotonic() - started < 0.5 + 1.5
    assert fault.wait_live(lambda live: live == 0, timeout=5)
