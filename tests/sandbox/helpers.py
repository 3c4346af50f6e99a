"""Test helpers: example scenario data and a stub CDS service that records what the EHR simulator sends."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.serving import BaseWSGIServer, make_server

from sandbox.scenarios import PATIENTS_DIR

EXAMPLE_IDS = ("example-ketamine-minimal", "example-non-ketamine")
SERVICE_ID = "ketamine-prior-auth"


def example_data(scenario_id: str = "example-ketamine-minimal") -> dict[str, Any]:
    """A fresh, mutable copy of an example scenario file's JSON."""
    return json.loads((PATIENTS_DIR / f"{scenario_id}.json").read_text(encoding="utf-8"))


def decision_card(order: str, policy: str | None, outcome: str, phase: str | None = None) -> dict[str, Any]:
    """A minimal card carrying the `ketamine-cds.decision` extension the service emits."""
    decision: dict[str, Any] = {"outcome": outcome, "orders": [order], "criteria": []}
    if policy:
        decision["policy"] = policy
    if phase:
        decision["phase"] = phase
    return {
        "uuid": "7f4b8a7e-0000-4000-8000-000000000001",
        "summary": f"{policy}: {outcome}",
        "indicator": "info",
        "source": {"label": "stub"},
        "extension": {"ketamine-cds.decision": decision},
    }


Responder = Callable[[dict[str, Any]], tuple[dict[str, Any], int]]


class StubCdsService:
    """A tiny CDS service on a loopback port: records every request, answers with `responder(body)`."""

    def __init__(self, prefetch: dict[str, str], responder: Responder | None = None) -> None:
        self.prefetch = prefetch
        self.responder: Responder = responder or (lambda body: ({"cards": [], "systemActions": []}, 200))
        self.calls: list[dict[str, Any]] = []  # {"path", "method", "headers", "json"}
        self.app = self._build_app()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def hook_url(self) -> str:
        return f"{self.base_url}/cds-services/{SERVICE_ID}"

    def _build_app(self) -> Flask:
        app = Flask("stub-cds-service")

        def record() -> None:
            self.calls.append(
                {
                    "path": request.path,
                    "method": request.method,
                    "headers": dict(request.headers),
                    "json": request.get_json(silent=True),
                }
            )

        @app.get("/cds-services")
        def discovery() -> Any:
            record()
            return jsonify(
                {"services": [{"id": SERVICE_ID, "hook": "order-sign", "title": "stub", "prefetch": self.prefetch}]}
            )

        @app.post(f"/cds-services/{SERVICE_ID}")
        def hook() -> Any:
            record()
            body, status = self.responder(request.get_json(force=True))
            return jsonify(body), status

        return app

    def start(self) -> StubCdsService:
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def hook_calls(self) -> list[dict[str, Any]]:
        return [call for call in self.calls if call["method"] == "POST"]


def example_responder(outcome: str = "criteria-not-met") -> Responder:
    """Answers like the service should for the example scenarios: a decision card per ketamine order only."""

    def respond(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        orders = [entry["resource"] for entry in body["context"]["draftOrders"]["entry"]]
        cards = [
            decision_card(f"MedicationRequest/{order['id']}", "mgbhp-031", outcome, "initial")
            for order in orders
            if "ketamine" in json.dumps(order.get("medicationCodeableConcept", {})).lower()
        ]
        return {"cards": cards, "systemActions": []}, 200

    return respond
