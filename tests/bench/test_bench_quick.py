"""`ketamine-cds bench --quick` keeps working: every case measured, every figure a number (no timing asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from cds_service.bench import padded_prefetch, percentiles
from cds_service.bench_floor import _fixed_answer

pytestmark = pytest.mark.fhir_server  # starts sekmet-fhir and the service under gunicorn

CASES = ("triage", "prefetch_60", "prefetch_300", "synthea_1000", "large_10000", "fallback")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_bench_prints_every_case_with_numbers() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cds_service.cli", "bench", "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report["cases"]) == set(CASES)
    for name, case in report["cases"].items():
        assert case["statuses"] == {"200": case["service_ms"]["n"]}, (name, case["statuses"])
        for side in ("service_ms", "floor_ms"):
            assert case[side]["n"] >= 1, (name, side)
            assert all(_number(case[side][p]) and case[side][p] > 0 for p in ("p50", "p95", "p99")), (name, side)
    assert report["cases"]["large_10000"]["resources"] >= 10_000
    assert _number(report["cases"]["fallback"]["slowest_single_query_ms"]["p50"])
    for side in ("service", "floor"):
        assert _number(report["throughput"][side]["req_per_s"]) and report["throughput"][side]["req_per_s"] > 0
        assert report["throughput"][side]["errors"] == 0
    assert report["rss_mib"]["requests"] >= 200
    assert all(_number(v) for v in report["rss_mib"]["after"].values()) and report["rss_mib"]["after"]
    assert _number(report["startup_s"]["service"]) and _number(report["startup_s"]["bare_flask"])
    assert _number(report["startup_s"]["service_first_start"])
    for key in (
        "prefetch_60_p50_vs_floor",
        "triage_p50_vs_floor",
        "prefetch_60_p99_vs_floor_p99",
        "per_resource_10000_vs_300",
        "fallback_vs_prefetch_plus_slowest_query",
        "fallback_vs_prefetch_plus_all_queries",
        "throughput_vs_floor",
        "startup_vs_bare_flask",
        "first_startup_vs_bare_flask",
    ):
        assert _number(report["ratios"][key]), key


def test_padding_reaches_the_target_and_keeps_the_prefetch_keys() -> None:
    prefetch = {
        "patient": {"resourceType": "Patient", "id": "p"},
        "observations": {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": {"resourceType": "Observation", "id": "o1", "effectiveDateTime": "2024-02-29"}}],
        },
    }
    padded, count = padded_prefetch(prefetch, 50, "http://fhir")
    assert count == 50 and set(padded) == set(prefetch)
    entries = padded["observations"]["entry"]
    assert len(entries) == 49 and len({e["resource"]["id"] for e in entries}) == 49
    assert all(e["resource"]["effectiveDateTime"] < "2022" for e in entries[1:])  # moved years back, valid dates
    assert (
        prefetch["observations"]["entry"][0]["resource"]["id"] == "o1" and len(prefetch["observations"]["entry"]) == 1
    )


def test_floor_answer_is_json_of_the_requested_size_and_percentiles_rank() -> None:
    for size in (12, 100, 8009):
        answer = _fixed_answer(size)
        assert len(answer) == size and isinstance(json.loads(answer), dict)
    assert percentiles([5.0, 1.0, 3.0, 2.0, 4.0])["p50"] == 3.0
    assert percentiles([]) == {"n": 0}
