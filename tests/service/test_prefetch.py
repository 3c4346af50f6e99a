"""gather_record: CDS Hooks 2.0 prefetch semantics per key, parallel fallback, 412, reference resolution."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from cds_service.fhir_client import FhirClient
from cds_service.prefetch import FhirAccess, RequiredDataUnavailable, gather_record
from fhir_mappings.queries import DEFAULT_PATH, QuerySet, load_queries
from fhir_mappings.record import Availability, PatientRecord

BASE = "https://ehr.example.org/fhir"
TOKEN = "token-xyz-987"
PATIENT = "pat-1"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
ABSENT = object()  # marks a prefetch key the client left out


class FakeRegistry:
    """Knows every value set: the real registry lands separately."""

    def search_codes(self, vs_ids: Iterable[str]) -> list[tuple[str, str]]:
        return [("http://loinc.org", f"code-{vs_id}") for vs_id in vs_ids]


@pytest.fixture(scope="module")
def queries() -> QuerySet:
    return load_queries(FakeRegistry(), DEFAULT_PATH)


@pytest.fixture(scope="module")
def client() -> Iterator[FhirClient]:
    with FhirClient(timeout=1.0, max_workers=16) as fhir_client:
        yield fhir_client


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def allowed(url: str) -> bool:
    return url.startswith(BASE + "/")


ACCESS = FhirAccess(base_url=BASE, token=TOKEN, url_allowed=allowed)


def searchset(*resources: dict, next_url: str | None = None, outcome: dict | None = None) -> dict:
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r} for r in resources
    ]
    if outcome is not None:
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    body: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(resources), "entry": entries}
    if next_url:
        body["link"] = [{"relation": "next", "url": next_url}]
    return body


def outcome(severity: str = "error") -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": "exception"}]}


PATIENT_RESOURCE = {"resourceType": "Patient", "id": PATIENT, "birthDate": "1980-01-01"}
PAYOR = {"resourceType": "Organization", "id": "payer-1", "name": "MGB Health Plan"}
COVERAGE = {
    "resourceType": "Coverage",
    "id": "cov-1",
    "status": "active",
    "beneficiary": {"reference": f"Patient/{PATIENT}"},
    "payor": [{"reference": "Organization/payer-1"}],
}


def full_prefetch(queries: QuerySet, **overrides: Any) -> dict[str, Any]:
    """A complete, reference-free prefetch; `key=ABSENT` leaves a key out, any other value replaces it."""
    prefetch: dict[str, Any] = {key: searchset() for key in queries.queries}
    prefetch["patient"] = PATIENT_RESOURCE
    prefetch["coverage"] = searchset(COVERAGE, PAYOR)
    for key, value in overrides.items():
        if value is ABSENT:
            prefetch.pop(key)
        else:
            prefetch[key] = value
    return prefetch


def gather(
    queries: QuerySet,
    client: FhirClient,
    prefetch: dict[str, Any] | None,
    *,
    fhir: FhirAccess | None = ACCESS,
    context: dict[str, Any] | None = None,
    draft_orders: list[dict] | None = None,
    budget: float = 5.0,
) -> PatientRecord:
    return gather_record(
        queries=queries,
        context=context if context is not None else {"patientId": PATIENT},
        prefetch=prefetch,
        fhir=fhir,
        client=client,
        now=NOW,
        deadline=time.monotonic() + budget,
        draft_orders=draft_orders or [],
    )


def condition(n: int) -> dict:
    return {"resourceType": "Condition", "id": f"c{n}", "subject": {"reference": f"Patient/{PATIENT}"}}


def urls(mocked: responses.RequestsMock) -> list[str]:
    return [call.request.url for call in mocked.calls]


# -- the tri-state table ---------------------------------------------------------------------------------


def test_complete_prefetch_needs_no_request(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    record = gather(queries, client, full_prefetch(queries))

    assert urls(mocked) == []
    assert all(
        q.availability is Availability.READ and q.source in ("prefetch", "none") for q in record.queries.values()
    )
    assert record.get(f"Patient/{PATIENT}") == PATIENT_RESOURCE
    assert record.availability("Condition") is Availability.READ
    assert record.references_resolvable and record.unresolved_references == {}


def test_absent_key_is_fetched_with_the_bearer_token(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/Condition", json=searchset(condition(1), condition(2)))

    record = gather(queries, client, full_prefetch(queries, conditions=ABSENT))

    assert len(mocked.calls) == 1
    request = mocked.calls[0].request
    assert parse_qs(urlsplit(request.url).query) == {"patient": [PATIENT], "_count": ["1000"]}  # large pages
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    outcome_ = record.queries["conditions"]
    assert (outcome_.availability, outcome_.source, outcome_.pages) == (Availability.READ, "fhir-server", 1)
    assert [c["id"] for c in record.of_type("Condition")] == ["c1", "c2"]
    assert record.full_urls[f"{BASE}/Condition/c1"]["id"] == "c1"


def test_no_prefetch_at_all_fetches_every_query(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/Patient/{PATIENT}", json=PATIENT_RESOURCE)
    mocked.get(f"{BASE}/Coverage", json=searchset(COVERAGE, PAYOR))
    mocked.get(re.compile(re.escape(BASE) + r"/\w+\?.*"), json=searchset())

    record = gather(queries, client, None)

    fetched_paths = {urlsplit(u).path.rsplit("/", 1)[-1] for u in urls(mocked)}
    # user_roles, user_role: no user in context, not applicable
    assert len(mocked.calls) == len(queries.queries) - 2
    assert "Observation" in fetched_paths and PATIENT in fetched_paths
    assert all(q.availability is Availability.READ for q in record.queries.values())
    assert record.queries["user_roles"].source == "none" and record.queries["user_role"].source == "none"


def test_null_is_read_with_no_data_and_no_request(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    record = gather(queries, client, full_prefetch(queries, conditions=None, encounters=None))

    assert urls(mocked) == []
    assert record.queries["conditions"].availability is Availability.READ
    assert record.queries["conditions"].source == "prefetch"
    assert record.of_type("Condition") == [] and record.availability("Condition") is Availability.READ
    assert record.availability("Encounter") is Availability.READ


def test_null_required_read_is_no_data_not_412(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    record = gather(queries, client, full_prefetch(queries, patient=None), fhir=None)

    assert record.queries["patient"].availability is Availability.READ and record.of_type("Patient") == []


def test_empty_bundle_is_read_without_request(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    record = gather(queries, client, full_prefetch(queries, procedures=searchset()), fhir=None)

    assert urls(mocked) == []
    assert record.queries["procedures"].availability is Availability.READ
    assert record.availability("Procedure") is Availability.READ


def test_operation_outcome_is_treated_as_failed_and_fetched(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/Condition", json=searchset(condition(7)))

    record = gather(queries, client, full_prefetch(queries, conditions=outcome()))

    assert len(mocked.calls) == 1
    result = record.queries["conditions"]
    assert (result.availability, result.source) == (Availability.READ, "fhir-server")
    assert result.reason == "OperationOutcome in prefetch; queried"
    assert [c["id"] for c in record.of_type("Condition")] == ["c7"]


def test_error_outcome_inside_bundle_is_fetched_but_a_warning_is_data(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/Condition", json=searchset(condition(2)))
    prefetch = full_prefetch(
        queries,
        conditions=searchset(condition(1), outcome=outcome("fatal")),
        procedures=searchset(outcome=outcome("warning")),
    )

    record = gather(queries, client, prefetch)

    assert [urlsplit(u).path for u in urls(mocked)] == ["/fhir/Condition"]
    assert [c["id"] for c in record.of_type("Condition")] == ["c2"]  # the failed Bundle's entries are not used
    assert record.queries["procedures"].availability is Availability.READ
    assert record.queries["procedures"].source == "prefetch"


def test_operation_outcome_without_server_is_unavailable(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    record = gather(queries, client, full_prefetch(queries, conditions=outcome()), fhir=None)

    result = record.queries["conditions"]
    assert result.availability is Availability.UNAVAILABLE
    assert result.reason == "OperationOutcome in prefetch; no FHIR server"
    assert record.availability("Condition") is Availability.UNAVAILABLE
    assert not record.references_resolvable
    assert urls(mocked) == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("conditions", ["not", "an", "object"]),
        ("conditions", "Bundle"),
        ("conditions", {"resourceType": "Patient", "id": PATIENT}),
        ("conditions", {"resourceType": "Bundle", "type": "collection", "entry": []}),
        ("conditions", {"resourceType": "Bundle", "type": "searchset", "entry": {"resource": {}}}),
        ("conditions", {"no": "resourceType"}),
        ("patient", {"resourceType": "Patient", "id": "someone-else"}),
        ("patient", {"resourceType": "Practitioner", "id": PATIENT}),
    ],
)
def test_malformed_prefetch_is_fetched(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock, key: str, value: Any
) -> None:
    mocked.get(f"{BASE}/Condition", json=searchset(condition(3)))
    mocked.get(f"{BASE}/Patient/{PATIENT}", json=PATIENT_RESOURCE)

    record = gather(queries, client, full_prefetch(queries, **{key: value}))

    assert len(mocked.calls) == 1
    assert record.queries[key].availability is Availability.READ and record.queries[key].source == "fhir-server"
    assert record.queries[key].reason.endswith("; queried")
    if key == "patient":
        assert record.of_type("Patient") == [PATIENT_RESOURCE]
    else:
        assert [c["id"] for c in record.of_type("Condition")] == ["c3"]


def test_a_single_resource_answers_a_read(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    record = gather(queries, client, full_prefetch(queries), fhir=None)

    assert record.queries["patient"].availability is Availability.READ and record.queries["patient"].pages == 1
    assert record.of_type("Patient") == [PATIENT_RESOURCE]


# -- pagination of prefetched Bundles -------------------------------------------------------------------


def test_paginated_prefetch_continues_on_the_server(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/page2", json=searchset(condition(2), next_url=f"{BASE}/page3"))
    mocked.get(f"{BASE}/page3", json=searchset(condition(3)))
    prefetch = full_prefetch(queries, conditions=searchset(condition(1), next_url=f"{BASE}/page2"))

    record = gather(queries, client, prefetch)

    assert urls(mocked) == [f"{BASE}/page2", f"{BASE}/page3"]
    result = record.queries["conditions"]
    assert (result.availability, result.source, result.pages) == (Availability.READ, "prefetch", 3)
    assert [c["id"] for c in record.of_type("Condition")] == ["c1", "c2", "c3"]
    assert mocked.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_paginated_prefetch_respects_the_page_bound(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    def endless(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        n = int(parse_qs(urlsplit(request.url).query)["n"][0])
        return 200, {}, json.dumps(searchset(condition(n), next_url=f"{BASE}/more?n={n + 1}"))

    mocked.add_callback(responses.GET, f"{BASE}/more", callback=endless)
    prefetch = full_prefetch(queries, conditions=searchset(condition(1), next_url=f"{BASE}/more?n=2"))

    record = gather(queries, client, prefetch)

    limit = queries.limits.max_pages_per_query
    result = record.queries["conditions"]
    assert (result.availability, result.reason, result.pages) == (Availability.PARTIAL, "page limit", limit)
    assert len(mocked.calls) == limit - 1 and len(record.of_type("Condition")) == limit
    assert record.availability("Condition") is Availability.PARTIAL


def test_paginated_prefetch_without_server_is_partial(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    prefetch = full_prefetch(queries, conditions=searchset(condition(1), next_url=f"{BASE}/page2"))

    record = gather(queries, client, prefetch, fhir=None)

    result = record.queries["conditions"]
    assert (result.availability, result.reason) == (Availability.PARTIAL, "prefetch paginated; no FHIR server")
    assert [c["id"] for c in record.of_type("Condition")] == ["c1"]
    assert urls(mocked) == []


def test_paginated_prefetch_next_link_outside_server_is_not_followed(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    evil = mocked.get("https://evil.example.com/page2", json=searchset(condition(2)))
    prefetch = full_prefetch(queries, conditions=searchset(condition(1), next_url="https://evil.example.com/page2"))

    record = gather(queries, client, prefetch)

    result = record.queries["conditions"]
    assert (result.availability, result.reason) == (Availability.PARTIAL, "next link outside allowed server")
    assert evil.call_count == 0


# -- merging and parallelism ----------------------------------------------------------------------------


def test_partial_prefetch_is_merged_with_parallel_fetches(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        time.sleep(0.2)
        rtype = urlsplit(request.url).path.rsplit("/", 1)[-1]
        return 200, {}, json.dumps(searchset({"resourceType": rtype, "id": f"{rtype}-1"}))

    mocked.add_callback(responses.GET, re.compile(re.escape(BASE) + r"/\w+\?.*"), callback=slow)
    prefetch = {"patient": PATIENT_RESOURCE, "coverage": searchset(COVERAGE, PAYOR)}

    started = time.monotonic()
    record = gather(queries, client, prefetch)
    elapsed = time.monotonic() - started
    fetched = [k for k, q in record.queries.items() if q.source == "fhir-server"]
    print(f"\n{len(fetched)} missing queries x 0.2 s gathered in {elapsed:.3f} s")

    assert len(fetched) == len(queries.queries) - 4  # patient, coverage prefetched; user_roles, user_role n/a
    assert record.queries["patient"].source == "prefetch" and record.queries["coverage"].source == "prefetch"
    assert all(q.availability is Availability.READ for q in record.queries.values())
    assert record.get("Observation/Observation-1") is not None and record.get("Coverage/cov-1") is not None
    assert elapsed < 1.0  # serially it would take >= 2.2 s


def test_duplicate_resources_are_kept_once(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    coverage_twice = searchset(COVERAGE, PAYOR, {"resourceType": "Coverage", "id": "cov-2", "payor": []}, PAYOR)
    mocked.get(f"{BASE}/Coverage", json=coverage_twice)

    record = gather(queries, client, full_prefetch(queries, coverage=ABSENT))

    keys = [f"{r['resourceType']}/{r['id']}" for r in record.resources]
    assert keys.count("Organization/payer-1") == 1 and len(keys) == len(set(keys))
    assert [c["id"] for c in record.of_type("Coverage")] == ["cov-1", "cov-2"]


# -- required data and 412 --------------------------------------------------------------------------------


def test_required_data_without_prefetch_or_server_is_412(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    with pytest.raises(RequiredDataUnavailable) as raised:
        gather(queries, client, full_prefetch(queries, patient=ABSENT, coverage=ABSENT), fhir=None)

    error = raised.value
    assert error.keys == ["patient", "coverage"]
    assert error.reasons == {"patient": "not prefetched; no FHIR server", "coverage": "not prefetched; no FHIR server"}
    assert error.status == 412
    body = error.body()
    assert body["resourceType"] == "OperationOutcome"
    assert [i["expression"] for i in body["issue"]] == [["prefetch.patient"], ["prefetch.coverage"]]
    assert PATIENT not in json.dumps(body)


def test_required_data_when_the_server_fails_is_412(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/Patient/{PATIENT}", status=500)
    mocked.get(f"{BASE}/Coverage", body=requests.exceptions.ReadTimeout())

    with pytest.raises(RequiredDataUnavailable) as raised:
        gather(queries, client, full_prefetch(queries, patient=ABSENT, coverage=outcome()))

    assert raised.value.keys == ["patient", "coverage"]
    assert raised.value.reasons["patient"] == "HTTP 500"
    assert raised.value.reasons["coverage"] == "OperationOutcome in prefetch; timeout"


def test_required_patient_not_found_is_no_data_not_412(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/Patient/{PATIENT}", status=404)

    record = gather(queries, client, full_prefetch(queries, patient=ABSENT))

    assert record.queries["patient"].availability is Availability.READ
    assert record.queries["patient"].reason == "not found"


def test_non_required_unavailable_is_recorded_not_raised(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/Condition", status=403)
    mocked.get(re.compile(re.escape(BASE) + r"/MedicationStatement\?.*"), body=requests.exceptions.ConnectTimeout())

    record = gather(queries, client, full_prefetch(queries, conditions=ABSENT, medication_statements=ABSENT))

    conditions = record.queries["conditions"]
    assert (conditions.availability, conditions.source, conditions.reason) == (
        Availability.UNAVAILABLE,
        "none",
        "HTTP 403",
    )
    assert record.queries["medication_statements"].reason == "timeout"
    assert record.availability("Condition") is Availability.UNAVAILABLE
    assert record.availability("MedicationStatement") is Availability.UNAVAILABLE
    assert record.availability("Patient") is Availability.READ
    assert {q.key for q in record.unavailable_queries()} == {"conditions", "medication_statements"}


def test_missing_patient_id_is_a_programming_error(queries: QuerySet, client: FhirClient) -> None:
    with pytest.raises(ValueError, match="patientId"):
        gather(queries, client, None, context={"userId": "Practitioner/u1"})


# -- tokens that do not apply to this call ------------------------------------------------------------------


def test_user_token_of_another_user_type_is_not_applicable_without_request(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    context = {"patientId": PATIENT, "userId": "PractitionerRole/r9"}

    record = gather(queries, client, full_prefetch(queries, user_roles=ABSENT), fhir=None, context=context)

    roles = record.queries["user_roles"]
    assert (roles.availability, roles.source, roles.reason) == (
        Availability.READ,
        "none",
        "not applicable to this user",
    )
    assert urls(mocked) == []
    assert record.user_id == "PractitionerRole/r9"


def test_user_roles_are_queried_for_a_practitioner_user(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    role = {"resourceType": "PractitionerRole", "id": "role-u1", "practitioner": {"reference": "Practitioner/u1"}}
    mocked.get(f"{BASE}/PractitionerRole", json=searchset(role))
    mocked.get(f"{BASE}/Practitioner", json=searchset({"resourceType": "Practitioner", "id": "u1"}))
    context = {"patientId": PATIENT, "userId": "Practitioner/u1", "encounterId": "enc-1"}

    record = gather(queries, client, full_prefetch(queries, user_roles=ABSENT), context=context)

    first = parse_qs(urlsplit(mocked.calls[0].request.url).query)
    assert first["practitioner"] == ["u1"] and first["_count"] == ["1000"]
    assert "PractitionerRole:practitioner" in first["_include"]  # a conformant server sends the Practitioner too
    assert record.queries["user_roles"].source == "fhir-server"
    assert record.get("PractitionerRole/role-u1") is not None and record.get("Practitioner/u1") is not None
    assert record.encounter_id == "enc-1"
    # The user's roles were read by that search: not searched a second time while resolving references.
    role_searches = [c for c in mocked.calls if urlsplit(c.request.url).path.endswith("/PractitionerRole")]
    assert len(role_searches) == 1


# -- reference resolution ------------------------------------------------------------------------------------


DRAFT = {
    "resourceType": "MedicationRequest",
    "id": "draft-1",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": f"Patient/{PATIENT}"},
    "requester": {"reference": "PractitionerRole/req-role"},
    "performer": {"reference": "Practitioner/doc-1"},
    "encounter": {"reference": "Encounter/enc-1"},
    "medicationReference": {"reference": "#med"},
    "supportingInfo": [{"reference": "urn:uuid:0000"}, {"reference": f"{BASE}/Observation/obs-9"}],
}


def test_references_resolve_requester_role_practitioner_roles_and_their_organizations(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    encounter = {"resourceType": "Encounter", "id": "enc-1", "period": {"start": "2026-10-20"}}
    req_role = {
        "resourceType": "PractitionerRole",
        "id": "req-role",
        "practitioner": {"reference": "Practitioner/doc-2"},
        "organization": {"reference": "Organization/clinic-1"},
    }
    doc1_role = {
        "resourceType": "PractitionerRole",
        "id": "doc1-psych",
        "practitioner": {"reference": "Practitioner/doc-1"},
        "specialty": [{"coding": [{"system": "http://nucc.org/provider-taxonomy", "code": "2084P0800X"}]}],
        "organization": {"reference": "Organization/clinic-2"},
    }

    def by_query(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        split = urlsplit(request.url)
        rtype, params = split.path.rsplit("/", 1)[-1], parse_qs(split.query)
        if rtype == "PractitionerRole" and "_id" in params:
            found = [req_role]
        elif rtype == "PractitionerRole":
            found = [doc1_role] if "doc-1" in params["practitioner"][0].split(",") else []
        elif rtype == "Practitioner":
            ids = params["_id"][0].split(",")
            found = [{"resourceType": "Practitioner", "id": i} for i in ids if i != "doc-1"]  # doc-1 is not found
        elif rtype == "Organization":
            found = [{"resourceType": "Organization", "id": i} for i in params["_id"][0].split(",")]
        elif rtype == "Observation":
            found = [{"resourceType": "Observation", "id": "obs-9"}]
        else:
            found = []
        return 200, {}, json.dumps(searchset(*found))

    mocked.add_callback(responses.GET, re.compile(re.escape(BASE) + r"/\w+\?.*"), callback=by_query)
    prefetch = full_prefetch(queries, encounters=searchset(encounter))
    context = {"patientId": PATIENT, "userId": "Practitioner/u1"}

    record = gather(queries, client, prefetch, context=context, draft_orders=[DRAFT])

    requested = sorted(f"{urlsplit(u).path.rsplit('/', 1)[-1]}?{urlsplit(u).query}" for u in urls(mocked))
    # round 1: the draft's references and the user; round 2: what the requester's role points to — its
    # organization and its Practitioner (licence and training live on Practitioner), with that one's roles
    assert requested == [
        "Observation?_id=obs-9&_count=1",
        "Organization?_id=clinic-1,clinic-2&_count=2",
        "Practitioner?_id=doc-2&_count=1",
        "Practitioner?_id=u1,doc-1&_count=2",
        "PractitionerRole?_id=req-role&_count=1",
        # not u1: the user's roles came with the `user_roles` prefetch (an empty searchset: none)
        "PractitionerRole?practitioner=doc-1&_count=1000",
        "PractitionerRole?practitioner=doc-2&_count=1000",
    ]
    assert record.get("Practitioner/doc-2") is not None
    assert record.get("PractitionerRole/req-role") == req_role
    assert record.get("PractitionerRole/doc1-psych") == doc1_role
    assert record.get("Organization/clinic-1") is not None and record.get("Organization/clinic-2") is not None
    assert record.get("Observation/obs-9") is not None
    assert record.unresolved_references == {"Practitioner/doc-1": "not found"}
    assert record.references_resolvable
    assert record.resolve(DRAFT["requester"]) == req_role
    # Encounter/enc-1 was already in the record: never fetched; the contained and urn references are skipped
    assert not any("Encounter" in u for u in urls(mocked))
    # resources found by reference do not change what the queries read
    assert record.availability("PractitionerRole") is Availability.READ


def test_references_are_batched_and_capped_per_type(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    members = [{"member": {"reference": f"Practitioner/p{n}"}} for n in range(120)]
    care_team = {"resourceType": "CareTeam", "id": "ct-1", "participant": members}

    def practitioners(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        ids = parse_qs(urlsplit(request.url).query)["_id"][0].split(",")
        return 200, {}, json.dumps(searchset(*({"resourceType": "Practitioner", "id": i} for i in ids)))

    mocked.add_callback(responses.GET, f"{BASE}/Practitioner", callback=practitioners)
    mocked.get(f"{BASE}/PractitionerRole", json=searchset())

    record = gather(queries, client, full_prefetch(queries, care_teams=searchset(care_team)))

    cap = queries.limits.max_reference_ids_per_type
    id_batches = [parse_qs(urlsplit(u).query)["_id"][0].split(",") for u in urls(mocked) if "/Practitioner?" in u]
    role_batches = [
        parse_qs(urlsplit(u).query)["practitioner"][0].split(",") for u in urls(mocked) if "/PractitionerRole?" in u
    ]
    assert sorted(len(b) for b in id_batches) == [50, 50]
    assert sorted(len(b) for b in role_batches) == [50, 50]
    assert len(record.of_type("Practitioner")) == cap
    over = {f"Practitioner/p{n}" for n in range(cap, 120)}
    assert {k for k, v in record.unresolved_references.items() if v == "reference limit"} >= over
    assert len(mocked.calls) == 4


def test_reference_fetch_failures_are_recorded_as_unresolved(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(f"{BASE}/PractitionerRole", status=503)
    mocked.get(f"{BASE}/Practitioner", body=requests.exceptions.ReadTimeout())

    record = gather(queries, client, full_prefetch(queries), draft_orders=[DRAFT])

    assert record.unresolved_references["PractitionerRole/req-role"] == "HTTP 503"
    assert record.unresolved_references["Practitioner/doc-1"] == "timeout"
    assert record.unresolved_references["PractitionerRole?practitioner=doc-1"] == "HTTP 503"
    assert record.reference_status(DRAFT["requester"]) is Availability.UNAVAILABLE


def test_only_recent_resources_are_followed_for_windowed_rules(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    def encounter(eid: str, start: str | None, practitioner: str) -> dict:
        resource: dict[str, Any] = {
            "resourceType": "Encounter",
            "id": eid,
            "participant": [{"individual": {"reference": f"Practitioner/{practitioner}"}}],
        }
        if start:
            resource["period"] = {"start": start}
        return resource

    recent = (NOW - timedelta(days=30)).date().isoformat()
    old = (NOW - timedelta(days=500)).isoformat()
    encounters = searchset(
        encounter("e-recent", recent, "recent"),
        encounter("e-old", old, "old"),
        encounter("e-undated", None, "undated"),
        encounter("e-year", "2026", "this-year"),
    )
    mocked.get(f"{BASE}/Practitioner", json=searchset())
    mocked.get(f"{BASE}/PractitionerRole", json=searchset())

    record = gather(queries, client, full_prefetch(queries, encounters=encounters))

    id_query = next(u for u in urls(mocked) if "/Practitioner?" in u)
    assert parse_qs(urlsplit(id_query).query)["_id"] == ["recent,undated,this-year"]
    assert "Practitioner/old" not in record.unresolved_references
    assert record.unresolved_references["Practitioner/recent"] == "not found"


def test_references_to_other_servers_are_not_fetched(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    draft = {
        "resourceType": "ServiceRequest",
        "id": "draft-2",
        "requester": {"reference": "https://other.example.net/fhir/Practitioner/x1"},
        "performer": [{"reference": f"{BASE}/Practitioner/x2/_history/3"}],
        "locationReference": [{"reference": "Location?identifier=abc"}],
    }
    mocked.get(f"{BASE}/Practitioner", json=searchset({"resourceType": "Practitioner", "id": "x2"}))
    mocked.get(f"{BASE}/PractitionerRole", json=searchset())

    record = gather(queries, client, full_prefetch(queries), draft_orders=[draft])

    assert record.unresolved_references == {"Practitioner/x1": "outside FHIR server"}
    assert record.get("Practitioner/x2") is not None
    assert all(u.startswith(BASE + "/") for u in urls(mocked))
    assert not any("Location" in u for u in urls(mocked))


def test_no_reference_resolution_without_server(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    record = gather(queries, client, full_prefetch(queries), fhir=None, draft_orders=[DRAFT])

    assert urls(mocked) == []
    assert not record.references_resolvable and record.unresolved_references == {}
    assert record.reference_status(DRAFT["requester"]) is Availability.UNAVAILABLE
    assert record.get("MedicationRequest/draft-1") == DRAFT and record.of_type("MedicationRequest") == []


def test_fhir_access_repr_hides_the_token() -> None:
    assert TOKEN not in repr(ACCESS)


def test_large_record_is_gathered_quickly(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    def by_id(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        split = urlsplit(request.url)
        rtype, params = split.path.rsplit("/", 1)[-1], parse_qs(split.query)
        ids = params["_id"][0].split(",") if "_id" in params else []
        return 200, {}, json.dumps(searchset(*({"resourceType": rtype, "id": i} for i in ids)))

    mocked.add_callback(responses.GET, re.compile(re.escape(BASE) + r"/\w+\?.*"), callback=by_id)
    observations = [
        {
            "resourceType": "Observation",
            "id": f"o{n}",
            "effectiveDateTime": (NOW - timedelta(days=n % 900)).isoformat(),
            "performer": [{"reference": f"Practitioner/p{n % 300}"}],
        }
        for n in range(6000)
    ]
    encounters = [
        {
            "resourceType": "Encounter",
            "id": f"e{n}",
            "period": {"start": (NOW - timedelta(days=n % 900)).date().isoformat()},
            "participant": [{"individual": {"reference": f"Practitioner/p{n % 300}"}}],
            "serviceProvider": {"reference": "Organization/org-1"},
        }
        for n in range(3000)
    ]
    prefetch = full_prefetch(queries, observations=searchset(*observations), encounters=searchset(*encounters))

    started = time.monotonic()
    record = gather(queries, client, prefetch, context={"patientId": PATIENT, "userId": "Practitioner/u1"})
    elapsed = time.monotonic() - started
    print(f"\n{len(record.resources)} resources incl. references gathered in {elapsed:.3f} s")

    assert len(record.of_type("Observation")) == 6000 and record.get("Organization/org-1") is not None
    assert len(record.of_type("Practitioner")) == queries.limits.max_reference_ids_per_type
    assert elapsed < 1.5


def test_a_stored_copy_of_the_draft_order_is_not_history(
    queries: QuerySet, client: FhirClient, mocked: responses.RequestsMock
) -> None:
    stored_draft = {**DRAFT, "meta": {"versionId": "1"}}
    older = {"resourceType": "MedicationRequest", "id": "mr-old", "status": "completed"}
    prefetch = full_prefetch(queries, medication_requests=searchset(stored_draft, older))

    record = gather(queries, client, prefetch, fhir=None, draft_orders=[DRAFT])

    assert [r["id"] for r in record.of_type("MedicationRequest")] == ["mr-old"]
    assert record.get("MedicationRequest/draft-1") is DRAFT


def test_resources_of_other_patients_never_enter_the_record() -> None:
    """A server that ignores an unsupported search parameter (FHIR allows it, with a warning) answers
    `CareTeam?patient=X` with everyone's care teams: the record keeps only the context patient's."""
    from cds_service.prefetch import _Collected

    collected = _Collected(patient_id="p1")
    mine = {"resourceType": "CareTeam", "id": "a", "subject": {"reference": "Patient/p1"}}
    theirs = {"resourceType": "CareTeam", "id": "b", "subject": {"reference": "https://ehr.test/fhir/Patient/p2"}}
    other_patient = {"resourceType": "Patient", "id": "p2"}
    coverage = {"resourceType": "Coverage", "id": "c", "beneficiary": {"reference": "Patient/p1"}}
    payer = {"resourceType": "Organization", "id": "o"}
    added = collected.add([mine, theirs, other_patient, coverage, payer])
    assert [r["id"] for r in added] == ["a", "c", "o"]
    assert collected.foreign == 2
