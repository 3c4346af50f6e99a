"""Operations figures: how long the README's gunicorn recipe takes to start (process start → /readyz 200), how long
its checks before bind take, how long a refused start takes, and how large and fast a /metrics scrape is.

    python benchmarks/startup.py [--runs 3] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parents[1]))
from tests.harness import free_port, order_sign_request
from tests.service.test_http import NON_KETAMINE_ORDER

RECIPE = [sys.executable, "-m", "gunicorn", "-c", "python:cds_service.gunicorn_conf", "cds_service.wsgi:app"]


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KETAMINE_CDS_", "PROMETHEUS_"))}
    env.update(KETAMINE_CDS_INSECURE_NO_AUTH="1", KETAMINE_CDS_DATABASE=f"sqlite:///{workdir / 'a.db'}", **extra)
    return env


def start_once(workdir: Path) -> tuple[float, float, subprocess.Popen[bytes], str]:
    port = free_port()
    log = workdir / f"{port}.log"
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(
            RECIPE, env=_env(workdir, KETAMINE_CDS_PORT=str(port)), cwd=workdir, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if requests.get(base + "/readyz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.05)
    ready = time.monotonic() - started
    checks = next(
        float(r["message"].split(" in ")[1].split()[0])
        for r in map(json.loads, log.read_text().splitlines())
        if r["message"].startswith("start-up checks passed")
    )
    return ready, checks, process, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        readies, checks = [], []
        for run in range(args.runs):
            ready, check, process, base = start_once(workdir)
            readies.append(ready)
            checks.append(check)
            if run < args.runs - 1:
                process.terminate()
                process.wait(30)
        print(f"start → /readyz 200 (2 workers): median {statistics.median(readies):.1f} s over {args.runs} runs")
        print(f"checks before bind (mappings, issuers, audit store): median {statistics.median(checks):.2f} s")
        try:
            for n in range(args.calls):
                order = dict(NON_KETAMINE_ORDER, subject={"reference": f"Patient/p{n}"})
                requests.post(
                    base + "/cds-services/ketamine-prior-auth", json=order_sign_request([order], patient_id=f"p{n}")
                )
            times, size = [], 0
            for _ in range(20):
                t = time.perf_counter()
                size = len(requests.get(base + "/metrics").content)
                times.append(time.perf_counter() - t)
            print(
                f"/metrics after {args.calls} calls: {size:,} bytes, "
                f"scrape median {statistics.median(times) * 1000:.1f} ms"
            )
        finally:
            process.terminate()
            process.wait(30)
        site = workdir / "broken.yaml"
        site.write_text('no_policy_card: "no"\n')
        t = time.monotonic()
        refused = subprocess.run(
            RECIPE, env=_env(workdir, KETAMINE_CDS_SITE_CONFIG=str(site)), cwd=workdir, capture_output=True, text=True
        )
        print(
            f"broken mapping set refused in {time.monotonic() - t:.1f} s, exit {refused.returncode}, "
            f"{len(refused.stderr.splitlines())} line(s) on stderr"
        )


if __name__ == "__main__":
    main()
