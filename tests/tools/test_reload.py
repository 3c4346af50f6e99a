"""Reload without restart: a valid new mapping set replaces the old one, a broken one is refused in one log line
and the old one keeps serving — in process (SIGHUP to this process) and under `ketamine-cds serve` (gunicorn)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from cds_service.app import create_app
from cds_service.config import ServiceConfig
from cds_service.reload import install_sighup
from tests.harness import free_port
from tests.tools.conftest import SANDBOX_SITE

NEW_PAYER = 'payers:\n  mgbhp: {identifiers: [{system: "http://example.org/naic", value: "12345"}]}\n'
BROKEN = 'no_policy_card: "no"\n'


def _wait(condition: Callable[[], bool], seconds: float = 90.0) -> bool:
    """Poll a condition until it holds (bounded: generous for a loaded machine, never a fixed sleep)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(SANDBOX_SITE.read_text())
    return path


@pytest.fixture
def restore_sighup() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


def test_reload_swaps_a_valid_set_and_refuses_a_broken_one(
    site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, restore_sighup: None
) -> None:
    app = create_app(
        ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{tmp_path / 'a.db'}", site_config=str(site))
    )
    reloader = install_sighup(app)
    assert reloader is not None
    client = app.test_client()
    first = client.get("/healthz").get_json()["mappings"]

    site.write_text(site.read_text() + NEW_PAYER)
    assert reloader.reload() is True
    second = client.get("/healthz").get_json()["mappings"]
    assert second != first

    site.write_text(site.read_text() + BROKEN)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="ketamine_cds.reload"):
        assert reloader.reload() is False
    (record,) = [r for r in caplog.records if r.name == "ketamine_cds.reload"]
    message = record.getMessage()
    assert "\n" not in message
    assert f"still serving {second}" in message
    assert f"{site}:" in message and "'no_policy_card' must be true or false" in message
    assert client.get("/healthz").get_json()["mappings"] == second  # the old set keeps serving
    assert client.get("/cds-services").status_code == 200


def test_sighup_reloads_this_process(site: Path, tmp_path: Path, restore_sighup: None) -> None:
    app = create_app(
        ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{tmp_path / 'a.db'}", site_config=str(site))
    )
    install_sighup(app)
    client = app.test_client()
    first = client.get("/healthz").get_json()["mappings"]
    site.write_text(site.read_text() + NEW_PAYER)
    os.kill(os.getpid(), signal.SIGHUP)
    assert _wait(lambda: client.get("/healthz").get_json()["mappings"] != first)


def test_gunicorn_hup_reloads_workers_and_refuses_a_broken_set(site: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    args = [sys.executable, "-m", "cds_service.cli", "serve", "--insecure-no-auth", "--port", str(port)]
    args += [
        "--workers",
        "1",
        "--threads",
        "2",
        "--database",
        f"sqlite:///{tmp_path / 'a.db'}",
        "--site-config",
        str(site),
    ]
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    health = f"http://127.0.0.1:{port}/healthz"

    def version() -> str | None:
        try:
            return requests.get(health, timeout=2).json()["mappings"]
        except (requests.RequestException, ValueError):
            return None

    try:
        assert _wait(lambda: version() is not None), log.read_text()[-2000:]
        first = version()
        site.write_text(site.read_text() + NEW_PAYER)
        process.send_signal(signal.SIGHUP)
        assert _wait(lambda: version() not in (None, first)), log.read_text()[-2000:]
        second = version()
        site.write_text(site.read_text() + BROKEN)
        process.send_signal(signal.SIGHUP)
        assert _wait(lambda: "mapping reload refused" in log.read_text()), log.read_text()[-2000:]
        refused = [line for line in log.read_text().splitlines() if "mapping reload refused" in line]
        assert len(refused) == 1 and "'no_policy_card' must be true or false" in refused[0]
        assert version() == second  # still serving the last good set
        assert process.poll() is None
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck server must not outlive the test
            process.kill()
