"""A stub CDS service run as a separate process (`python stub_service_main.py PORT [OUTCOME]`) for demo tests.

It stands in for `python -m cds_service.cli serve` so the demo's process handling, discovery wait, firing and
reporting are tested before (and independently of) the real service.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.sandbox.helpers`

from werkzeug.serving import make_server

from tests.sandbox.helpers import StubCdsService, example_responder

PREFETCH = {"patient": "Patient/{{context.patientId}}", "conditions": "Condition?patient={{context.patientId}}"}

if __name__ == "__main__":
    port = int(sys.argv[1])
    outcome = sys.argv[2] if len(sys.argv) > 2 else "criteria-not-met"
    if outcome == "crash":
        sys.exit("stub service: refusing to start")
    stub = StubCdsService(PREFETCH, example_responder(outcome))
    make_server("127.0.0.1", port, stub.app, threaded=True).serve_forever()
