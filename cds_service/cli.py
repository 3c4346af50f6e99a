"""`ketamine-cds` console: serve the CDS service, run the sandbox and the demo."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cds_service.config import ConfigError, ServiceConfig, add_arguments, check_environment, config_from


def _serve(args: argparse.Namespace) -> int:
    try:
        check_environment()  # a typo in a KETAMINE_CDS_* name must not fall back to a default silently
        config = config_from({k: v for k, v in vars(args).items() if k not in ("command", "func")}).validate()
    except ConfigError as exc:
        print(f"ketamine-cds serve: {exc}", file=sys.stderr)
        return 2
    from cds_service.serving import prepare_metrics_dir

    prepare_metrics_dir()  # before prometheus_client is imported: workers inherit multiprocess mode
    from cds_service.observability import configure_logging

    configure_logging(config.log_level)
    from fhir_mappings.validation import validate

    # Before the port is bound: the same lines as `validate` (a clean verdict on these very files is remembered).
    problems = validate(site_config=config.site_config, remembered=True)
    if problems:
        print("\n".join(str(p) for p in problems), file=sys.stderr)
        print(f"ketamine-cds serve: the mapping set has {len(problems)} problem(s); not starting", file=sys.stderr)
        return 2
    run_gunicorn(config)
    return 0


def run_gunicorn(config: ServiceConfig) -> None:
    """Serve the app with gunicorn, with the settings a user's own gunicorn gets (`cds_service.gunicorn_conf`)."""
    from gunicorn.app.base import BaseApplication

    from cds_service.serving import settings

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in settings(config, mappings_checked=True).items():
                self.cfg.set(key, value)
            self.ketamine_site_config = config.site_config

        def load(self) -> Any:
            from cds_service.app import create_app
            from cds_service.reload import install_sighup

            app = create_app(config)
            install_sighup(app)
            return app

    Server().run()


def _db(args: argparse.Namespace) -> int:
    """`ketamine-cds db upgrade|current`: the audit store's schema revision (Alembic)."""
    from cds_service import migrations
    from cds_service.audit import AuditStoreError

    try:
        check_environment()
        database = config_from({"database": args.database}).database
        if args.action == "upgrade":
            before, after = migrations.upgrade(database)
            print(f"audit store at revision {after} (was {before or 'not versioned'})")
        else:
            current = migrations.current(database)
            head = migrations.head()
            state = "up to date" if current == head else f"head is {head}: run `ketamine-cds db upgrade`"
            print(f"audit store at revision {current or 'none (not versioned)'}; {state}")
    except (ConfigError, AuditStoreError) as exc:
        print(f"ketamine-cds db: {exc}", file=sys.stderr)
        return 2
    return 0


def _register_tools(sub: Any) -> None:
    """The sandbox, mapping tools and bench commands (their modules import much of the project)."""
    try:
        from sandbox.cli import register
    except ImportError:  # the sandbox extra is not installed
        register = None
    if register is not None:
        register(sub)
    try:
        from fhir_mappings.tools import register as register_tools
    except ImportError:
        register_tools = None
    if register_tools is not None:
        register_tools(sub)
    from cds_service.bench import register as register_bench

    register_bench(sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ketamine-cds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the CDS Hooks service (gunicorn)")
    add_arguments(serve)
    serve.set_defaults(func=_serve)
    db = sub.add_parser("db", help="audit store schema: upgrade to this version's revision, or show the current one")
    db.add_argument("action", choices=["upgrade", "current"])
    db.add_argument("--database", default=None, help="database URL (env KETAMINE_CDS_DATABASE)")
    db.set_defaults(func=_db)
    given = sys.argv[1:] if argv is None else argv
    if not given or given[0] not in ("serve", "db"):  # `serve` does not pay for importing the tools (~0.3 s)
        _register_tools(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
