"""Where the time of one order-sign call goes: pyinstrument over in-process calls, printed as a stage table.

Starts sekmet-fhir with the sandbox scenarios (the service may still query it in prefetch mode), builds the
bench's records (`cds_service.bench`), and calls the real Flask app (real JWT, SQLite audit store) through its
test client. Not a test; prints numbers.

    python benchmarks/profile_call.py [--case prefetch_60|prefetch_300|synthea_1000|large_10000|fallback|triage]
        [--calls 50] [--html out.html]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from datetime import date
from pathlib import Path

from pyinstrument import Profiler

from cds_service.app import create_app
from cds_service.bench import STORY, TRIAGE_ORDER, complete_pages, padded_prefetch
from cds_service.config import ServiceConfig
from cds_service.discovery import discovery_document
from cds_service.runtime import tune_gc_after_startup
from sandbox.demo import write_sandbox_keys
from sandbox.ehr import DEFAULT_ISSUER, EhrSimulator
from sandbox.fhir_server import FhirServerProcess
from sandbox.loader import load_into
from sandbox.scenarios import find_scenario, load_all
from sandbox.signing import sign_cds_jwt

# Stage = the first frame (outermost) whose function name matches, in call order of the pipeline.
STAGES = (
    ("body parsing (load_json)", ("load_json",)),
    ("JWT + jti replay", ("verify", "_authenticate")),
    ("request validation (schema, shapes, R4B)", ("validate_request", "validate_orders_fhir")),
    ("triage", ("triage",)),
    ("prefetch: read + shapes", ("_check_prefetch", "add")),
    ("FHIR round trips", ("fetch_many", "_resolve_references")),
    ("record / facts / decide", ("decide",)),
    ("cards", ("build_response",)),
    ("audit", ("_write_audit", "record_call")),
    ("JSON answer", ("jsonify",)),
)


def stage_table(profiler: Profiler) -> list[tuple[str, float]]:
    """Seconds per stage: each frame is attributed to the outermost stage it is under."""
    session = profiler.last_session
    assert session is not None
    root = session.root_frame()
    totals: dict[str, float] = {name: 0.0 for name, _ in STAGES}
    totals["other"] = 0.0

    def walk(frame: object, stage: str | None) -> None:
        function = getattr(frame, "function", "")
        here = stage
        if here is None:
            for name, functions in STAGES:
                if function in functions:
                    here = name
                    break
        children = list(getattr(frame, "children", []))
        own = frame.time - sum(c.time for c in children)  # type: ignore[attr-defined]
        totals[here or "other"] += own
        for child in children:
            walk(child, here)

    if root is not None:
        walk(root, None)
    return sorted(totals.items(), key=lambda item: -item[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="prefetch_60")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--html", default=None)
    parser.add_argument("--text", default=None, help="pyinstrument's call tree, as text")
    parser.add_argument("--cprofile", action="store_true", help="also the top functions by own time (cProfile)")
    args = parser.parse_args()
    scenarios = load_all(include_background=True)
    story = find_scenario(STORY, scenarios)
    workdir = Path(tempfile.mkdtemp(prefix="ketamine-cds-profile-"))
    with FhirServerProcess() as fhir:
        load_into(fhir.base_url, scenarios, token=fhir.token)
        key = write_sandbox_keys(workdir, [fhir.base_url])
        base = "http://127.0.0.1:9"
        config = ServiceConfig(
            public_base_url=base,
            trusted_issuers=str(workdir / "trusted-issuers.json"),
            database=f"sqlite:///{workdir / 'audit.db'}",
            site_config=str(Path("sandbox/site-config.yaml").resolve()),
            max_body_bytes=64 * 1024 * 1024,
        )
        app = create_app(config)
        tune_gc_after_startup()  # as the served worker does
        state = app.extensions["ketamine_cds"]
        simulator = EhrSimulator(base, fhir.base_url, fhir_token=fhir.token, key=key)
        simulator._discovery = discovery_document(state.mappings.queries)
        mode = "fallback" if args.case == "fallback" else "prefetch"
        body = simulator.build_request(story, mode=mode, today=date.today())
        if mode == "prefetch":  # as the bench sends it: a conformant EHR's complete prefetch
            complete_pages(simulator._fhir, body["prefetch"], story.patient_id)
        if args.case == "triage":
            order = {**TRIAGE_ORDER, "subject": {"reference": f"Patient/{story.patient_id}"}}
            order["requester"] = {"reference": story.user_id}
            body["context"]["draftOrders"]["entry"] = [{"resource": order}]
        elif args.case in ("prefetch_300", "synthea_1000", "large_10000"):
            target = int(args.case.rsplit("_", 1)[1])
            body = {**copy.deepcopy(body), "prefetch": padded_prefetch(body["prefetch"], target, fhir.base_url)[0]}
        raw = json.dumps(body).encode()
        Path(workdir / "body.json").write_bytes(raw)
        client = app.test_client()
        url = "/cds-services/ketamine-prior-auth"

        def call() -> None:
            token = sign_cds_jwt(key, iss=DEFAULT_ISSUER, aud=base + url)
            response = client.post(
                url, data=raw, headers={"Authorization": f"Bearer {token}"}, content_type="application/json"
            )
            assert response.status_code == 200, response.data[:500]

        for _ in range(3):
            call()
        profiler = Profiler(interval=0.0005)
        started = time.perf_counter()
        profiler.start()
        for _ in range(args.calls):
            call()
        profiler.stop()
        elapsed = (time.perf_counter() - started) / args.calls * 1000
        state.audit.close() if hasattr(state.audit, "close") else None
        table = stage_table(profiler)
        total = sum(seconds for _, seconds in table) or 1.0
        print(f"{args.case}: {elapsed:.1f} ms per call (in process, profiled, {args.calls} calls)")
        print("| stage | ms/call | share |\n|---|---:|---:|")
        for name, seconds in table:
            print(f"| {name} | {seconds / args.calls * 1000:.2f} | {seconds / total * 100:.0f} % |")
        if args.cprofile:
            import cProfile
            import pstats

            with cProfile.Profile() as cprofile:
                for _ in range(args.calls):
                    call()
            pstats.Stats(cprofile).sort_stats("tottime").print_stats(25)
        if args.html:
            Path(args.html).write_text(profiler.output_html())
        if args.text:
            Path(args.text).write_text(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    main()
