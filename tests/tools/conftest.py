"""Shared helpers for the informaticist tools' tests: copies of the shipped mapping set to break on purpose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cds_service.cli import main
from fhir_mappings.mappings import MAPPINGS_DIR

REPO = MAPPINGS_DIR.parent
SANDBOX_SITE = REPO / "sandbox" / "site-config.yaml"
STORIES = REPO / "sandbox" / "patients"


def copy_mappings(target: Path, *, with_cases: bool = False) -> Path:
    """A copy of the shipped mappings with the same layout (fixture cases only when asked: they are large)."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(MAPPINGS_DIR / "valuesets", target / "valuesets")
    ignore = None if with_cases else shutil.ignore_patterns("*.cases", "*.py")
    shutil.copytree(MAPPINGS_DIR / "policies", target / "policies", ignore=ignore)
    for name in ("facts.yaml", "queries.yaml", "routing.yaml"):
        shutil.copy(MAPPINGS_DIR / name, target / name)
    return target


def replace_once(path: Path, old: str, new: str, occurrence: int = 1) -> int:
    """Replace the n-th occurrence of `old`; returns the 1-based line where the replacement starts."""
    text = path.read_text(encoding="utf-8")
    start = -1
    for _ in range(occurrence):
        start = text.index(old, start + 1)
    path.write_text(text[:start] + new + text[start + len(old) :], encoding="utf-8")
    return text[:start].count("\n") + 1


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, object]:
    code, out, err = run_cli(capsys, *args)
    try:
        return code, json.loads(out)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"not JSON (exit {code}): {out[:400]!r} / stderr {err[:400]!r}") from exc
