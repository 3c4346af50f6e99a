"""Test harness: the service under a real HTTP server on loopback, signed JWTs, and a FHIR server mock.

`ServiceUnderTest` runs `create_app(...)` in werkzeug's threaded server on a free port, so tests speak
real HTTP (headers, CORS, status codes) exactly as an EHR does. `FhirMock` answers FHIR searches from a
list of resources through the `responses` library (patient/_id/code/practitioner/status filters,
paging), recording every request so tests can assert what the service fetched — and what it did not.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
import responses
from werkzeug.serving import make_server

from cds_service.app import create_app
from cds_service.audit import AuditStore
from cds_service.config import ServiceConfig
from sandbox.signing import SandboxKey, generate_key, sign_cds_jwt, trusted_issuers_document, write_trusted_issuers

ISSUER = "https://ehr.test/cds-client"
FHIR_BASE = "https://ehr.test/fhir"
SERVICE_PATH = "/cds-services/ketamine-prior-auth"
FIXED_NOW = datetime(2026, 1, 15, 17, 0, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceUnderTest:
    base_url: str
    key: SandboxKey
    audit: AuditStore
    server: Any
    thread: threading.Thread
    issuer: str = ISSUER

    def token(self, path: str = SERVICE_PATH, **kwargs: Any) -> str:
        return sign_cds_jwt(self.key, iss=self.issuer, aud=self.base_url + path, **kwargs)

    def post_hook(
        self, body: Any, *, token: str | bool | None = True, headers: dict[str, str] | None = None
    ) -> requests.Response:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if token is True:
            token = self.token()
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(self.base_url + SERVICE_PATH, data=data, headers=hdrs, timeout=30)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)
        self.audit.close()


def start_service(
    tmp_path: Path,
    *,
    key: SandboxKey | None = None,
    fhir_servers: Iterable[str] = (FHIR_BASE,),
    insecure: bool = False,
    lenient: bool = False,
    now: datetime | None = FIXED_NOW,
    site_config: str | None = None,
) -> ServiceUnderTest:
    key = key or generate_key("ES384")
    issuers = tmp_path / "trusted-issuers.json"
    write_trusted_issuers(issuers, trusted_issuers_document(ISSUER, [key], list(fhir_servers)))
    port = free_port()
    config = ServiceConfig(
        host="127.0.0.1",
        port=port,
        trusted_issuers=None if insecure else str(issuers),
        insecure_no_auth=insecure,
        database=f"sqlite:///{tmp_path / 'audit.db'}",
        lenient=lenient,
        site_config=site_config,
        fhir_timeout=2.0,
        fetch_budget=5.0,
    )
    audit = AuditStore(config.database)
    app = create_app(config, audit=audit, clock=(lambda: now) if now else None)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return ServiceUnderTest(f"http://127.0.0.1:{port}", key, audit, server, thread)


def mocked_fhir(
    service: ServiceUnderTest, resources: list[dict[str, Any]], **kwargs: Any
) -> tuple[responses.RequestsMock, FhirMock]:
    """A `responses` mock (enter it with `with`) that serves `resources` as the EHR's FHIR server while
    letting calls to the service under test through."""
    rsps = responses.RequestsMock(assert_all_requests_are_fired=False)
    rsps.add_passthru(service.base_url)
    mock = FhirMock(resources, **kwargs)
    mock.install(rsps)
    return rsps, mock


# --- requests ----------------------------------------------------------------------------------------
def order_sign_request(
    draft_orders: list[dict[str, Any]],
    *,
    patient_id: str,
    user_id: str = "Practitioner/prac-1",
    encounter_id: str | None = None,
    prefetch: dict[str, Any] | None = None,
    fhir_server: str | None = FHIR_BASE,
    access_token: str | None = "ehr-access-token-123",
    bundle_type: str | None = "collection",
) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "entry": [{"resource": o} for o in draft_orders]}
    if bundle_type:
        bundle["type"] = bundle_type
    context: dict[str, Any] = {"userId": user_id, "patientId": patient_id, "draftOrders": bundle}
    if encounter_id:
        context["encounterId"] = encounter_id
    body: dict[str, Any] = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": context}
    if fhir_server:
        body["fhirServer"] = fhir_server
        if access_token:
            body["fhirAuthorization"] = {
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/*.read",
                "subject": "ketamine-cds",
                "patient": patient_id,
            }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


# --- FHIR mock -------------------------------------------------------------------------------------------
_REF_PARAMS = {"patient": ("subject", "patient", "beneficiary"), "practitioner": ("practitioner",)}


@dataclass
class FhirMock:
    """A searchable FHIR server over `resources` for the `responses` library (register with `install`)."""

    resources: list[dict[str, Any]]
    base: str = FHIR_BASE
    page_size: int = 50
    token: str | None = "ehr-access-token-123"
    calls: list[str] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    fail_types: set[str] = field(default_factory=set)

    def install(self, rsps: responses.RequestsMock) -> None:
        rsps.add_callback(responses.GET, re.compile(re.escape(self.base) + r"/.*"), callback=self._answer)

    def _answer(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.calls.append(request.url)
        self.auth_headers.append(request.headers.get("Authorization"))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return (
                401,
                {},
                json.dumps({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}),
            )
        parts = urlsplit(request.url)
        path = parts.path[len(urlsplit(self.base).path) :].strip("/").split("/")
        rtype = path[0]
        if rtype in self.fail_types:
            return 500, {}, "{}"
        if len(path) == 2:
            found = [r for r in self.resources if r["resourceType"] == rtype and r.get("id") == path[1]]
            if not found:
                return (
                    404,
                    {},
                    json.dumps(
                        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}
                    ),
                )
            return 200, {"Content-Type": "application/fhir+json"}, json.dumps(found[0])
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        matches = [r for r in self.resources if r["resourceType"] == rtype and self._matches(r, params)]
        included = []
        if params.get("_include") == "Coverage:payor":
            for cov in matches:
                for payor in cov.get("payor", []):
                    ref = payor.get("reference", "")
                    included += [r for r in self.resources if f"{r['resourceType']}/{r.get('id')}" == ref]
        offset = int(params.get("_offset", 0))
        page = matches[offset : offset + self.page_size]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "entry": [
                {"fullUrl": f"{self.base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                for r in page
            ]
            + [{"resource": r, "search": {"mode": "include"}} for r in included],
            "link": [],
        }
        if offset + self.page_size < len(matches):
            q = dict(params, _offset=str(offset + self.page_size))
            bundle["link"].append(
                {"relation": "next", "url": f"{self.base}/{rtype}?" + "&".join(f"{k}={v}" for k, v in q.items())}
            )
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(bundle)

    @staticmethod
    def _matches(resource: dict[str, Any], params: dict[str, str]) -> bool:
        for name, value in params.items():
            if name.startswith("_") and name != "_id":
                continue
            if name == "_id":
                if resource.get("id") not in value.split(","):
                    return False
            elif name in _REF_PARAMS:
                wanted = {v if "/" in v else None for v in value.split(",")} | {v for v in value.split(",")}
                refs = {
                    (resource.get(k) or {}).get("reference", "").split("/")[-1]
                    for k in _REF_PARAMS[name]
                    if isinstance(resource.get(k), dict)
                }
                if not refs & {w.split("/")[-1] for w in wanted if w}:
                    return False
            elif name == "status":
                if resource.get("status") not in value.split(","):
                    return False
            elif name == "code":
                tokens = {tuple(t.split("|", 1)) for t in value.split(",")}
                codings = {(c.get("system"), c.get("code")) for c in (resource.get("code") or {}).get("coding", [])}
                if not codings & tokens:
                    return False
        return True
