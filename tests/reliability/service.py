"""The service on a real threaded HTTP server on loopback, configured for the reliability tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import make_server

from cds_service.app import ServiceState, create_app
from cds_service.audit import AuditStore
from cds_service.config import ServiceConfig
from sandbox.signing import generate_key, trusted_issuers_document, write_trusted_issuers
from tests.harness import free_port
from tests.reliability import corpus
from tests.reliability.fuzz import SERVICE_PATH

ISSUER = "https://ehr.test/cds-client"


@dataclass
class RunningService:
    base_url: str
    state: ServiceState
    audit: AuditStore
    server: Any
    thread: threading.Thread

    def call(self, body: dict[str, Any], timeout: float = 60) -> tuple[requests.Response, float]:
        started = time.monotonic()
        response = requests.post(self.base_url + SERVICE_PATH, json=body, timeout=timeout)
        return response, time.monotonic() - started

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)
        self.state.fhir.close()
        self.audit.close()


def run_service(
    tmp_path: Path,
    fhir_servers: Iterable[str],
    *,
    fhir_timeout: float = 1.0,
    fetch_budget: float = 2.0,
    fhir_concurrency: int = 16,
) -> RunningService:
    """Calls need no JWT (`--insecure-no-auth`), but `fhirServer` must still be on the issuers' allow-list."""
    issuers = tmp_path / "trusted-issuers.json"
    write_trusted_issuers(issuers, trusted_issuers_document(ISSUER, [generate_key("ES384")], list(fhir_servers)))
    port = free_port()
    config = ServiceConfig(
        host="127.0.0.1",
        port=port,
        trusted_issuers=str(issuers),
        insecure_no_auth=True,
        database=f"sqlite:///{tmp_path / 'audit.db'}",
        fhir_timeout=fhir_timeout,
        fetch_budget=fetch_budget,
        fhir_concurrency=fhir_concurrency,
    )
    audit = AuditStore(config.database)
    app = create_app(config, audit=audit, clock=corpus.anchor_now)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return RunningService(f"http://127.0.0.1:{port}", app.extensions["ketamine_cds"], audit, server, thread)
