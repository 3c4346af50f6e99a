"""The README's own-gunicorn recipe, run for real: start-up refusals before the port is bound (one line, exit 2),
KETAMINE_CDS_LOG_LEVEL honoured, JSON call lines, and /metrics summed over two workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.harness import free_port, order_sign_request
from tests.service.test_http import NON_KETAMINE_ORDER
from tests.tools.conftest import SANDBOX_SITE

RECIPE = [sys.executable, "-m", "gunicorn", "-c", "python:cds_service.gunicorn_conf", "cds_service.wsgi:app"]


def _environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    """This process's environment without service settings, plus `variables` (as an operator would set them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KETAMINE_CDS_") or k.endswith("_POSTGRES")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({"KETAMINE_CDS_DATABASE": f"sqlite:///{tmp_path / 'audit.db'}", **variables})
    return env


def _refused(tmp_path: Path, extra: list[str] | None = None, **variables: str) -> list[str]:
    """Run the recipe expecting a refusal; the output lines."""
    metrics_root = tmp_path / "tmp"  # the process's TMPDIR: where its metrics directory would be made
    metrics_root.mkdir(exist_ok=True)
    done = subprocess.run(
        [*RECIPE, *(extra or [])],
        env={**_environment(tmp_path, **variables), "TMPDIR": str(metrics_root)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 2, lines
    assert not list(metrics_root.glob("ketamine-cds-metrics-*")), "the refused start left its metrics directory"
    assert not any("Listening at" in line or "Traceback" in line for line in lines), lines
    return lines


def _plain(lines: list[str]) -> list[str]:
    """Lines that are not JSON log records (gunicorn's 'Starting gunicorn' line is one)."""
    plain = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            plain.append(line)
    return plain


def test_a_broken_mapping_set_is_one_line_before_the_port_is_bound(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SANDBOX_SITE.read_text() + 'no_policy_card: "no"\n')
    port = free_port()
    lines = _refused(
        tmp_path,
        KETAMINE_CDS_INSECURE_NO_AUTH="1",
        KETAMINE_CDS_SITE_CONFIG=str(site),
        KETAMINE_CDS_PORT=str(port),
    )
    (line,) = _plain(lines)
    assert line.startswith("ketamine-cds: not starting: the mapping set is invalid: 1 problem(s): ")
    assert "'no_policy_card' must be true or false" in line


def test_a_misspelt_variable_is_refused_with_the_name_it_meant(tmp_path: Path) -> None:
    lines = _refused(tmp_path, KETAMINE_CDS_INSECURE_NO_AUTH="1", KETAMINE_CDS_DATABSE="sqlite:////srv/a.db")
    assert lines == [
        "ketamine-cds: not starting: unknown environment variable KETAMINE_CDS_DATABSE; "
        "did you mean KETAMINE_CDS_DATABASE?"
    ]
    assert not (tmp_path / "ketamine-cds.db").exists()


def test_a_public_bind_needs_the_public_base_url(tmp_path: Path) -> None:
    issuers = tmp_path / "issuers.json"
    issuers.write_text('{"issuers": []}')
    lines = _refused(tmp_path, ["--bind", f"0.0.0.0:{free_port()}"], KETAMINE_CDS_TRUSTED_ISSUERS=str(issuers))
    (line,) = _plain(lines)
    assert "KETAMINE_CDS_PUBLIC_BASE_URL (--public-base-url) is not set and the service listens on 0.0.0.0:" in line


def test_insecure_no_auth_refuses_a_public_bind(tmp_path: Path) -> None:
    lines = _refused(
        tmp_path,
        ["--bind", f"0.0.0.0:{free_port()}"],
        KETAMINE_CDS_INSECURE_NO_AUTH="1",
        KETAMINE_CDS_PUBLIC_BASE_URL="https://cds.example.org",
    )
    (line,) = _plain(lines)
    assert "--insecure-no-auth refuses to listen on 0.0.0.0:" in line


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path]]]:
    """Start the recipe with extra variables; waits for /readyz; stops it at the end."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(**variables: str) -> tuple[str, Path]:
        port = free_port()
        log = tmp_path / f"gunicorn-{port}.log"
        env = _environment(tmp_path, KETAMINE_CDS_INSECURE_NO_AUTH="1", KETAMINE_CDS_PORT=str(port), **variables)
        with log.open("w") as out:
            process = subprocess.Popen(RECIPE, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        started.append((process, log))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(base + "/readyz", timeout=2).status_code == 200:
                    return base, log
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"gunicorn not ready in 120 s: {log.read_text()[-3000:]}")

    yield start
    for process, _ in started:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck server must not outlive the test
            process.kill()


def test_log_level_is_honoured_under_gunicorn(gunicorn) -> None:
    base, log = gunicorn(KETAMINE_CDS_LOG_LEVEL="WARNING")
    assert requests.post(
        base + "/cds-services/ketamine-prior-auth", json=order_sign_request([NON_KETAMINE_ORDER], patient_id="p1")
    ).ok
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and {r["level"] for r in records} <= {"WARNING", "ERROR", "CRITICAL"}  # no INFO, not even gunicorn's


def _hook_lines(log: Path) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r.get("endpoint", "").endswith("prior-auth")]


def test_metrics_sum_both_workers_and_every_call_is_one_json_line(gunicorn) -> None:
    base, log = gunicorn(KETAMINE_CDS_WORKERS="2", KETAMINE_CDS_THREADS="2")
    calls = 0
    while calls < 12 or (len({r["pid"] for r in _hook_lines(log)}) < 2 and calls < 200):  # until both answered
        order = dict(NON_KETAMINE_ORDER, subject={"reference": f"Patient/pat-{calls}"})
        body = order_sign_request([order], patient_id=f"pat-{calls}")
        headers = {"Connection": "close", "X-Request-ID": f"r{calls}"}
        answer = requests.post(base + "/cds-services/ketamine-prior-auth", json=body, headers=headers)
        assert answer.status_code == 200 and answer.headers["X-Request-ID"] == f"r{calls}", answer.text
        calls += 1
    deadline = time.monotonic() + 10
    while len(_hook_lines(log)) < calls and time.monotonic() < deadline:  # each line is written as its call ends
        time.sleep(0.1)
    lines = _hook_lines(log)
    assert sorted(r["request_id"] for r in lines) == sorted(f"r{n}" for n in range(calls))  # one line per call
    assert len({r["pid"] for r in lines}) == 2
    assert not any("pat-" in json.dumps(r) for r in lines)  # no patient id
    wanted = 'ketamine_cds_calls_total{endpoint="/cds-services/ketamine-prior-auth",outcome="triaged-out",status="200"}'
    for _ in range(6):  # whichever worker answers the scrape, it reports both workers' calls
        text = requests.get(base + "/metrics", headers={"Connection": "close"}).text
        (sample,) = [line for line in text.splitlines() if line.startswith(wanted)]
        assert float(sample.rsplit(" ", 1)[1]) == calls
