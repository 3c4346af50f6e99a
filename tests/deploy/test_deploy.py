"""The container image and the systemd unit: checked statically, and the image built and started where a
container engine can run (podman or docker; skipped, saying why, where none can)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sandbox.signing import generate_key, sign_cds_jwt, trusted_issuers_document, write_trusted_issuers
from tests.harness import free_port, order_sign_request
from tests.service.test_http import NON_KETAMINE_ORDER

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "deploy/Dockerfile"
UNIT = ROOT / "deploy/ketamine-cds.service"
LOCAL_BASE = "localhost/ketamine-cds-base:bookworm"  # deploy/build-base-image.sh, for machines without a registry
REGISTRY_BASE = "python:3.11-slim"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            joined.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined]


def test_dockerfile_is_slim_non_root_with_health_check_and_serve_entry_point() -> None:
    steps = _instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    assert "slim" in args["BASE_IMAGE"] and ("FROM", "${BASE_IMAGE}") in steps
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1] not in {"root", "0"} and users[-1].isdigit()  # numeric: runAsNonRoot can check it
    assert [kind for kind, _ in steps].index("USER") < [kind for kind, _ in steps].index("ENTRYPOINT")
    (health,) = [a for kind, a in steps if kind == "HEALTHCHECK"]
    assert "/healthz" in health and "--interval" in health
    (entry,) = [a for kind, a in steps if kind == "ENTRYPOINT"]
    assert json.loads(entry) == ["ketamine-cds", "serve"]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = {a.split()[0] for kind, a in steps if kind == "COPY"}
    assert {p.rstrip("*") for p in packages["include"]} <= copied  # every package of the distribution is in it


def test_systemd_unit_runs_the_gunicorn_recipe_as_a_service_user() -> None:
    unit = UNIT.read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert shlex.split(settings["ExecStart"])[1:] == ["-c", "python:cds_service.gunicorn_conf", "cds_service.wsgi:app"]
    assert settings["User"] not in {"root", "0"} and settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["RestartPreventExitStatus"] == "2"  # a refused start-up (one line, exit 2) is not restarted
    assert settings["ProtectSystem"] == "strict" and "/var/lib/ketamine-cds" in settings["ReadWritePaths"]
    if shutil.which("systemd-analyze") is None:
        return
    local = UNIT.parent / f".verify-{uuid.uuid4().hex[:8]}.service"  # ExecStart must exist for `verify`
    gunicorn = shutil.which("gunicorn") or str(Path(sys.executable).with_name("gunicorn"))
    local.write_text(unit.replace("/opt/ketamine-cds/bin/gunicorn", gunicorn))
    try:
        verified = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    finally:
        local.unlink()
    assert verified.returncode == 0 and "Unknown" not in verified.stderr, verified.stderr


# --- build and run the image ------------------------------------------------------------------------------

_RUN_FLAGS = [  # what lets an engine run containers: as is, or (podman in a nested sandbox) runc + cgroupfs
    ([], []),
    (
        ["--runtime", shutil.which("runc") or "runc", "--cgroup-manager=cgroupfs"],
        ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"],
    ),
]


def _run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _engine() -> tuple[list[str], list[str], str]:
    """(engine + global flags, run flags, base image) of an engine that can run a container here, else skip."""
    reasons = []
    for name in ("podman", "docker"):
        binary = shutil.which(name)
        if binary is None:
            reasons.append(f"{name}: not installed")
            continue
        base = _base_image(binary)
        if base is None:
            reasons.append(f"{name}: no base image ({REGISTRY_BASE} cannot be pulled, no {LOCAL_BASE})")
            continue
        for global_flags, run_flags in _RUN_FLAGS:
            probe = _run([binary, *global_flags, "run", "--rm", *run_flags, base, "true"])
            if probe.returncode == 0:
                return [binary, *global_flags], run_flags, base
            reasons.append(f"{name} {' '.join(global_flags)}: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    pytest.skip("no container engine can run here: " + "; ".join(reasons))


def _base_image(binary: str) -> str | None:
    for image in (REGISTRY_BASE, LOCAL_BASE):
        if _run([binary, "image", "inspect", image]).returncode == 0:
            return image
    if _run([binary, "pull", "-q", REGISTRY_BASE], timeout=300).returncode == 0:
        return REGISTRY_BASE
    if os.geteuid() == 0 and shutil.which("debootstrap") and Path(binary).name == "podman":
        built = _run(["bash", str(ROOT / "deploy/build-base-image.sh"), LOCAL_BASE], timeout=900)
        if built.returncode == 0:
            return LOCAL_BASE
    return None


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[list[str], list[str], str]]:
    engine, run_flags, base = _engine()
    tag = "localhost/ketamine-cds:test"
    command = [*engine, "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "-t", tag]
    command += ["-f", str(DOCKERFILE), str(ROOT)]
    if Path(engine[0]).name == "podman":
        command[len(engine) + 1 : len(engine) + 1] = ["--format", "docker", *run_flags]  # HEALTHCHECK is Docker's
        ca_bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
        if ca_bundle:  # a network whose TLS is intercepted: pip in the build trusts what pip here trusts
            folder = str(Path(ca_bundle).resolve().parent)
            command[len(engine) + 1 : len(engine) + 1] = [
                "-v",
                f"{folder}:{folder}:ro",
                "--env",
                f"PIP_CERT={ca_bundle}",
            ]
    started = time.monotonic()
    built = _run(command, timeout=1200)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    print(f"image built in {time.monotonic() - started:.0f} s")
    yield engine, run_flags, tag


@pytest.mark.container
def test_the_image_serves_signed_calls_as_a_non_root_user_and_is_healthy(image, tmp_path: Path) -> None:
    engine, run_flags, tag = image
    key = generate_key("ES384")
    config = tmp_path / "config"
    config.mkdir()
    write_trusted_issuers(
        config / "trusted-issuers.json", trusted_issuers_document("https://ehr.test", [key], ["https://ehr.test/fhir"])
    )
    os.chmod(config / "trusted-issuers.json", 0o644)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    name = f"ketamine-cds-test-{uuid.uuid4().hex[:8]}"
    run = [
        *engine,
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        *run_flags,
        "-v",
        f"{config}:/etc/ketamine-cds:ro",
    ]
    for variable, value in {
        "KETAMINE_CDS_PORT": str(port),
        "KETAMINE_CDS_PUBLIC_BASE_URL": base,
        "KETAMINE_CDS_TRUSTED_ISSUERS": "/etc/ketamine-cds/trusted-issuers.json",
    }.items():
        run += ["-e", f"{variable}={value}"]
    started = time.monotonic()
    assert _run([*run, tag]).returncode == 0
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            state = _run([*engine, "inspect", "--format", "{{.State.Running}}", name]).stdout.strip()
            assert state == "true" and time.monotonic() < deadline, _run([*engine, "logs", name]).stderr[-3000:]
            time.sleep(0.3)
        print(f"container ready in {time.monotonic() - started:.1f} s")
        path = "/cds-services/ketamine-prior-auth"
        token = sign_cds_jwt(key, iss="https://ehr.test", aud=base + path)
        answer = requests.post(
            base + path,
            json=order_sign_request([NON_KETAMINE_ORDER], patient_id="p1"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert answer.status_code == 200 and answer.json() == {"cards": [], "systemActions": []}
        assert requests.post(base + path, json={}, timeout=10).status_code == 401  # authentication is on
        assert _run([*engine, "exec", name, "id", "-u"]).stdout.strip() == "10001"
        if Path(engine[0]).name == "podman":
            assert _run([*engine, "healthcheck", "run", name]).returncode == 0  # the image's HEALTHCHECK passes
        logs = _run([*engine, "logs", name])
        records = [json.loads(line) for line in (logs.stdout + logs.stderr).splitlines() if line.startswith("{")]
        assert any(r.get("endpoint") == path and r.get("status") == 200 for r in records)
    finally:
        _run([*engine, "rm", "-f", name])
