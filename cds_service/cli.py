"""`ketamine-cds` console: serve the CDS service, run the sandbox and the demo."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from cds_service.config import ConfigError, ServiceConfig, add_arguments, config_from


def _serve(args: argparse.Namespace) -> int:
    try:
        config = config_from({k: v for k, v in vars(args).items() if k not in ("command", "func")}).validate()
    except ConfigError as exc:
        print(f"ketamine-cds serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fhir_mappings.validation import validate

    problems = validate(site_config=config.site_config)  # before the port is bound: the same lines as `validate`
    if problems:
        print("\n".join(str(p) for p in problems), file=sys.stderr)
        print(f"ketamine-cds serve: the mapping set has {len(problems)} problem(s); not starting", file=sys.stderr)
        return 2
    run_gunicorn(config)
    return 0


def run_gunicorn(config: ServiceConfig) -> None:
    """Serve the app with gunicorn (threaded workers): a real WSGI server also for `serve` on a laptop."""
    from gunicorn.app.base import BaseApplication

    from cds_service.reload import forward_hup_to_workers, install_sighup

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings = {
                "bind": f"{config.host}:{config.port}",
                "workers": config.workers,
                "threads": config.threads,
                "worker_class": "gthread",
                "timeout": 30,
                "graceful_timeout": 10,
                "keepalive": 5,
                "accesslog": "-",
                # Paths and status only: query strings are not part of our URLs, bodies never logged.
                "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms',
                "errorlog": "-",
                "loglevel": config.log_level.lower(),
            }
            for key, value in settings.items():
                self.cfg.set(key, value)
            self.cfg.set("when_ready", forward_hup_to_workers)  # HUP: check the mappings, reload workers in place
            self.ketamine_site_config = config.site_config

        def load(self) -> Any:
            from cds_service.app import create_app
            from cds_service.runtime import tune_gc_after_startup

            app = create_app(config)
            install_sighup(app)
            tune_gc_after_startup()  # start-up objects leave the collector's scans; collections scale with a call
            return app

    Server().run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ketamine-cds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the CDS Hooks service (gunicorn)")
    add_arguments(serve)
    serve.set_defaults(func=_serve)
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
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
