"""FhirClient: headers, URL encoding, paging bounds, allowed-server checks, failures, deadline, parallelism."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from cds_service.fhir_client import FetchResult, FhirClient, build_url
from fhir_mappings.record import Availability

BASE = "https://ehr.example.org/fhir"
TOKEN = "secret-token-abc123"
PATIENT = "pat-4711"


def allowed(url: str) -> bool:
    return url.startswith(BASE + "/")


def bundle(*resources: dict, next_url: str | None = None, outcome: dict | None = None) -> dict:
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
        for r in resources
    ]
    if outcome is not None:
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    body: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    if next_url:
        body["link"] = [{"relation": "self", "url": "ignored"}, {"relation": "next", "url": next_url}]
    return body


def condition(n: int) -> dict:
    return {"resourceType": "Condition", "id": f"c{n}", "subject": {"reference": f"Patient/{PATIENT}"}}


def outcome(severity: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": "processing"}]}


@pytest.fixture
def client() -> Iterator[FhirClient]:
    with FhirClient(timeout=1.0, max_workers=16) as fhir_client:
        yield fhir_client


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def fetch(client: FhirClient, relative_url: str, **kwargs: Any) -> FetchResult:
    options: dict[str, Any] = {
        "token": TOKEN,
        "deadline": time.monotonic() + 5,
        "max_pages": 10,
        "url_allowed": allowed,
    }
    options.update(kwargs)
    return client.fetch(BASE, relative_url, **options)


# -- requests as sent --------------------------------------------------------------------------------


def test_sends_bearer_token_and_fhir_accept_and_keeps_code_tokens_intact(
    client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/Observation", json=bundle())

    result = fetch(client, f"Observation?patient={PATIENT}&code=http://loinc.org|44261-6,http://loinc.org|8480-6")

    assert result.availability is Availability.READ and result.pages == 1 and result.status == 200
    request = mocked.calls[0].request
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Accept"] == "application/fhir+json"
    query = parse_qs(urlsplit(request.url).query)
    assert query["code"] == ["http://loinc.org|44261-6,http://loinc.org|8480-6"]
    assert query["patient"] == [PATIENT]


def test_no_authorization_header_without_token(client: FhirClient, mocked: responses.RequestsMock) -> None:
    mocked.get(f"{BASE}/Condition", json=bundle())

    fetch(client, f"Condition?patient={PATIENT}", token=None)

    assert "Authorization" not in mocked.calls[0].request.headers


def test_netrc_credentials_never_replace_the_bearer_token(
    client: FhirClient, mocked: responses.RequestsMock, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine ehr.example.org login someone password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    mocked.get(f"{BASE}/Condition", json=bundle())

    fetch(client, f"Condition?patient={PATIENT}")
    fetch(client, f"Condition?patient={PATIENT}", token=None)

    assert mocked.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Authorization" not in mocked.calls[1].request.headers


@pytest.mark.parametrize(
    ("base", "relative", "expected"),
    [
        ("https://h/fhir", "Patient/p1", "https://h/fhir/Patient/p1"),
        ("https://h/fhir/", "/Patient/p1", "https://h/fhir/Patient/p1"),
        ("https://h/fhir/", "Condition?patient=a%26b", "https://h/fhir/Condition?patient=a%26b"),
        (
            "https://h/fhir",
            "Coverage?patient=p&_include=Coverage:payor",
            "https://h/fhir/Coverage?patient=p&_include=Coverage:payor",
        ),
        (
            "https://h/fhir",
            "Observation?code=http://loinc.org|1-8",
            "https://h/fhir/Observation?code=http://loinc.org%7C1-8",
        ),
        ("https://h/fhir", "https://h/fhir?_getpages=x&page=2", "https://h/fhir?_getpages=x&page=2"),
    ],
)
def test_build_url(base: str, relative: str, expected: str) -> None:
    assert build_url(base, relative) == expected


def test_one_pooled_session_per_server_without_cookies(client: FhirClient, mocked: responses.RequestsMock) -> None:
    mocked.get(
        f"{BASE}/Patient/{PATIENT}",
        json={"resourceType": "Patient", "id": PATIENT},
        headers={"Set-Cookie": "SESSION=abc; Path=/"},
    )

    fetch(client, f"Patient/{PATIENT}")

    session = client._session(BASE)
    assert client._session(BASE + "/") is session
    assert client._session("https://other.example.org/fhir") is not session
    assert session.get_adapter(BASE).poolmanager.connection_pool_kw["maxsize"] >= client.max_workers
    assert len(session.cookies) == 0  # a shared session must not carry one caller's cookie to the next


# -- logs ----------------------------------------------------------------------------------------------


def test_token_and_patient_id_never_logged(
    client: FhirClient, mocked: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    mocked.get(f"{BASE}/Patient/{PATIENT}", json={"resourceType": "Patient", "id": PATIENT})
    mocked.get(f"{BASE}/Condition", body=requests.exceptions.ReadTimeout(f"{BASE}/Condition?patient={PATIENT}"))
    mocked.get(f"{BASE}/Procedure", status=500, json=outcome("error"))
    mocked.get(f"{BASE}/Encounter", body=requests.exceptions.ConnectionError(f"{BASE}/Encounter?patient={PATIENT}"))

    results = client.fetch_many(
        BASE,
        {
            "patient": f"Patient/{PATIENT}",
            "conditions": f"Condition?patient={PATIENT}",
            "procedures": f"Procedure?patient={PATIENT}",
            "encounters": f"Encounter?patient={PATIENT}",
        },
        token=TOKEN,
        deadline=time.monotonic() + 5,
        max_pages=10,
        url_allowed=allowed,
    )

    assert results["conditions"].reason == "timeout"
    assert results["encounters"].reason == "connection error (ConnectionError)"
    assert caplog.records, "each fetch is logged"
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert TOKEN not in text and PATIENT not in text and "ehr.example.org" not in text
    assert "conditions (Condition)" in text  # key and resource type are what a log line says


# -- paging ----------------------------------------------------------------------------------------------


def register_pages(mocked: responses.RequestsMock, count: int) -> None:
    """Condition search with `count` pages: page n links to page n+1 through `_page=n+1`."""

    def page(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        number = int(parse_qs(urlsplit(request.url).query).get("_page", ["1"])[0])
        following = f"{BASE}/Condition?_getpages=abc&_page={number + 1}" if number < count else None
        return 200, {}, json.dumps(bundle(condition(number), next_url=following))

    mocked.add_callback(responses.GET, f"{BASE}/Condition", callback=page)


def test_follows_next_links(client: FhirClient, mocked: responses.RequestsMock) -> None:
    register_pages(mocked, 3)

    result = fetch(client, f"Condition?patient={PATIENT}")

    assert result.availability is Availability.READ
    assert result.pages == 3 and [r["id"] for r in result.resources] == ["c1", "c2", "c3"]
    assert set(result.full_urls) == {f"{BASE}/Condition/c{n}" for n in (1, 2, 3)}
    assert mocked.calls[1].request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_paging_is_bounded(client: FhirClient, mocked: responses.RequestsMock) -> None:
    register_pages(mocked, 5)

    result = fetch(client, f"Condition?patient={PATIENT}", max_pages=2)

    assert result.availability is Availability.PARTIAL and result.reason == "page limit"
    assert result.pages == 2 and len(result.resources) == 2
    assert len(mocked.calls) == 2


def test_next_link_to_another_host_is_never_requested(client: FhirClient, mocked: responses.RequestsMock) -> None:
    evil = mocked.get("https://evil.example.com/steal", json=bundle(condition(9)))
    mocked.get(f"{BASE}/Condition", json=bundle(condition(1), next_url="https://evil.example.com/steal?page=2"))

    result = fetch(client, f"Condition?patient={PATIENT}")

    assert result.availability is Availability.PARTIAL
    assert result.reason == "next link outside allowed server"
    assert [r["id"] for r in result.resources] == ["c1"]
    assert evil.call_count == 0 and len(mocked.calls) == 1


def test_first_url_outside_allowed_server_is_never_requested(
    client: FhirClient, mocked: responses.RequestsMock
) -> None:
    result = client.fetch(
        "https://evil.example.com/fhir",
        "Condition?patient=x",
        token=TOKEN,
        deadline=time.monotonic() + 5,
        max_pages=10,
        url_allowed=allowed,
    )

    assert result.availability is Availability.UNAVAILABLE and result.reason == "URL outside allowed server"
    assert len(mocked.calls) == 0


def test_next_link_loop_stops(client: FhirClient, mocked: responses.RequestsMock) -> None:
    loop = f"{BASE}/Condition?patient={PATIENT}&_count=1000"  # the first URL (searches ask for large pages)
    mocked.get(f"{BASE}/Condition", json=bundle(condition(1), next_url=loop))

    result = fetch(client, f"Condition?patient={PATIENT}")

    assert result.availability is Availability.PARTIAL and result.reason == "next link loop"
    assert len(mocked.calls) == 1


def test_failure_on_a_later_page_keeps_earlier_pages_as_partial(
    client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/Condition", json=bundle(condition(1), next_url=f"{BASE}/page2"))
    mocked.get(f"{BASE}/page2", status=503)

    result = fetch(client, f"Condition?patient={PATIENT}")

    assert result.availability is Availability.PARTIAL and result.reason == "HTTP 503" and result.status == 503
    assert result.pages == 1 and len(result.resources) == 1


# -- failures -----------------------------------------------------------------------------------------------


def test_redirect_is_not_followed(client: FhirClient, mocked: responses.RequestsMock) -> None:
    target = mocked.get("https://evil.example.com/fhir/Condition", json=bundle(condition(1)))
    mocked.get(f"{BASE}/Condition", status=302, headers={"Location": "https://evil.example.com/fhir/Condition"})

    result = fetch(client, f"Condition?patient={PATIENT}")

    assert result.availability is Availability.UNAVAILABLE and result.status == 302
    assert result.reason.startswith("HTTP 302")
    assert target.call_count == 0


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (requests.exceptions.ReadTimeout(), "timeout"),
        (requests.exceptions.ConnectTimeout(), "timeout"),
        (requests.exceptions.ConnectionError(), "connection error (ConnectionError)"),
        (requests.exceptions.SSLError(), "connection error (SSLError)"),
    ],
)
def test_network_failures_are_unavailable_never_raised(
    client: FhirClient, mocked: responses.RequestsMock, error: Exception, reason: str
) -> None:
    mocked.get(f"{BASE}/Condition", body=error)

    result = fetch(client, f"Condition?patient={PATIENT}")

    assert result.availability is Availability.UNAVAILABLE and result.reason == reason and result.resources == []


def test_deadline_passed_means_no_request(client: FhirClient, mocked: responses.RequestsMock) -> None:
    mocked.get(f"{BASE}/Condition", json=bundle())

    result = fetch(client, f"Condition?patient={PATIENT}", deadline=time.monotonic() - 0.01)

    assert result.availability is Availability.UNAVAILABLE and result.reason == "deadline"
    assert len(mocked.calls) == 0


def test_deadline_reached_while_paging_stops_with_partial(client: FhirClient, mocked: responses.RequestsMock) -> None:
    def slow_first_page(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        time.sleep(0.3)
        return 200, {}, json.dumps(bundle(condition(1), next_url=f"{BASE}/page2"))

    mocked.add_callback(responses.GET, f"{BASE}/Condition", callback=slow_first_page)
    page2 = mocked.get(f"{BASE}/page2", json=bundle(condition(2)))

    result = fetch(client, f"Condition?patient={PATIENT}", deadline=time.monotonic() + 0.2)

    assert result.availability is Availability.PARTIAL and result.reason == "deadline" and result.pages == 1
    assert page2.call_count == 0


@pytest.mark.parametrize("status", [404, 410])
def test_read_of_missing_resource_is_read_with_no_data(
    client: FhirClient, mocked: responses.RequestsMock, status: int
) -> None:
    mocked.get(f"{BASE}/Patient/{PATIENT}", status=status, json=outcome("error"))

    result = fetch(client, f"Patient/{PATIENT}")

    assert result.availability is Availability.READ and result.reason == "not found"
    assert result.resources == [] and result.status == status


def test_read_returns_the_resource(client: FhirClient, mocked: responses.RequestsMock) -> None:
    mocked.get(f"{BASE}/Patient/{PATIENT}", json={"resourceType": "Patient", "id": PATIENT})

    result = fetch(client, f"Patient/{PATIENT}")

    assert result.availability is Availability.READ and result.resources == [{"resourceType": "Patient", "id": PATIENT}]


@pytest.mark.parametrize(
    ("relative", "status", "body", "reason"),
    [
        ("Patient/p1", 500, {"resourceType": "OperationOutcome"}, "HTTP 500"),
        ("Patient/p1", 403, None, "HTTP 403"),
        ("Patient/p1", 200, outcome("error"), "OperationOutcome"),
        ("Patient/p1", 200, {"resourceType": "Practitioner", "id": "p1"}, "unexpected resourceType"),
        ("Patient/p1", 200, "not json {", "invalid JSON"),
        ("Condition?patient=p1", 404, None, "HTTP 404"),
        ("Condition?patient=p1", 401, None, "HTTP 401"),
        ("Condition?patient=p1", 200, outcome("error"), "OperationOutcome"),
        ("Condition?patient=p1", 200, {"resourceType": "Condition", "id": "c"}, "not a searchset Bundle"),
        ("Condition?patient=p1", 200, {"resourceType": "Bundle", "type": "transaction"}, "not a searchset Bundle"),
        ("Condition?patient=p1", 200, [1, 2], "not a FHIR resource"),
        ("Condition?patient=p1", 200, "<html>login</html>", "invalid JSON"),
    ],
)
def test_errors_and_wrong_bodies_are_unavailable(
    client: FhirClient, mocked: responses.RequestsMock, relative: str, status: int, body: Any, reason: str
) -> None:
    text = body if isinstance(body, str) else json.dumps(body) if body is not None else ""
    mocked.get(f"{BASE}/{relative.partition('?')[0]}", status=status, body=text)

    result = fetch(client, relative)

    assert result.availability is Availability.UNAVAILABLE and result.reason == reason and result.resources == []


@pytest.mark.parametrize("severity", ["error", "fatal"])
def test_error_operation_outcome_in_bundle_is_unavailable(
    client: FhirClient, mocked: responses.RequestsMock, severity: str
) -> None:
    mocked.get(f"{BASE}/Condition", json=bundle(condition(1), outcome=outcome(severity)))

    result = fetch(client, f"Condition?patient={PATIENT}")

    assert result.availability is Availability.UNAVAILABLE and result.reason == "OperationOutcome"


@pytest.mark.parametrize("severity", ["warning", "information"])
def test_warning_operation_outcome_in_bundle_is_fine_and_not_data(
    client: FhirClient, mocked: responses.RequestsMock, severity: str
) -> None:
    mocked.get(f"{BASE}/Condition", json=bundle(condition(1), outcome=outcome(severity)))

    result = fetch(client, f"Condition?patient={PATIENT}")

    assert result.availability is Availability.READ and result.reason == ""
    assert [r["resourceType"] for r in result.resources] == ["Condition"]


def test_oversize_response_is_refused(mocked: responses.RequestsMock) -> None:
    many = bundle(*(condition(n) for n in range(200)))
    mocked.get(f"{BASE}/Condition", json=many)
    mocked.get(
        f"{BASE}/Patient/{PATIENT}",
        json={"resourceType": "Patient", "id": PATIENT},
        headers={"Content-Length": "999999"},
    )

    with FhirClient(max_response_bytes=2_000) as small:
        streamed = fetch(small, f"Condition?patient={PATIENT}")
        declared = fetch(small, f"Patient/{PATIENT}")

    assert streamed.availability is Availability.UNAVAILABLE and streamed.reason == "response too large"
    assert declared.availability is Availability.UNAVAILABLE and declared.reason == "response too large"


def test_invalid_relative_urls_are_refused_without_request(client: FhirClient, mocked: responses.RequestsMock) -> None:
    for relative in ["../admin", "patient/1", "Patient/1/extra/path"]:
        result = fetch(client, relative)
        assert result.availability is Availability.UNAVAILABLE and result.reason == "not a FHIR read or search"
    assert len(mocked.calls) == 0


# -- parallelism ---------------------------------------------------------------------------------------------


def slow_bundle(delay: float) -> Callable[[requests.PreparedRequest], tuple[int, dict[str, str], str]]:
    def respond(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        time.sleep(delay)
        return 200, {}, json.dumps(bundle(condition(1)))

    return respond


def test_fetch_many_runs_in_parallel(client: FhirClient, mocked: responses.RequestsMock) -> None:
    types = ["Condition", "Procedure", "Encounter", "Observation", "CareTeam", "Consent", "Coverage", "Basic"]
    for rtype in types:
        mocked.add_callback(responses.GET, f"{BASE}/{rtype}", callback=slow_bundle(0.3))
    wanted = {rtype.lower(): f"{rtype}?patient={PATIENT}" for rtype in types}

    started = time.monotonic()
    results = client.fetch_many(
        BASE, wanted, token=TOKEN, deadline=time.monotonic() + 5, max_pages=10, url_allowed=allowed
    )
    parallel = time.monotonic() - started

    started = time.monotonic()
    for relative in wanted.values():
        fetch(client, relative)
    serial = time.monotonic() - started
    print(f"\n8 queries x 0.3 s: parallel {parallel:.3f} s, serial {serial:.3f} s")

    assert set(results) == set(wanted)
    assert all(r.availability is Availability.READ and len(r.resources) == 1 for r in results.values())
    assert parallel < 1.2
    assert serial >= 8 * 0.3


def test_fetch_many_page_limits_per_key(client: FhirClient, mocked: responses.RequestsMock) -> None:
    register_pages(mocked, 5)

    results = client.fetch_many(
        BASE,
        {"a": f"Condition?patient={PATIENT}", "b": f"Condition?patient={PATIENT}&x=1"},
        token=TOKEN,
        deadline=time.monotonic() + 5,
        max_pages=10,
        url_allowed=allowed,
        page_limits={"b": 1},
    )

    assert results["a"].availability is Availability.READ and results["a"].pages == 5
    assert results["b"].availability is Availability.PARTIAL and results["b"].pages == 1


def test_fetch_many_empty_and_after_close() -> None:
    client = FhirClient()
    assert (
        client.fetch_many(BASE, {}, token=None, deadline=time.monotonic() + 1, max_pages=1, url_allowed=allowed) == {}
    )
    client.close()

    results = client.fetch_many(
        BASE, {"a": "Condition?patient=x"}, token=None, deadline=time.monotonic() + 1, max_pages=1, url_allowed=allowed
    )

    assert results["a"].availability is Availability.UNAVAILABLE and results["a"].reason == "client closed"


# -- against a real socket -------------------------------------------------------------------------------


class _SlowHandler(BaseHTTPRequestHandler):
    """`/fhir/Slow...` answers after 1 s; anything else at once, with an empty searchset."""

    def do_GET(self) -> None:
        if self.path.startswith("/fhir/Slow"):
            time.sleep(1.0)
        body = json.dumps({"resourceType": "Bundle", "type": "searchset"}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (timeout): expected

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def real_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    finally:
        server.shutdown()
        server.server_close()


def test_real_socket_timeout_and_no_phi_in_library_logs(real_server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FhirClient(timeout=0.3) as client:
        started = time.monotonic()
        results = client.fetch_many(
            real_server,
            {"slow": f"Slow?patient={PATIENT}", "fast": f"Condition?patient={PATIENT}"},
            token=TOKEN,
            deadline=time.monotonic() + 5,
            max_pages=10,
            url_allowed=lambda url: url.startswith(real_server + "/"),
        )
        elapsed = time.monotonic() - started

    print(f"\nreal socket: 0.3 s timeout against a 1 s response -> {elapsed:.3f} s")
    assert results["slow"].availability is Availability.UNAVAILABLE and results["slow"].reason == "timeout"
    assert results["fast"].availability is Availability.READ
    assert elapsed < 0.9
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert PATIENT not in text and TOKEN not in text
