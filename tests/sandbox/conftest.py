"""Shared fixtures for the sandbox tests: scenario builders and one real FHIR server per test module."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.fhir_server import FhirServerProcess


@pytest.fixture
def write_scenario(tmp_path: Path) -> Callable[..., Path]:
    """Write scenario JSON into tmp_path (or its background/ folder) under `<id>.json`; returns the path."""

    def write(data: dict[str, Any], *, background: bool = False, name: str | None = None) -> Path:
        folder = tmp_path / "background" if background else tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name or data['id']}.json"
        path.write_text(json.dumps(copy.deepcopy(data)), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="module")
def fhir_server() -> Iterator[FhirServerProcess]:
    """One sekmet server per test module: start-up costs about a second, so tests share it."""
    server = FhirServerProcess().start()
    try:
        yield server
    finally:
        server.stop()
