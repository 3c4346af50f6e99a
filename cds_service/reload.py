"""Reload the mappings without a restart: `kill -HUP <pid>` (the `serve` process, or gunicorn's master).

A new mapping set is loaded and checked exactly as at start-up (`fhir_mappings.validation.load_validated`: the
same one-line file:line:column messages). If it is valid, it replaces the one in use with a single attribute
assignment — requests in flight finish with the set they started with, the next request uses the new one, and
every decision and audit row names the set's version (`/healthz` shows it). If it is broken, the reload is
refused, logged in one line, and the old set keeps serving.

Under gunicorn the master would normally answer HUP by restarting the workers (which would then refuse to
boot on a broken set). `forward_hup_to_workers` (a gunicorn `when_ready` hook: `ketamine-cds serve` sets it;
with your own gunicorn use `-c python:cds_service.gunicorn_conf`) makes the master check the new set once and, if it is
valid, pass HUP on to the workers, each of which reloads in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from fhir_mappings.mappings import MappingError
from fhir_mappings.validation import MappingsInvalid, load_validated

if TYPE_CHECKING:
    from flask import Flask

    from cds_service.app import ServiceState

log = logging.getLogger("ketamine_cds.reload")


def _one_line(exc: Exception) -> str:
    if isinstance(exc, MappingsInvalid):
        shown = "; ".join(str(p) for p in exc.problems[:3])
        more = len(exc.problems) - 3
        rest = f" (+{more} more: run `ketamine-cds mappings validate`)" if more > 0 else ""
        return f"{len(exc.problems)} problem(s): {shown}{rest}"
    return " ".join(str(exc).split())


def check_mappings(site_config: str | None) -> str | None:
    """None when the mapping set (with the site configuration) loads cleanly, else the one-line reason."""
    try:
        load_validated(site_config)
    except (MappingError, OSError) as exc:
        return _one_line(exc)
    return None


class MappingsReloader:
    """Swaps `state.mappings` for a freshly loaded, validated set; refuses a broken one."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._lock = threading.Lock()

    def reload(self) -> bool:
        with self._lock:
            current = self.state.mappings.version
            try:
                fresh = load_validated(self.state.config.site_config)
            except (MappingError, OSError) as exc:
                log.error("mapping reload refused, still serving %s: %s", current, _one_line(exc))
                return False
            self.state.mappings = fresh  # one assignment: a request sees the old set or the new one, never a mix
            log.info("mappings reloaded: %s -> %s", current, fresh.version)
            return True

    def reload_in_background(self, *_: Any) -> None:
        """Signal handler: the work (seconds) runs in a thread, the handler returns at once."""
        threading.Thread(target=self.reload, name="mappings-reload", daemon=True).start()


def install_sighup(app: Flask) -> MappingsReloader | None:
    """Reload on SIGHUP in this process (a `serve` / gunicorn worker). Only the main thread may set handlers;
    elsewhere (an app built inside a test thread) nothing is installed."""
    state = app.extensions["ketamine_cds"]
    reloader = MappingsReloader(state)
    app.extensions["ketamine_cds_reloader"] = reloader
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return None
    signal.signal(signal.SIGHUP, reloader.reload_in_background)
    return reloader


def forward_hup_to_workers(server: Any) -> None:
    """gunicorn `when_ready` hook: HUP to the master checks the new mapping set once, then reloads every worker
    in place (instead of gunicorn's default of restarting them)."""
    from cds_service.config import config_from

    def handle_hup() -> None:
        site_config = getattr(server.app, "ketamine_site_config", None)
        if site_config is None:
            site_config = config_from().site_config
        problem = check_mappings(site_config)
        if problem is not None:
            server.log.error("mapping reload refused, workers keep the current set: %s", problem)
            return
        for pid in list(server.WORKERS):
            with contextlib.suppress(ProcessLookupError):  # a worker that just exited
                os.kill(pid, signal.SIGHUP)
        server.log.info("mapping set checked; reloading %d worker(s)", len(server.WORKERS))

    server.handle_hup = handle_hup


# `gunicorn -c python:cds_service.reload` (older recipe) still picks this up; `cds_service.gunicorn_conf` sets it too.
when_ready = forward_hup_to_workers
