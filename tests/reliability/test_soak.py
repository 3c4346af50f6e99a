"""The soak in a few seconds (the full one is `python benchmarks/soak.py`): gunicorn with 2 workers, mixed
requests from concurrent clients. Invariants only, never timings: no errors, one audit row per answered call,
feedback stored once; and SIGKILL mid-load leaves an SQLite file that passes its integrity check with every
feedback item that was acknowledged."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.fhir_server  # starts server processes (gunicorn)

SOAK = Path(__file__).parents[2] / "benchmarks" / "soak.py"


def _soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ketamine_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


soak = _soak_module()


def _check(result: soak.SoakResult) -> None:
    assert result.total > 20, "the load did not run"
    assert not result.errors, result.errors
    assert not result.unexpected, result.unexpected
    assert set(result.by_kind) == set(soak.KINDS)
    assert result.rows.get("hook") == result.answered["hook"]
    assert result.rows.get("feedback") == result.answered["feedback"]
    assert result.feedback_rows == len(result.feedback_items)  # each item sent twice, stored once


@pytest.mark.postgres
def test_soak_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    result = soak.soak(tmp_path, seconds=4, concurrency=4, database=postgres_url)
    print("\n" + result.report("soak (test-sized, PostgreSQL)"))
    _check(result)


def test_sigkill_during_load_leaves_a_sound_sqlite_store(tmp_path: Path) -> None:
    result = soak.kill_during_load(tmp_path, seconds=3, concurrency=4)
    print("\n" + result.report("SIGKILL during load (test-sized)"))
    assert result.total > 20
    assert result.integrity == "ok"
    assert result.missing_feedback == 0
    assert result.feedback_acknowledged, "no feedback was acknowledged before the kill"
    assert result.rows.get("hook", 0) <= result.answered["hook"]
