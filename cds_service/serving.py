"""One gunicorn configuration, used by `ketamine-cds serve` and by your own gunicorn
(`gunicorn -c python:cds_service.gunicorn_conf 'cds_service.wsgi:app'`), so both run with the same settings.

Why the checks live in gunicorn's `on_starting` hook: it runs in the master, once, *before* the port is bound.
A broken mapping set, an unknown `KETAMINE_CDS_*` variable, an unreachable or too-new audit database, an
unset public base URL on a public bind, or `--insecure-no-auth` on a public bind then ends the process with one
line on stderr and exit status 2 — instead of every worker printing tracebacks after "Listening at".
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import time
from typing import Any, NoReturn

from cds_service.config import ConfigError, ServiceConfig, check_environment, config_from, env_name, is_loopback

#: True in a process whose gunicorn was configured here (inherited by its workers; the WSGI module checks it).
CONFIGURED = False
_created_metrics_dir: str | None = None
_METRIC_FILES = ("counter_*.db", "gauge_*.db", "histogram_*.db", "summary_*.db")


def fail(reason: str) -> NoReturn:
    """The one line a refused start-up prints (stderr), then exit status 2."""
    print(f"ketamine-cds: not starting: {' '.join(reason.split())}", file=sys.stderr, flush=True)
    _on_exit(None)  # gunicorn's on_exit does not run for a start refused in on_starting
    raise SystemExit(2)


def settings_from_environment() -> dict[str, Any]:
    """Settings for your own gunicorn: configuration from `KETAMINE_CDS_*` (refused in one line if wrong)."""
    try:
        check_environment()
        config = config_from().validate()
    except ConfigError as exc:
        fail(str(exc))
    return settings(config)


def settings(config: ServiceConfig, *, mappings_checked: bool = False) -> dict[str, Any]:
    """gunicorn settings for this service; `mappings_checked` when the caller already validated the mappings."""
    global CONFIGURED
    prepare_metrics_dir()  # before prometheus_client is imported anywhere (its value class is chosen at import)
    from cds_service.observability import logging_dict
    from cds_service.reload import forward_hup_to_workers

    def on_starting(server: Any) -> None:
        check_before_bind(config, list(server.cfg.address), mappings_checked=mappings_checked, log=server.log)
        from cds_service.runtime import defer_warm_up_to_worker_init

        defer_warm_up_to_worker_init()  # the master, before forking: workers answer first, warm up in the background

    CONFIGURED = True
    host = f"[{config.host}]" if ":" in config.host else config.host
    return {
        "bind": [f"{host}:{config.port}"],
        "workers": config.workers,
        "threads": config.threads,
        "worker_class": "gthread",
        "timeout": 30,
        "graceful_timeout": 10,
        "keepalive": 5,
        "proc_name": "ketamine-cds",
        # The service logs one JSON line per call itself (with outcome, reason, request id): no second access log.
        "accesslog": None,
        "errorlog": "-",
        "loglevel": config.log_level.lower(),
        "logconfig_dict": logging_dict(config.log_level),
        "on_starting": on_starting,
        "when_ready": forward_hup_to_workers,  # HUP: check the mappings once, reload workers in place
        # After the worker built the app: GC tuned, its warm-up started in the background (frozen out of GC scans
        # once it has finished).
        "post_worker_init": _tune_worker,
        "child_exit": _child_exit,
        "on_exit": _on_exit,
    }


def check_before_bind(
    config: ServiceConfig, addresses: list[Any], *, mappings_checked: bool = False, log: Any = None
) -> None:
    """Everything that would make every worker fail or misbehave, checked once; `fail` on the first problem."""
    started = time.monotonic()
    binds = [f"{a[0]}:{a[1]}" if isinstance(a, tuple) else f"unix:{a}" for a in addresses]
    public = [b for b, a in zip(binds, addresses, strict=True) if isinstance(a, tuple) and not is_loopback(a[0])]
    if config.insecure_no_auth and public:
        fail(f"--insecure-no-auth refuses to listen on {public[0]}: without authentication bind to 127.0.0.1 only")
    if not config.public_base_url:
        own = f"{config.host}:{config.port}"
        if public or binds != [own]:
            fail(
                f"{env_name('public_base_url')} (--public-base-url) is not set and the service listens on "
                f"{', '.join(binds)}: callers' JWT `aud` would have to be {config.base_url}/cds-services/...; "
                "set it to the URL clients use"
            )
        if log is not None:  # safe on loopback, but a proxy in front would need it: say what `aud` must be
            log.warning(
                "%s is not set: callers' JWT `aud` must be %s/cds-services/...; set it if clients reach the "
                "service through another URL",
                env_name("public_base_url"),
                config.base_url,
            )
    if not mappings_checked:
        from cds_service.reload import check_mappings

        problem = check_mappings(config.site_config)
        if problem is not None:
            fail(f"the mapping set is invalid: {problem}")
    if config.trusted_issuers:
        from cds_service.auth import TrustedIssuers

        try:
            TrustedIssuers.load(config.trusted_issuers)
        except Exception as exc:  # any reason the file cannot be used, in its own words
            fail(f"--trusted-issuers {config.trusted_issuers}: {exc}")
    from cds_service.audit import AuditStore, AuditStoreError

    try:
        AuditStore(config.database, asynchronous=False).close()  # connects and brings the schema to head
    except AuditStoreError as exc:
        fail(str(exc))
    if log is not None:
        log.info("start-up checks passed in %.2f s", time.monotonic() - started)


def prepare_metrics_dir() -> None:
    """prometheus-client multiprocess mode: a fresh directory per master (or the operator's, emptied)."""
    global _created_metrics_dir
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given and given != _created_metrics_dir:
        os.makedirs(given, exist_ok=True)
        for pattern in _METRIC_FILES:  # samples of a previous run would be added to this one's
            for path in glob.glob(os.path.join(given, pattern)):
                os.unlink(path)
        return
    if _created_metrics_dir is None:
        _created_metrics_dir = tempfile.mkdtemp(prefix="ketamine-cds-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _created_metrics_dir


def _tune_worker(worker: Any) -> None:
    from cds_service.runtime import tune_gc_after_startup

    tune_gc_after_startup()
    state = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("ketamine_cds")
    if state is not None and not state.warm_up.done.is_set():
        state.warm_up.start_in_background(then=tune_gc_after_startup)


def _child_exit(_server: Any, worker: Any) -> None:
    """A worker ended: its live gauges (audit queue depth) no longer count; its counters do."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def _on_exit(_server: Any) -> None:
    """Remove the metrics directory this master created, and its variable (a process that goes on, e.g. a refused
    `serve` called in-process, must not point prometheus-client at a deleted directory)."""
    global _created_metrics_dir
    if _created_metrics_dir is not None:
        shutil.rmtree(_created_metrics_dir, ignore_errors=True)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == _created_metrics_dir:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        _created_metrics_dir = None
