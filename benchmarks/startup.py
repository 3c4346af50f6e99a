"""Operations figures: how long the README's gunicorn recipe takes to start (process start → first answered hook
call, and → /readyz 200, i.e. warm), how long its checks before bind take — with the mapping set's clean verdict
remembered (every start after the first on a machine) and without (a fresh cache directory: the first start, or a
changed set) —, how long a refused start takes, and how large and fast a /metrics scrape is.

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
HOOK = "/cds-services/ketamine-prior-auth"


def _env(workdir: Path, cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KETAMINE_CDS_", "PROMETHEUS_"))}
    env.update(KETAMINE_CDS_INSECURE_NO_AUTH="1", KETAMINE_CDS_DATABASE=f"sqlite:///{workdir / 'a.db'}", **extra)
    env["XDG_CACHE_HOME"] = str(cache)  # where the mapping set's clean verdict is remembered
    return env


def _poll(check: object, started: float) -> float:
    """Seconds since `started` until `check()` is true."""
    while True:
        try:
            if check():  # type: ignore[operator]
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.01)


def start_once(workdir: Path, cache: Path) -> tuple[float, float, float, subprocess.Popen[bytes], str]:
    """(start → first answered triage call, start → /readyz 200, checks before bind), the process, its URL."""
    port = free_port()
    log = workdir / f"{port}.log"
    body = order_sign_request([dict(NON_KETAMINE_ORDER, subject={"reference": "Patient/p0"})], patient_id="p0")
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(
            RECIPE, env=_env(workdir, cache, KETAMINE_CDS_PORT=str(port)), cwd=workdir, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    answered = _poll(lambda: requests.post(base + HOOK, json=body, timeout=5).status_code == 200, started)
    ready = _poll(lambda: requests.get(base + "/readyz", timeout=5).status_code == 200, started)
    checks = next(
        float(r["message"].split(" in ")[1].split()[0])
        for r in map(json.loads, log.read_text().splitlines())
        if r["message"].startswith("start-up checks passed")
    )
    return answered, ready, checks, process, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        process, base = None, ""
        for remembered in (False, True):
            answers, readies, checks = [], [], []
            for run in range(args.runs):
                cache = workdir / ("cache" if remembered else f"cold-{run}")  # cold: a fresh, empty cache each run
                if remembered and run == 0:
                    start_once(workdir, cache)[3].terminate()  # the first start on this machine remembers it
                answered, ready, check, process, base = start_once(workdir, cache)
                answers.append(answered)
                readies.append(ready)
                checks.append(check)
                if not (remembered and run == args.runs - 1):
                    process.terminate()
                    process.wait(30)
            which = "clean verdict remembered" if remembered else "nothing remembered (first start, changed set)"
            print(f"{which}, 2 workers, median of {args.runs}:")
            print(f"  start → first answer (triage call) {statistics.median(answers):.2f} s")
            print(f"  start → /readyz 200 (workers warm) {statistics.median(readies):.2f} s")
            print(f"  checks before bind (mappings, issuers, audit store) {statistics.median(checks):.2f} s")
        assert process is not None
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
            RECIPE,
            env=_env(workdir, workdir / "cache", KETAMINE_CDS_SITE_CONFIG=str(site)),
            cwd=workdir,
            capture_output=True,
            text=True,
        )
        print(
            f"broken mapping set refused in {time.monotonic() - t:.1f} s, exit {refused.returncode}, "
            f"{len(refused.stderr.splitlines())} line(s) on stderr"
        )


if __name__ == "__main__":
    main()
