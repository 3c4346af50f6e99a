"""Process settings for a serving worker, applied once it has built the app (`post_worker_init`, cds_service.serving).

The garbage collector is tuned because a hook call allocates in proportion to its record (a 10,000-resource prefetch
is about a million objects, nearly all acyclic and freed by reference counting): with CPython's default thresholds
such a call triggers dozens of collections, the later ones scanning everything the call built so far, which made
large records super-linear. Start-up objects (mappings, models, the ConText pipeline) are frozen out of the scans.

The warm-up — importing the FHIR models, resolving the resource shapes, loading spaCy/medspacy's ConText pipeline —
is what the first calls would otherwise pay for, and no call needs all of it: a triage-only call needs none. Under
gunicorn with this service's configuration a worker therefore answers as soon as its app is built and warms up
in a background thread (`WarmUp.start_in_background`); a call that needs a piece meanwhile waits for that piece
(each is loaded once, under its own lock), so every answer is the one a warm worker gives. `/readyz` reports the
worker not ready until its warm-up has finished (`readiness_checks`: a load balancer sends it traffic once every
call is answered at full speed); elsewhere (tests, an app built in-process) `create_app` warms up before returning.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence

# Young collections every 50,000 net allocations instead of 700; the older generations as CPython's ratios.
GC_THRESHOLDS = (50_000, 20, 10)

log = logging.getLogger("ketamine_cds")

#: Set in the gunicorn master before it forks (`serving.settings`' on_starting): apps built in its workers leave
#: their warm-up to `post_worker_init`, which always runs in the worker. Never set elsewhere.
_warm_up_in_worker_init = False


def tune_gc_after_startup() -> None:
    """Freeze what start-up built and make collections proportionate to the work of a call."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def defer_warm_up_to_worker_init() -> None:
    """In the gunicorn master, before any worker exists: its workers warm up in the background once booted."""
    global _warm_up_in_worker_init
    _warm_up_in_worker_init = True


def warm_up_is_deferred() -> bool:
    """Whether an app built in this process leaves its warm-up to the worker's `post_worker_init`."""
    return _warm_up_in_worker_init


class WarmUp:
    """The steps that make a worker warm, run once; `done` is set when they have run (even if one failed)."""

    def __init__(self, steps: Sequence[Callable[[], object]]) -> None:
        self._steps = tuple(steps)
        self._started = threading.Lock()
        self._begun = False
        self.done = threading.Event()
        self.error: str | None = None  # the failed step's exception type (never its message: it may quote data)
        self.seconds: float | None = None

    @classmethod
    def finished(cls) -> WarmUp:
        """A warm-up with nothing left to do (a state built without one)."""
        warm = cls(())
        warm.run()
        return warm

    @property
    def ok(self) -> bool:
        return self.done.is_set() and self.error is None

    def run(self, *, reraise: bool = False) -> None:
        """Run the steps in this thread (once: a second call returns when the first has finished); `reraise`
        propagates a failing step's exception (an app warmed up in-process fails to build, as before)."""
        with self._started:
            if self._begun:
                run_now = False
            else:
                self._begun = run_now = True
        if not run_now:
            self.done.wait()
            return
        started = time.perf_counter()
        try:
            for step in self._steps:
                step()
        except Exception as exc:  # the calls that need the piece retry it and fail there, visibly; /readyz says so
            self.error = type(exc).__name__
            if reraise:
                raise
            log.error("warm-up failed: %s; the calls that need it will retry it", self.error)
        finally:
            self.seconds = time.perf_counter() - started
            self.done.set()

    def start_in_background(self, then: Callable[[], object] | None = None) -> threading.Thread:
        """Run the steps in a daemon thread, then `then` (e.g. freezing what they built out of GC scans)."""

        def body() -> None:
            self.run()
            if self.ok:
                log.info("worker warm: models, resource shapes and the ConText pipeline loaded in %.2f s", self.seconds)
            if then is not None:
                then()

        thread = threading.Thread(target=body, name="ketamine-cds-warm-up", daemon=True)
        thread.start()
        return thread
