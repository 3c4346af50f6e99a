"""`ketamine-cds sandbox ...` and `ketamine-cds demo`: argparse commands for the sandbox.

The top-level `ketamine-cds` parser calls `register(subparsers)`; every command sets `func`, a callable taking the
parsed `argparse.Namespace` and returning the process exit code. `python -m sandbox.cli ...` runs the same
commands without the service's CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from sandbox.demo import (
    KEY_FILE,
    TRUSTED_ISSUERS_FILE,
    Progress,
    ResultTable,
    fire_all,
    interrupts_as_keyboard_interrupt,
    latency_summary,
    run_demo,
    write_sandbox_keys,
)
from sandbox.ehr import DEFAULT_ISSUER, DEFAULT_SERVICE_ID, MODES, EhrError, EhrSimulator, check, render_cards
from sandbox.fhir_server import FhirServerError, FhirServerProcess
from sandbox.loader import LoadError, load_into
from sandbox.scenarios import PATIENTS_DIR, ScenarioError, find_scenario, lint, load_all
from sandbox.signing import load_key
from sandbox.web_app import DEFAULT_CACHE_DIR, StaticSite, WebAppError, build_app, format_links, scenario_links

FHIR_TOKEN_ENV = "KETAMINE_CDS_SANDBOX_FHIR_TOKEN"
DEFAULT_APP_PORT = 8080
DEFAULT_APP_URL = f"http://127.0.0.1:{DEFAULT_APP_PORT}/"  # where `sandbox web-app` serves its build
DEFAULT_SERVICE_URL = "http://127.0.0.1:8765"  # `ketamine-cds serve`'s default


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `sandbox {server,keys,load,fire,check}` and `demo` to the `ketamine-cds` command line."""
    sandbox = subparsers.add_parser("sandbox", help="offline FHIR server, scenario patients and an EHR simulator")
    commands = sandbox.add_subparsers(dest="sandbox_command", metavar="COMMAND", required=True)

    server = commands.add_parser("server", help="run a FHIR server in the foreground until Ctrl-C")
    server.add_argument("--port", type=int, default=None, help="TCP port on 127.0.0.1 (default: a free one)")
    server.add_argument("--load", action="store_true", help="load every scenario into it once it is up")
    server.add_argument(
        "--open",
        action="store_true",
        help="no authentication (for the CDS Hooks sandbox web app, which only talks to open servers); "
        "still bound to 127.0.0.1. Prints the app's URL for each scenario patient",
    )
    _web_app_link_options(server)
    _scenario_options(server)
    server.set_defaults(func=cmd_server)

    web_app = commands.add_parser(
        "web-app", help="build the CDS Hooks sandbox web app with ketamine in its medication list and serve it"
    )
    web_app.add_argument(
        "--source", type=Path, required=True, help="the app's source (e.g. ../shared/clients/cds-hooks-sandbox)"
    )
    web_app.add_argument("--port", type=int, default=DEFAULT_APP_PORT, help="TCP port on 127.0.0.1")
    web_app.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="npm install and build cache")
    web_app.set_defaults(func=cmd_web_app)

    links = commands.add_parser(
        "web-app-urls", help="print the CDS Hooks sandbox web app's URL for each scenario patient of an open server"
    )
    links.add_argument("--fhir-server", required=True, help="the open FHIR R4 base URL the scenarios are loaded in")
    _web_app_link_options(links)
    _scenario_options(links)
    links.set_defaults(func=cmd_web_app_urls)

    keys = commands.add_parser("keys", help="write a sandbox client key and the service's trusted-issuers file")
    keys.add_argument("--out", type=Path, required=True, help=f"directory for {KEY_FILE} and {TRUSTED_ISSUERS_FILE}")
    keys.add_argument(
        "--fhir-server", action="append", required=True, help="FHIR base URL the service may fetch from (repeatable)"
    )
    keys.add_argument("--issuer", default=DEFAULT_ISSUER, help="JWT iss of the simulated EHR")
    keys.set_defaults(func=cmd_keys)

    load = commands.add_parser("load", help="load the scenario records into a FHIR server (PUT; repeatable)")
    _fhir_options(load)
    _scenario_options(load)
    load.set_defaults(func=cmd_load)

    fire = commands.add_parser("fire", help="fire one scenario's order-sign hook and print the cards")
    fire.add_argument("scenario_id", metavar="SCENARIO_ID")
    _service_options(fire)
    fire.add_argument("--mode", choices=MODES, default="prefetch", help="send prefetch, or let the service fetch")
    fire.add_argument("--json", action="store_true", help="print the raw response JSON instead of rendered cards")
    fire.set_defaults(func=cmd_fire)

    check_cmd = commands.add_parser("check", help="fire every scenario and compare with its expected outcomes")
    _service_options(check_cmd)
    check_cmd.add_argument("--mode", choices=[*MODES, "both"], default="both")
    check_cmd.add_argument("--only", action="append", default=[], metavar="SCENARIO_ID", help="repeatable")
    check_cmd.set_defaults(func=cmd_check)

    demo = subparsers.add_parser("demo", help="start everything, fire every scenario, print results and latency")
    demo.add_argument("--fhir-server", default=None, help="use this FHIR server instead of starting one")
    demo.add_argument("--fhir-token", default=None, help=f"its bearer token (default: ${FHIR_TOKEN_ENV})")
    demo.add_argument("--keep-running", action="store_true", help="keep the servers up after the run until Ctrl-C")
    demo.add_argument("--show", action="append", default=[], metavar="SCENARIO_ID", help="scenarios to print cards of")
    _scenario_options(demo)
    demo.set_defaults(func=cmd_demo)


def _scenario_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenarios", type=Path, default=PATIENTS_DIR, help="scenario directory")
    parser.add_argument("--today", type=date.fromisoformat, default=None, help="date to shift scenarios to")


def _web_app_link_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--app-url", default=DEFAULT_APP_URL, help=f"where the web app is served (default {DEFAULT_APP_URL})"
    )
    parser.add_argument(
        "--service",
        default=DEFAULT_SERVICE_URL,
        help=f"the service's base URL as the browser reaches it (default {DEFAULT_SERVICE_URL})",
    )


def _fhir_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fhir-server", required=True, help="FHIR R4 base URL")
    parser.add_argument("--fhir-token", default=None, help=f"bearer token for it (default: ${FHIR_TOKEN_ENV})")


def _service_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", required=True, help="service base URL (or its /cds-services discovery URL)")
    parser.add_argument("--service-id", default=DEFAULT_SERVICE_ID)
    parser.add_argument("--key", type=Path, required=True, help=f"client key file ({KEY_FILE} from `sandbox keys`)")
    parser.add_argument("--issuer", default=DEFAULT_ISSUER, help="JWT iss (must match the trusted-issuers file)")
    _fhir_options(parser)
    _scenario_options(parser)


def _fhir_token(args: argparse.Namespace) -> str | None:
    return args.fhir_token or os.environ.get(FHIR_TOKEN_ENV) or None


def _simulator(args: argparse.Namespace) -> EhrSimulator:
    return EhrSimulator(
        args.service,
        args.fhir_server,
        fhir_token=_fhir_token(args),
        key=load_key(args.key),
        issuer=args.issuer,
        service_id=args.service_id,
    )


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


# ---------------------------------------------------------------------- commands


def _discovery_url(service: str) -> str:
    service = service.rstrip("/")
    return service if service.endswith("/cds-services") else f"{service}/cds-services"


def _print_web_app_links(args: argparse.Namespace, fhir_server: str, scenarios: list | None = None) -> None:
    links = scenario_links(
        scenarios if scenarios is not None else load_all(args.scenarios),
        app_url=args.app_url,
        fhir_server=fhir_server,
        discovery_url=_discovery_url(args.service),
    )
    print(
        "CDS Hooks sandbox web app on each scenario patient (its patient picker lists only the first 20 patients);\n"
        "the app's Rx Sign order has no route, requester or performer, so expect the card to ask for them:",
        flush=True,
    )
    print(format_links(links), flush=True)


def cmd_server(args: argparse.Namespace) -> int:
    """Run sekmet until Ctrl-C; print what a developer needs to point the service and the EHR at it."""
    try:
        server_process = FhirServerProcess(open_access=args.open)
        with interrupts_as_keyboard_interrupt(), server_process.start(port=args.port) as server:
            print(f"FHIR base URL: {server.base_url}", flush=True)
            if args.open:
                print("bearer token:  none (open server: no authentication, reachable from this machine only)")
            else:
                print(f"bearer token:  {server.token}", flush=True)
            print(f"data dir:      {server.data_dir}", flush=True)
            print(f"(started in {server.startup_seconds:.1f} s; Ctrl-C stops it and deletes its data)", flush=True)
            scenarios = load_all(args.scenarios) if args.load or args.open else None
            if args.load:
                report = load_into(server.base_url, scenarios or [], token=server.token, today=args.today)
                print(f"loaded {report.summary()}", flush=True)
            if args.open:
                if not args.load:
                    print("(no scenario loaded: add --load, or run `ketamine-cds sandbox load` against it)")
                _print_web_app_links(args, server.base_url, scenarios)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("stopping", flush=True)
    except (FhirServerError, ScenarioError, LoadError) as exc:
        return _fail(str(exc))
    return 0


def cmd_web_app(args: argparse.Namespace) -> int:
    """Build the app (cached) and serve it on loopback until Ctrl-C."""
    try:
        build = build_app(args.source, args.cache_dir, progress=lambda message: print(message, flush=True))
        with interrupts_as_keyboard_interrupt(), StaticSite(build, port=args.port) as site:
            print(f"CDS Hooks sandbox web app: {site.url} (Ctrl-C stops it)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("stopping", flush=True)
    except (WebAppError, OSError) as exc:
        return _fail(str(exc))
    return 0


def cmd_web_app_urls(args: argparse.Namespace) -> int:
    try:
        _print_web_app_links(args, args.fhir_server.rstrip("/"))
    except ScenarioError as exc:
        return _fail(str(exc))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    write_sandbox_keys(args.out, args.fhir_server, issuer=args.issuer)
    print(f"wrote {args.out / KEY_FILE} (private, keep it out of git) and {args.out / TRUSTED_ISSUERS_FILE}")
    print(f"start the service with: ketamine-cds serve --trusted-issuers {args.out / TRUSTED_ISSUERS_FILE} ...")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    try:
        scenarios = load_all(args.scenarios)
        for warning in lint(scenarios):
            print(f"warning: {warning}", file=sys.stderr)
        report = load_into(args.fhir_server, scenarios, token=_fhir_token(args), today=args.today)
    except (ScenarioError, LoadError) as exc:
        return _fail(str(exc))
    print(f"loaded {report.summary()} into {args.fhir_server}")
    return 0


def cmd_fire(args: argparse.Namespace) -> int:
    try:
        scenario = find_scenario(args.scenario_id, load_all(args.scenarios))
        with _simulator(args) as simulator:
            result = simulator.fire(scenario, args.mode, today=args.today)
    except (ScenarioError, EhrError, OSError, ValueError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(result.response, indent=2))
    else:
        print(f"{scenario.id} [{args.mode}] HTTP {result.status} in {result.latency_ms:.1f} ms")
        print(render_cards(result.response))
    problems = check(scenario, result)
    if scenario.has_expectations:
        print("matches the expected outcome" if not problems else "MISMATCH:\n  " + "\n  ".join(problems))
    return 0 if not problems else 1


def cmd_check(args: argparse.Namespace) -> int:
    try:
        scenarios = load_all(args.scenarios)
        if args.only:
            scenarios = [find_scenario(scenario_id, scenarios) for scenario_id in args.only]
        modes = MODES if args.mode == "both" else (args.mode,)
        progress = Progress()
        table = ResultTable(scenarios, progress)
        with _simulator(args) as simulator:
            simulator.discover()
            table.header()
            rows = fire_all(simulator, scenarios, modes=modes, today=args.today, on_row=table.row)
    except (ScenarioError, EhrError, OSError, ValueError) as exc:
        return _fail(str(exc))
    failures = [row for row in rows if not row.passed]
    for row in failures:
        print(f"✗ {row.scenario.id} [{row.result.mode}]")
        for problem in row.problems:
            print(f"    {problem}")
    print("latency of the hook call (ms):")
    print("\n".join(latency_summary(rows)))
    checked = [row for row in rows if row.checked]
    matched = sum(row.passed for row in checked)
    print(f"{matched}/{len(checked)} expected outcomes matched; {len(rows) - len(checked)} unchecked (background)")
    return 0 if not failures else 1


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(
        fhir_server=args.fhir_server,
        fhir_token=_fhir_token(args) if args.fhir_server else None,
        scenarios_dir=args.scenarios,
        keep_running=args.keep_running,
        show=args.show,
        today=args.today,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m sandbox.cli sandbox load ...` / `python -m sandbox.cli demo`."""
    parser = argparse.ArgumentParser(prog="ketamine-cds", description="ketamine-cds sandbox commands")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
