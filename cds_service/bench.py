"""`ketamine-cds bench [--quick]`: the service's latency, throughput, memory and start-up against its floor.

Starts sekmet-fhir with every sandbox scenario and the service through `ketamine-cds serve` (its production
gunicorn configuration) on loopback, with the bench-only floor endpoint (`cds_service/bench_floor.py`) in the same
workers: the same stack receiving the same body and answering a fixed document of the same size. Every case is
measured in the same run, interleaved round-robin with its floor, and one JSON document is printed on stdout
(progress on stderr). No timing is asserted anywhere: CI runs `--quick` only to keep the benchmark working.

Records: the sandbox story `mgb-031-reauthorization-improved` (~60 resources, its prefetch built from the advertised
templates by the EHR simulator), padded with copies of its own clinical resources moved years back, to ~300,
~1,000 and ~10,000 resources.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import requests

from cds_service.bench_floor import FLOOR_ENV, FLOOR_PATH

STORY = "mgb-031-reauthorization-improved"
# Types copied (moved back in time) to pad a record: the bulk of a real chart.
PAD_TYPES = ("Observation", "Encounter", "Condition", "Procedure", "MedicationStatement", "MedicationRequest")
TRIAGE_ORDER = {
    "resourceType": "MedicationRequest",
    "id": "bench-amoxicillin",
    "status": "draft",
    "intent": "order",
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "308182"}]
    },
}


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float | int]:
    """p50/p95/p99 (nearest rank) and the count, in milliseconds."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "p50": round(rank(50), 2),
        "p95": round(rank(95), 2),
        "p99": round(rank(99), 2),
        "mean": round(statistics.fmean(ordered), 2),
    }


@dataclass
class Case:
    """One request body measured against the service and, with the same body, against the floor."""

    name: str
    body: dict[str, Any]
    every: int = 1  # measured on every `every`-th round (large records cost seconds)
    resources: int = 0
    raw: bytes = b""
    answer_size: int = 64
    times: list[float] = field(default_factory=list)
    floor_times: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)  # fallback: the rendered templates, timed one by one
    slowest_query: list[float] = field(default_factory=list)
    all_queries: list[float] = field(default_factory=list)  # the same queries one after the other (the server's work)

    def __post_init__(self) -> None:
        self.raw = json.dumps(self.body, separators=(",", ":")).encode()

    def fresh_body(self) -> bytes:
        """The same body with a new hookInstance (same length: a UUID replaces a UUID)."""
        old = self.body["hookInstance"].encode()
        return self.raw.replace(old, str(uuid.uuid4()).encode(), 1)


# ---------------------------------------------------------------------- records


def _shift_years(node: Any, years: int) -> Any:
    """A copy with every FHIR date moved `years` back (so padding lands outside the policies' windows)."""
    if isinstance(node, dict):
        return {key: _shift_years(value, years) for key, value in node.items()}
    if isinstance(node, list):
        return [_shift_years(value, years) for value in node]
    if isinstance(node, str) and len(node) >= 4 and node[:4].isdigit() and (len(node) == 4 or node[4] == "-"):
        year = int(node[:4]) - years
        rest = node[4:]
        if rest[:6] == "-02-29":
            rest = "-02-28" + rest[6:]
        return f"{year:04d}{rest}"
    return node


def padded_prefetch(prefetch: dict[str, Any], target: int, fhir_base: str) -> tuple[dict[str, Any], int]:
    """The prefetch with copies of its clinical resources added until it holds about `target` resources."""
    result = copy.deepcopy(prefetch)
    bundles = {key: value for key, value in result.items() if isinstance(value, dict) and "entry" in value}
    count = sum(len(b["entry"]) for b in bundles.values()) + sum(
        1 for v in result.values() if isinstance(v, dict) and "entry" not in v
    )
    templates = [
        (key, entry["resource"])
        for key, bundle in bundles.items()
        for entry in bundle["entry"]
        if entry.get("resource", {}).get("resourceType") in PAD_TYPES
        and entry.get("search", {}).get("mode") != "include"
    ]
    copies = 0
    while count < target and templates:
        for key, resource in templates:
            if count >= target:
                break
            copies += 1
            clone = _shift_years(resource, 3 + copies % 17)
            clone["id"] = f"{resource['id'][:40]}-pad{copies}"
            rtype = clone["resourceType"]
            bundles[key]["entry"].append({"fullUrl": f"{fhir_base}/{rtype}/{clone['id']}", "resource": clone})
            count += 1
    for bundle in bundles.values():
        if "total" in bundle:
            bundle["total"] = len(bundle["entry"])
    return result, count


def _count_resources(prefetch: dict[str, Any]) -> int:
    return sum(
        len(v.get("entry", [])) if v.get("resourceType") == "Bundle" else 1
        for v in prefetch.values()
        if isinstance(v, dict)
    )


def complete_pages(session: requests.Session, prefetch: dict[str, Any], patient_id: str) -> None:
    """Play a conformant EHR on top of sekmet, in place: every page of each search in one Bundle, and only the
    patient's resources (sekmet ignores `patient` on some searches, e.g. CareTeam, and answers everyone's, paged)."""
    for value in prefetch.values():
        if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
            continue
        entries = value.get("entry", [])
        link = next((lk["url"] for lk in value.get("link", []) if lk.get("relation") == "next"), None)
        while link:
            page = session.get(link, timeout=30).json()
            entries.extend(page.get("entry", []))
            link = next((lk["url"] for lk in page.get("link", []) if lk.get("relation") == "next"), None)
        value["link"] = [lk for lk in value.get("link", []) if lk.get("relation") != "next"]
        value["entry"] = [e for e in entries if not _other_patient(e.get("resource", {}), patient_id)]


def _other_patient(resource: dict[str, Any], patient_id: str) -> bool:
    for element in ("subject", "patient", "beneficiary"):
        reference = resource.get(element, {}).get("reference") if isinstance(resource.get(element), dict) else None
        if isinstance(reference, str) and reference.startswith("Patient/"):
            return reference != f"Patient/{patient_id}"
    return False


# ---------------------------------------------------------------------- processes


def _worker_pids(master: int) -> list[int]:
    """gunicorn worker processes: the children of the arbiter (`ketamine-cds serve` runs it in-process)."""
    try:
        text = Path(f"/proc/{master}/task/{master}/children").read_text()
    except OSError:
        return []
    return [int(pid) for pid in text.split()]


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _bare_flask_startup(workdir: Path, workers: int, threads: int, timeout: float = 60.0) -> float:
    """Seconds from exec to the first answered request of the bare floor app under gunicorn (same worker model)."""
    from sandbox.fhir_server import child_preexec, free_port, terminate_process_group

    port = free_port()
    started = time.perf_counter()
    log = (workdir / "bare-flask.log").open("wb")
    command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread"]
    command += ["--workers", str(workers), "--threads", str(threads), "cds_service.bench_floor:app"]
    process = subprocess.Popen(
        command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=child_preexec()
    )
    try:
        return _first_answer(f"http://127.0.0.1:{port}{FLOOR_PATH}", b"{}", {}, started, timeout, process)
    finally:
        terminate_process_group(process)
        log.close()


def _first_answer(
    url: str,
    body: bytes,
    headers: dict[str, str] | Callable[[], dict[str, str]],
    started: float,
    timeout: float,
    process: subprocess.Popen[bytes] | None,
) -> float:
    """Poll until `url` answers 200; seconds since `started`."""
    while time.perf_counter() - started < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} during start-up")
        try:
            extra = headers() if callable(headers) else headers
            response = requests.post(url, data=body, headers={"Content-Type": "application/json", **extra}, timeout=5)
            if response.status_code == 200:
                return time.perf_counter() - started
        except requests.RequestException:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


# ---------------------------------------------------------------------- the run


@dataclass
class Settings:
    rounds: int
    throughput_seconds: float
    rss_requests: int
    concurrency: int
    large: int


QUICK = Settings(rounds=3, throughput_seconds=1.5, rss_requests=200, concurrency=8, large=10_000)
FULL = Settings(rounds=60, throughput_seconds=20.0, rss_requests=10_000, concurrency=8, large=10_000)


class Bench:
    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.result: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        from sandbox.demo import ServiceProcess, write_sandbox_keys
        from sandbox.ehr import EhrSimulator
        from sandbox.fhir_server import FhirServerProcess
        from sandbox.loader import load_into
        from sandbox.scenarios import find_scenario, load_all

        began = time.perf_counter()
        load_before = os.getloadavg()
        scenarios = load_all(include_background=True)
        story = find_scenario(STORY, scenarios)
        today = date.today()
        with FhirServerProcess() as fhir:
            load_into(fhir.base_url, scenarios, token=fhir.token, today=today)
            _log(f"loaded {len(scenarios)} scenarios into sekmet-fhir")
            self.key = write_sandbox_keys(self.workdir, [fhir.base_url])
            os.environ[FLOOR_ENV] = "1"
            # A cache of this run for remembered mapping verdicts: the first start validates everything (a new
            # machine or changed mappings), the second remembers it (every restart after).
            cache_before = os.environ.get("XDG_CACHE_HOME")
            os.environ["XDG_CACHE_HOME"] = str(self.workdir / "cache")
            first_start = self._first_start(story, fhir)
            service = ServiceProcess(self.workdir, self.workdir / "trusted-issuers.json")
            try:
                started = time.perf_counter()
                service.start()
                self.simulator = EhrSimulator(service.base_url, fhir.base_url, fhir_token=fhir.token, key=self.key)
                self.service = service
                first = self._startup_body(story)
                startup = _first_answer(self.simulator.hook_url, first, self._auth, started, 120, service.process)
                _log(f"service answered its first request {startup:.2f} s after start (verdict remembered)")
                cases = self._cases(story, today, fhir.base_url)
                bare = _bare_flask_startup(self.workdir, workers=2, threads=8)
                self.result["startup_s"] = {
                    "service": round(startup, 3),
                    "service_first_start": round(first_start, 3),
                    "bare_flask": round(bare, 3),
                }
                self._warm_up(cases)
                self._latency(cases)
                # After the large records have been through both workers: growth from here is what leaks.
                rss_before = self._rss()
                requests_before = self.requests_sent
                self._throughput(next(c for c in cases if c.name == "prefetch_60"))
                self._top_up(cases, requests_before)
                rss_after = self._rss()
                self.result["rss_mib"] = {
                    "requests": self.requests_sent - requests_before,
                    "before": rss_before,
                    "after": rss_after,
                    "max_growth_pct": _max_growth(rss_before, rss_after),
                }
            finally:
                os.environ.pop(FLOOR_ENV, None)
                if cache_before is None:
                    os.environ.pop("XDG_CACHE_HOME", None)
                else:
                    os.environ["XDG_CACHE_HOME"] = cache_before
                service.stop()
                self.simulator.close() if hasattr(self, "simulator") else None
        self.result["cases"] = {c.name: self._case_report(c) for c in cases}
        self.result["ratios"] = self._ratios(cases)
        self.result["machine"] = {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.perf_counter() - began, 1),
        }
        return self.result

    def _first_start(self, story: Any, fhir: Any) -> float:
        """Seconds from exec to the first answer of a service that has never validated these mappings."""
        from sandbox.demo import ServiceProcess
        from sandbox.ehr import EhrSimulator

        service = ServiceProcess(self.workdir, self.workdir / "trusted-issuers.json")
        try:
            started = time.perf_counter()
            service.start()
            self.simulator = EhrSimulator(service.base_url, fhir.base_url, fhir_token=fhir.token, key=self.key)
            body = self._startup_body(story)
            seconds = _first_answer(self.simulator.hook_url, body, self._auth, started, 120, service.process)
        finally:
            service.stop()
            self.simulator.close()
        _log(f"first start (nothing remembered): first answer {seconds:.2f} s after start")
        return seconds

    # -- requests

    requests_sent = 0

    def _auth(self) -> dict[str, str]:
        from sandbox.ehr import DEFAULT_ISSUER
        from sandbox.signing import sign_cds_jwt

        return {"Authorization": f"Bearer {sign_cds_jwt(self.key, iss=DEFAULT_ISSUER, aud=self.simulator.hook_url)}"}

    def _post(self, session: requests.Session, url: str, body: bytes) -> tuple[int, float, int]:
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self._auth()}
        started = time.perf_counter()
        try:
            response = session.post(url, data=body, headers=headers, timeout=60)
            status, size = response.status_code, len(response.content)
        except requests.RequestException:
            status, size = 0, 0
        elapsed = (time.perf_counter() - started) * 1000
        self.requests_sent += 1
        return status, elapsed, size

    def _floor_url(self, case: Case) -> str:
        return f"{self.service.base_url}{FLOOR_PATH}?size={case.answer_size}"

    @staticmethod
    def _startup_body(story: Any) -> bytes:
        """A triage-only call without prefetch: built before the service can answer discovery."""
        order = {**TRIAGE_ORDER, "subject": {"reference": f"Patient/{story.patient_id}"}}
        order["requester"] = {"reference": story.user_id}
        body = {
            "hook": "order-sign",
            "hookInstance": str(uuid.uuid4()),
            "context": {
                "userId": story.user_id,
                "patientId": story.patient_id,
                "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
            },
        }
        return json.dumps(body).encode()

    def _cases(self, story: Any, today: date, fhir_base: str) -> list[Case]:
        body = self.simulator.build_request(story, mode="prefetch", today=today)
        prefetch = body["prefetch"]
        complete_pages(self.simulator._fhir, prefetch, story.patient_id)
        fallback = self.simulator.build_request(story, mode="fallback", today=today)
        triage = copy.deepcopy(body)
        order = {**TRIAGE_ORDER, "subject": {"reference": f"Patient/{story.patient_id}"}}
        order["requester"] = {"reference": story.user_id}
        triage["context"]["draftOrders"]["entry"] = [{"resource": order}]
        cases = [
            Case("triage", triage, resources=_count_resources(prefetch)),
            Case("prefetch_60", body, resources=_count_resources(prefetch)),
        ]
        for name, target, every in (("prefetch_300", 300, 1), ("synthea_1000", 1000, 2), ("large_10000", 0, 6)):
            target = target or self.settings.large
            padded, count = padded_prefetch(prefetch, target, fhir_base)
            case_body = {**copy.deepcopy(body), "prefetch": padded}
            cases.append(Case(name, case_body, every=1 if self.settings.rounds <= 3 else every, resources=count))
        from sandbox.ehr import resolve_template

        fallback_case = Case("fallback", fallback, resources=_count_resources(prefetch))
        templates = self.simulator.prefetch_templates()
        fallback_case.queries = [q for q in (resolve_template(t, fallback["context"]) for t in templates.values()) if q]
        cases.append(fallback_case)
        for case in cases:
            _log(f"case {case.name}: {case.resources} resources, body {len(case.raw) / 1024:.0f} KiB")
        return cases

    def _warm_up(self, cases: list[Case]) -> None:
        """One call of each case (the answer size for the floor), then every case from `concurrency` connections at
        once, twice, so that every worker has served every case (a keep-alive client sticks to one worker)."""
        session = requests.Session()
        for case in cases:
            status, _, size = self._post(session, self.simulator.hook_url, case.fresh_body())
            case.answer_size = size or 64
            _log(f"warm-up {case.name}: HTTP {status}, answer {size} bytes")

        def client() -> None:
            own = requests.Session()
            for case in cases * (2 if self.settings.rounds > QUICK.rounds else 1):
                self._post(own, self.simulator.hook_url, case.fresh_body())

        threads = [threading.Thread(target=client) for _ in range(self.settings.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _latency(self, cases: list[Case]) -> None:
        """Round-robin: each round fires every due case once at the service and once at the floor."""
        session = requests.Session()
        fhir = self.simulator._fhir
        for round_index in range(self.settings.rounds):
            for case in cases:
                if round_index % case.every:
                    continue
                body = case.fresh_body()
                status, elapsed, _ = self._post(session, self.simulator.hook_url, body)
                case.times.append(elapsed)
                case.statuses[status] = case.statuses.get(status, 0) + 1
                _, floor_elapsed, _ = self._post(session, self._floor_url(case), body)
                case.floor_times.append(floor_elapsed)
                if case.queries:
                    slowest = total = 0.0
                    for query in case.queries:
                        started = time.perf_counter()
                        fhir.get(f"{self.simulator.fhir_base}/{query}", timeout=30)
                        elapsed = (time.perf_counter() - started) * 1000
                        slowest, total = max(slowest, elapsed), total + elapsed
                    case.slowest_query.append(slowest)
                    case.all_queries.append(total)
            if round_index % 10 == 0:
                _log(f"latency round {round_index + 1}/{self.settings.rounds}")

    def _hammer(self, url: Callable[[], str], body: Callable[[], bytes], seconds: float) -> dict[str, Any]:
        """`concurrency` clients posting back to back for `seconds`: answers per second and errors."""
        stop = time.monotonic() + seconds
        counts = {"ok": 0, "errors": 0}
        lock = threading.Lock()

        def client() -> None:
            session = requests.Session()
            while time.monotonic() < stop:
                status, _, _ = self._post(session, url(), body())
                with lock:
                    counts["ok" if status == 200 else "errors"] += 1

        threads = [threading.Thread(target=client) for _ in range(self.settings.concurrency)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        return {"req_per_s": round(counts["ok"] / elapsed, 1), "errors": counts["errors"], "seconds": round(elapsed, 1)}

    def _throughput(self, case: Case) -> None:
        seconds = self.settings.throughput_seconds
        _log(f"throughput: {self.settings.concurrency} clients, {seconds:.0f} s on the service, then on the floor")
        service = self._hammer(lambda: self.simulator.hook_url, case.fresh_body, seconds)
        floor = self._hammer(lambda: self._floor_url(case), case.fresh_body, seconds)
        self.result["throughput"] = {
            "case": case.name,
            "concurrency": self.settings.concurrency,
            "service": service,
            "floor": floor,
        }

    def _top_up(self, cases: list[Case], requests_before: int) -> None:
        """More calls (prefetch and triage, 8 clients) until `rss_requests` reached the service since warm-up."""
        remaining = self.settings.rss_requests - (self.requests_sent - requests_before)
        if remaining <= 0:
            return
        _log(f"RSS: {remaining} more requests")
        mix = [c for c in cases if c.name in ("triage", "prefetch_60", "prefetch_300")]
        counter = iter(range(10**9))
        lock = threading.Lock()

        def client() -> None:
            session = requests.Session()
            while True:
                with lock:
                    n = next(counter)
                if n >= remaining:
                    return
                self._post(session, self.simulator.hook_url, mix[n % len(mix)].fresh_body())

        threads = [threading.Thread(target=client) for _ in range(self.settings.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _rss(self) -> dict[str, float | None]:
        master = self.service.process.pid if self.service.process else 0
        return {str(n): _rss_mib(pid) for n, pid in enumerate(sorted(_worker_pids(master)))}

    # -- report

    @staticmethod
    def _case_report(case: Case) -> dict[str, Any]:
        report: dict[str, Any] = {
            "resources": case.resources,
            "body_kib": round(len(case.raw) / 1024, 1),
            "answer_bytes": case.answer_size,
            "statuses": {str(k): v for k, v in sorted(case.statuses.items())},
            "service_ms": percentiles(case.times),
            "floor_ms": percentiles(case.floor_times),
        }
        if case.slowest_query:
            report["slowest_single_query_ms"] = percentiles(case.slowest_query)
            report["all_queries_one_by_one_ms"] = percentiles(case.all_queries)
        return report

    def _ratios(self, cases: list[Case]) -> dict[str, Any]:
        by_name = {c.name: c for c in cases}

        def p(values: list[float], q: int) -> float:
            return float(percentiles(values).get(f"p{q}", float("nan")))

        def ratio(a: float, b: float) -> float | None:
            return round(a / b, 2) if b and a == a and b == b else None

        ratios: dict[str, Any] = {}
        for case in cases:
            ratios[f"{case.name}_p50_vs_floor"] = ratio(p(case.times, 50), p(case.floor_times, 50))
            ratios[f"{case.name}_p99_vs_floor_p99"] = ratio(p(case.times, 99), p(case.floor_times, 99))

        def per_resource(name: str) -> float | None:
            case = by_name[name]
            return round(p(case.times, 50) / case.resources, 4) if case.resources else None

        ratios["per_resource_ms_300"] = per_resource("prefetch_300")
        ratios["per_resource_ms_10000"] = per_resource("large_10000")
        ratios["per_resource_10000_vs_300"] = ratio(
            ratios["per_resource_ms_10000"] or float("nan"), ratios["per_resource_ms_300"] or float("nan")
        )
        ratios["large_10000_status"] = by_name["large_10000"].statuses
        full, fallback = by_name["prefetch_60"], by_name["fallback"]
        ratios["fallback_vs_prefetch_plus_slowest_query"] = ratio(
            p(fallback.times, 50), p(full.times, 50) + p(fallback.slowest_query, 50)
        )
        # The same against a server that answers one query at a time (sekmet): every query's time is then spent.
        ratios["fallback_vs_prefetch_plus_all_queries"] = ratio(
            p(fallback.times, 50), p(full.times, 50) + p(fallback.all_queries, 50)
        )
        throughput = self.result.get("throughput", {})
        if throughput:
            ratios["throughput_vs_floor"] = ratio(throughput["service"]["req_per_s"], throughput["floor"]["req_per_s"])
        startup = self.result.get("startup_s", {})
        if startup:
            ratios["startup_vs_bare_flask"] = ratio(startup["service"], startup["bare_flask"])
            ratios["first_startup_vs_bare_flask"] = ratio(startup["service_first_start"], startup["bare_flask"])
        return ratios


def _max_growth(before: dict[str, float | None], after: dict[str, float | None]) -> float | None:
    growths = [
        (after[k] - b) / b * 100 for k, b in before.items() if b and after.get(k) is not None and after[k] is not None
    ]
    return round(max(growths), 1) if growths else None


def run_bench(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    """Run the whole benchmark and return its JSON-ready report."""
    settings = QUICK if quick else FULL
    if rounds is not None:
        settings = Settings(rounds, settings.throughput_seconds, settings.rss_requests, settings.concurrency, 10_000)
    with tempfile.TemporaryDirectory(prefix="ketamine-cds-bench-") as workdir:
        report = Bench(settings, Path(workdir)).run()
    report["mode"] = "quick" if quick else "full"
    return report


def _bench_command(args: argparse.Namespace) -> int:
    report = run_bench(quick=args.quick, rounds=args.rounds)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def register(sub: Any) -> None:
    """Add `ketamine-cds bench` to the console's subcommands."""
    bench = sub.add_parser("bench", help="latency, throughput, memory and start-up against the floor (JSON)")
    bench.add_argument("--quick", action="store_true", help="a few seconds: keeps the benchmark working in CI")
    bench.add_argument("--rounds", type=int, default=None, help="latency rounds (default 60; quick 3)")
    bench.add_argument("--out", default=None, help="also write the JSON document to this file")
    bench.set_defaults(func=_bench_command)
