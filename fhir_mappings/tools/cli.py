"""The informaticist's commands: `ketamine-cds mappings validate|test|impact|schemas`, `evaluate`, `report`.

Every command prints a human table by default and JSON with `--format json` (for scripts and CI), never a
Python traceback for a mistake in the data: mapping problems are file:line:column lines, a bad input file is
one sentence. Exit codes: 0 fine, 1 the check failed (cases failing, coverage too low, changes found with
--fail-on-change), 2 the input or the mapping set could not be used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from fhir_mappings.mappings import MAPPINGS_DIR, Mappings

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=110)


def _command(
    sub: Any, name: str, help_text: str, example: str, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog="example:\n  " + example.strip().replace("\n", "\n  "),
        formatter_class=_formatter,
    )
    parser.set_defaults(func=func)
    return parser


def _format_option(parser: argparse.ArgumentParser, choices: tuple[str, ...] = ("text", "json")) -> None:
    parser.add_argument("--format", choices=choices, default="text", help="output format (default text)")


def _mappings_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mappings", metavar="DIR", help="mapping directory to use instead of the shipped one (same layout)"
    )
    parser.add_argument("--site-config", metavar="FILE", help="site configuration (YAML or JSON)")


def _iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def register(sub: Any) -> None:
    """Add the informaticist commands to the `ketamine-cds` parser."""
    mappings = sub.add_parser(
        "mappings",
        help="check, test and compare mapping sets (value sets, facts, policies, queries, routing)",
        description="Check, test and compare mapping sets.",
        formatter_class=_formatter,
    )
    msub = mappings.add_subparsers(dest="mappings_command", required=True)

    p = _command(
        msub,
        "validate",
        "check every mapping file (and a site configuration): all problems at once, as file:line:column",
        "ketamine-cds mappings validate ./my-mappings --site-config site.yaml\n"
        "ketamine-cds mappings validate --format json   # the shipped mappings, for scripts",
        _validate,
    )
    p.add_argument("directory", nargs="?", metavar="DIR", help="mapping directory (default: the shipped mappings)")
    p.add_argument("--site-config", metavar="FILE", help="site configuration to check with it")
    _format_option(p)

    p = _command(
        msub,
        "schemas",
        "show or write the JSON Schemas of the mapping files (for a YAML language server)",
        "ketamine-cds mappings schemas --write          # regenerate fhir_mappings/schemas/*.schema.json\n"
        "ketamine-cds mappings schemas --check          # exit 1 when the published schemas are stale",
        _schemas,
    )
    p.add_argument("--write", action="store_true", help="write the published schema files")
    p.add_argument("--check", action="store_true", help="exit 1 when a published schema differs from the code")
    p.add_argument("--out", metavar="DIR", help="directory to write to (default fhir_mappings/schemas)")
    _format_option(p)

    p = _command(
        msub,
        "test",
        "run the policy fixture cases (policies/*.cases/) and report criterion coverage per rule branch",
        "ketamine-cds mappings test --min-coverage 80\n"
        "ketamine-cds mappings test ./my-mappings --only mgbhp-031/phq9 --format json",
        _test,
    )
    p.add_argument("directory", nargs="?", metavar="DIR", help="mapping directory (default: the shipped mappings)")
    p.add_argument(
        "--only", metavar="TEXT", action="append", default=[], help="only cases whose policy/name contains TEXT"
    )
    p.add_argument("--min-coverage", type=float, metavar="PERCENT", help="fail when branch coverage is below PERCENT")
    p.add_argument("--verbose", action="store_true", help="list passing cases too")
    _format_option(p)

    p = _command(
        msub,
        "impact",
        "what a mapping change does: fixture cases, sandbox stories and a cohort evaluated with both mapping sets",
        "ketamine-cds mappings impact --against HEAD~1                # working tree vs the previous commit\n"
        "ketamine-cds mappings impact --against main --mappings ./candidate --cohort ./bundles --format json",
        _impact,
    )
    p.add_argument(
        "--against",
        required=True,
        metavar="REV|DIR",
        help="the mapping set to compare with: a git revision or a directory",
    )
    p.add_argument(
        "--cohort",
        action="append",
        default=[],
        metavar="DIR_OR_URL",
        help="more patients: a folder of Bundles / NDJSON, or a FHIR server",
    )
    p.add_argument("--no-cases", action="store_true", help="leave out the fixture cases")
    p.add_argument("--no-stories", action="store_true", help="leave out the sandbox stories")
    p.add_argument("--fhir-token", metavar="TOKEN", help="bearer token for a FHIR server cohort")
    p.add_argument("--fail-on-change", action="store_true", help="exit 1 when anything changed")
    p.add_argument(
        "--only",
        metavar="TEXT",
        action="append",
        default=[],
        help="only patients (case, story, cohort id) containing TEXT",
    )
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: CPU count)")
    _mappings_option(p)
    _format_option(p, ("text", "json", "markdown"))

    p = _command(
        sub,
        "evaluate",
        "evaluate one patient record offline and say why each criterion came out as it did",
        "ketamine-cds evaluate sandbox/patients/mgb-031-documentation-needed.json --explain\n"
        "ketamine-cds evaluate patient.json --order order.json --as-of 2026-01-15 --format json",
        _evaluate,
    )
    p.add_argument("bundle", metavar="BUNDLE.json", help="a patient Bundle (or a sandbox story / fixture base)")
    p.add_argument("--order", metavar="ORDER.json", help="the draft order(s): a resource, a Bundle or a list")
    p.add_argument(
        "--assume",
        default="auto",
        metavar="KIND",
        help="without --order: ketamine-iv, integration-psychotherapy, eligibility-consultation or auto (default)",
    )
    p.add_argument("--policy", metavar="ID", help="evaluate this policy (default: the one the coverage routes to)")
    p.add_argument(
        "--as-of", type=_iso_date, metavar="DATE", help="evaluation date (default: the story's date, else today)"
    )
    p.add_argument("--patient", metavar="ID", help="the patient, when the Bundle holds several")
    p.add_argument(
        "--explain",
        action="store_true",
        help="per criterion: rule branch, rule tree, facts, evidence, value-set entries",
    )
    _mappings_option(p)
    _format_option(p, ("text", "json", "markdown"))

    p = _command(
        sub,
        "report",
        "evaluate a cohort in parallel and write one self-contained HTML report (with agreement to past reviews)",
        "ketamine-cds report ./bundles --out report.html --reference decisions.csv\n"
        "ketamine-cds report https://fhir.example.org/fhir --fhir-token $TOKEN --out report.html",
        _report,
    )
    p.add_argument(
        "source", metavar="SOURCE", help="folder of patient Bundles, NDJSON bulk-export folder, or FHIR base URL"
    )
    p.add_argument("--out", default="report.html", metavar="FILE", help="the HTML file to write (default report.html)")
    p.add_argument(
        "--reference", metavar="CSV", help="past human determinations: patient id, policy, approved/denied/pended"
    )
    p.add_argument(
        "--as-of", type=_iso_date, metavar="DATE", help="evaluation date (default: each story's date, else today)"
    )
    p.add_argument(
        "--assume", default="auto", metavar="KIND", help="order kind assumed for patients without one (default auto)"
    )
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (default: CPU count)")
    p.add_argument("--fhir-token", metavar="TOKEN", help="bearer token for a FHIR server source")
    p.add_argument("--max-patients", type=int, metavar="N", help="read at most N patients from a FHIR server")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _mappings_option(p)
    _format_option(p)


# --- helpers -----------------------------------------------------------------------------------------------
def _fail(message: str) -> int:
    print(f"ketamine-cds: {message}", file=sys.stderr)
    return EXIT_UNUSABLE


def _load(directory: str | None, site_config: str | None) -> Mappings | None:
    """The mapping set, or None after printing its problems (file:line:column) to stderr."""
    from fhir_mappings.validation import MappingsInvalid, load_validated

    try:
        return load_validated(site_config, directory)
    except MappingsInvalid as exc:
        print(str(exc), file=sys.stderr)
        print(
            f"ketamine-cds: the mapping set has {len(exc.problems)} problem(s); see `ketamine-cds mappings validate`",
            file=sys.stderr,
        )
        return None


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


# --- commands ------------------------------------------------------------------------------------------------
def _validate(args: argparse.Namespace) -> int:
    from fhir_mappings.validation import validate

    if args.site_config and not Path(args.site_config).is_file():
        return _fail(f"{args.site_config}: file not found")
    problems = validate(args.directory, args.site_config)
    if args.format == "json":
        _print_json({"valid": not problems, "problems": [p.to_json() for p in problems]})
    else:
        for problem in problems:
            print(problem)
        where = args.directory or str(MAPPINGS_DIR)
        print(f"{len(problems)} problem(s) in {where}" if problems else f"ok: {where} is valid", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def _schemas(args: argparse.Namespace) -> int:
    from fhir_mappings.validation import schemas

    directory = Path(args.out) if args.out else schemas.SCHEMA_DIR
    if args.write:
        for path in schemas.write_all(directory):
            print(path)
        return EXIT_OK
    stale = schemas.stale(directory)
    if args.check:
        if stale:
            print(f"stale schema(s): {', '.join(stale)}; run `ketamine-cds mappings schemas --write`", file=sys.stderr)
            return EXIT_FAILED
        print("schemas are current", file=sys.stderr)
        return EXIT_OK
    if args.format == "json":
        _print_json({name: build() for name, build in schemas.SCHEMAS.items()})
    else:
        for name in schemas.SCHEMAS:
            state = "stale" if name in stale else "current"
            print(f"{directory / (name + '.schema.json')}  ({state})")
    return EXIT_OK


def _test(args: argparse.Namespace) -> int:
    from fhir_mappings.tools.cases import case_files, run_cases
    from fhir_mappings.tools.testreport import coverage_text, results_text

    directory = Path(args.directory) if args.directory else MAPPINGS_DIR
    if _load(str(directory) if args.directory else None, None) is None:
        return EXIT_UNUSABLE
    paths = [
        p
        for p in case_files(directory)
        if not args.only or any(o in f"{p.parent.name.removesuffix('.cases')}/{p.stem}" for o in args.only)
    ]
    if not paths:
        return _fail(f"no fixture cases under {directory / 'policies'} (*.cases/*.json)")
    results, coverage = run_cases(directory, paths)
    failed = [r for r in results if not r.passed]
    below = args.min_coverage is not None and coverage.percent < args.min_coverage
    if args.format == "json":
        _print_json(
            {
                "passed": len(results) - len(failed),
                "failed": len(failed),
                "cases": [r.to_json() for r in results],
                "coverage": coverage.to_json(),
                **(
                    {"min_coverage": args.min_coverage, "coverage_ok": not below}
                    if args.min_coverage is not None
                    else {}
                ),
            }
        )
    else:
        print(results_text(results, verbose=args.verbose))
        print(coverage_text(coverage, args.min_coverage))
    return EXIT_FAILED if failed or below else EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    from fhir_mappings.tools import render
    from fhir_mappings.tools.explain import evaluate_patient, explain
    from fhir_mappings.tools.records import InputError, load_orders, load_patient

    mappings = _load(args.mappings, args.site_config)
    if mappings is None:
        return EXIT_UNUSABLE
    if args.policy and args.policy not in mappings.policies:
        return _fail(f"unknown policy {args.policy!r} (known: {', '.join(mappings.policies)})")
    try:
        patient = load_patient(args.bundle, args.patient)
        orders = load_orders(args.order) if args.order else None
        evaluation = evaluate_patient(
            mappings, patient, as_of=args.as_of, orders=orders, policy_id=args.policy, assume=args.assume
        )
    except InputError as exc:
        return _fail(str(exc))
    explanations = [explain(mappings, evaluation, d) for d in evaluation.decisions] if args.explain else None
    if args.format == "json":
        for note in evaluation.notes:
            print(f"note: {note}", file=sys.stderr)
        decisions = [d.to_extension() for d in evaluation.decisions]
        if explanations is None:
            _print_json(decisions)
        else:
            _print_json([{"decision": d, "explanation": e} for d, e in zip(decisions, explanations, strict=True)])
        return EXIT_OK
    header = [
        f"Patient {patient.patient_id} ({args.bundle}), as of {evaluation.record.now.date().isoformat()}, "
        f"mapping set {mappings.version}",
        *(f"Note: {n}" for n in evaluation.notes),
    ]
    renderer = render.markdown if args.format == "markdown" else render.text
    sys.stdout.write(renderer(evaluation.decisions, explanations, header))
    return EXIT_OK


def _impact(args: argparse.Namespace) -> int:
    from fhir_mappings.tools.impact import ImpactError, run_impact

    try:
        report = run_impact(
            against=args.against,
            mappings_dir=args.mappings,
            site_config=args.site_config,
            cohorts=args.cohort,
            include_cases=not args.no_cases,
            include_stories=not args.no_stories,
            fhir_token=args.fhir_token,
            only=args.only,
            workers=args.workers,
        )
    except ImpactError as exc:
        return _fail(str(exc))
    if args.format == "json":
        _print_json(report.to_json())
    else:
        sys.stdout.write(report.markdown() if args.format == "markdown" else report.text())
    return EXIT_FAILED if args.fail_on_change and report.changes else EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from fhir_mappings.tools.cohort import CohortError
    from fhir_mappings.tools.report import run_report

    mappings = _load(args.mappings, args.site_config)
    if mappings is None:
        return EXIT_UNUSABLE
    try:
        summary = run_report(
            args.source,
            out=Path(args.out),
            mappings=mappings,
            mappings_dir=args.mappings,
            site_config=args.site_config,
            reference=args.reference,
            as_of=args.as_of,
            assume=args.assume,
            workers=args.workers,
            fhir_token=args.fhir_token,
            max_patients=args.max_patients,
            progress=not args.no_progress and args.format != "json",
        )
    except CohortError as exc:
        return _fail(str(exc))
    if args.format == "json":
        _print_json(summary)
    else:
        print(f"{summary['patients']} patients, {summary['decisions']} decisions -> {args.out}")
        if "agreement" in summary:
            agreed = summary["agreement"]
            print(f"agreement with the reference: {agreed['percent']} % of {agreed['compared']} decisions")
    return EXIT_OK
