"""The benchmark's floor: a bare endpoint on the same stack (gunicorn + Flask) that reads the body and answers a
fixed JSON document of a requested size — what no implementation of the hook can beat.

`ketamine-cds bench` serves it next to the real hook (`KETAMINE_CDS_BENCH_FLOOR=1`, never set in production) so that
both are measured by the same server process, interleaved; `app` is the bare Flask app alone, whose start-up time is
the start-up floor.
"""

from __future__ import annotations

import os
from functools import lru_cache

from flask import Flask, Response, request

FLOOR_PATH = "/bench/floor"
FLOOR_ENV = "KETAMINE_CDS_BENCH_FLOOR"


def floor_enabled() -> bool:
    """Only a benchmark run turns the floor on: a production instance never exposes it."""
    return os.environ.get(FLOOR_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=64)
def _fixed_answer(size: int) -> bytes:
    """A valid JSON document of exactly `size` bytes (at least 12), built once per size."""
    size = max(size, 12)
    return b'{"pad":"' + b"x" * (size - 10) + b'"}'


def register_floor(app: Flask) -> None:
    """Add `POST /bench/floor?size=N`: read the whole body, answer N bytes of fixed JSON."""

    @app.post(FLOOR_PATH)
    def bench_floor() -> Response:
        request.get_data(cache=False)
        size = request.args.get("size", default=64, type=int) or 64
        return Response(_fixed_answer(min(size, 64 * 1024 * 1024)), mimetype="application/json")


app = Flask("ketamine_cds_floor")
app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
register_floor(app)
