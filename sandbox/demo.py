"""The one-command demo: FHIR server, scenario patients, the real service over HTTP with real JWTs, every story fired.

`ketamine-cds demo` proves on a fresh machine that the whole path works: it starts sekmet (unless a FHIR server
is given), loads every scenario, writes a sandbox client key and a trusted-issuers file, starts the service as a
subprocess, fires each story in prefetch and fallback mode, and prints what came back and how fast.
Child processes are always stopped (try/finally, SIGTERM/SIGHUP turned into KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import FrameType
from typing import IO, TextIO

from sandbox.ehr import DEFAULT_ISSUER, MODES, EhrError, EhrSimulator, FireResult, Mode, check, render_cards
from sandbox.fhir_server import FhirServerProcess, child_preexec, free_port, terminate_process_group
from sandbox.loader import load_into
from sandbox.scenarios import Scenario, lint, load_all
from sandbox.signing import SandboxKey, generate_key, save_key, trusted_issuers_document, write_trusted_issuers

SERVICE_START_TIMEOUT = 60.0
KEY_FILE = "sandbox-key.json"
TRUSTED_ISSUERS_FILE = "trusted-issuers.json"
SHOWCASE_COUNT = 3


@dataclass
class RunRow:
    """One fired hook and its verdict."""

    scenario: Scenario
    result: FireResult
    problems: list[str]

    @property
    def checked(self) -> bool:
        return self.scenario.has_expectations

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass
class Timings:
    """Wall-clock seconds of the demo's phases, for the closing summary."""

    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = time.perf_counter() - started


class Progress:
    """One flushed line per step, so a slow step is visible while it happens."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.started = time.perf_counter()

    def step(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:6.1f}s] {message}", file=self.stream, flush=True)

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)


# ---------------------------------------------------------------------- keys and the service process


def write_sandbox_keys(out_dir: Path, fhir_servers: Sequence[str], issuer: str = DEFAULT_ISSUER) -> SandboxKey:
    """A fresh ES384 client key (`sandbox-key.json`) and the service's `trusted-issuers.json` trusting it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = generate_key("ES384")
    save_key(key, out_dir / KEY_FILE)
    document = trusted_issuers_document(issuer, [key], fhir_servers=list(fhir_servers))
    write_trusted_issuers(out_dir / TRUSTED_ISSUERS_FILE, document)
    return key


SITE_CONFIG = Path(__file__).with_name("site-config.yaml")


class ServiceProcess:
    """The CDS service (`python -m cds_service.cli serve`) as a child process in its own process group."""

    def __init__(
        self, workdir: Path, trusted_issuers: Path, port: int | None = None, site_config: Path | None = SITE_CONFIG
    ) -> None:
        self.workdir = workdir
        self.trusted_issuers = trusted_issuers
        # The sandbox's sample site configuration (credentialed KAP clinic, local codes) when it is shipped.
        self.site_config = site_config if site_config is not None and site_config.is_file() else None
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "service.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cds_service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--public-base-url",
            self.base_url,
            "--trusted-issuers",
            str(self.trusted_issuers),
            "--database",
            f"sqlite:///{self.workdir / 'audit.db'}",
            *(["--site-config", str(self.site_config)] if self.site_config else []),
        ]

    def start(self) -> ServiceProcess:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=child_preexec(),
        )
        return self

    def wait_ready(self, simulator: EhrSimulator, timeout: float = SERVICE_START_TIMEOUT) -> float:
        """Poll discovery until the service lists our hook; seconds waited. EhrError with the log tail otherwise."""
        started = time.perf_counter()
        last_error = "no attempt"
        while time.perf_counter() - started < timeout:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else "?"
                raise EhrError(f"the service exited with code {code} during start-up:\n{self.log_tail()}")
            try:
                simulator.discover()
                return time.perf_counter() - started
            except EhrError as exc:
                last_error = str(exc)
            time.sleep(0.2)
        raise EhrError(f"the service was not ready after {timeout:.0f} s ({last_error}):\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        if self._log is not None:
            with contextlib.suppress(ValueError):
                self._log.flush()
        if not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_bytes()[-chars:].decode("utf-8", errors="replace")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            terminate_process_group(process)
        if self._log is not None:
            self._log.close()
            self._log = None


# ---------------------------------------------------------------------- firing and reporting


def fire_all(
    simulator: EhrSimulator,
    scenarios: Sequence[Scenario],
    *,
    modes: Sequence[Mode] = MODES,
    today: date | None = None,
    on_row: Callable[[RunRow], None] | None = None,
) -> list[RunRow]:
    """Fire every story in each mode, background patients once in prefetch mode; check each answer."""
    rows: list[RunRow] = []
    for scenario in scenarios:
        scenario_modes: Sequence[Mode] = ("prefetch",) if scenario.background else modes
        for mode in scenario_modes:
            result = simulator.fire(scenario, mode, today=today)
            row = RunRow(scenario, result, check(scenario, result))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


class ResultTable:
    """Prints rows as they arrive (the table doubles as progress): scenario · mode · expected · outcome · ms · ✓/✗."""

    def __init__(self, scenarios: Sequence[Scenario], progress: Progress, column_width: int = 46) -> None:
        self.progress = progress
        self.id_width = max([len(scenario.id) for scenario in scenarios] + [8])
        self.column_width = column_width

    def header(self) -> None:
        width = self.column_width
        self.progress.line(
            f"{'scenario':<{self.id_width}}  {'mode':<8}  {'expected':<{width}}  {'outcome':<{width}}  {'ms':>7}  ok"
        )
        self.progress.line("-" * (self.id_width + 2 * width + 28))

    def row(self, row: RunRow) -> None:
        width = self.column_width
        verdict = ("✓" if row.passed else "✗") if row.checked else ("·" if row.passed else "✗")
        self.progress.line(
            f"{row.scenario.id:<{self.id_width}}  {row.result.mode:<8}  "
            f"{_clip(expected_text(row.scenario), width):<{width}}  "
            f"{_clip(row.result.outcome_text(), width):<{width}}  {row.result.latency_ms:7.1f}  {verdict}"
        )


def expected_text(scenario: Scenario) -> str:
    if scenario.expect_no_cards:
        return "no cards"
    if not scenario.expected:
        return "— (background)"
    return "; ".join(expected.describe() for expected in scenario.expected)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: every reported number is a measured one)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latency_summary(rows: Sequence[RunRow]) -> list[str]:
    """p50 / p95 / max per mode and overall, in ms."""
    lines = []
    groups: list[tuple[str, list[float]]] = [
        (mode, [row.result.latency_ms for row in rows if row.result.mode == mode]) for mode in MODES
    ]
    groups.append(("all", [row.result.latency_ms for row in rows]))
    for label, values in groups:
        if values:
            lines.append(
                f"  {label:<8} n={len(values):<4} p50={percentile(values, 0.5):7.1f}  "
                f"p95={percentile(values, 0.95):7.1f}  max={max(values):7.1f}"
            )
    return lines


def pick_showcase(rows: Sequence[RunRow], wanted_ids: Sequence[str] = (), count: int = SHOWCASE_COUNT) -> list[RunRow]:
    """Rows (prefetch mode) whose cards are worth printing: the ids asked for, else one per distinct outcome."""
    prefetch_rows = [row for row in rows if row.result.mode == "prefetch"]
    if wanted_ids:
        return [row for row in prefetch_rows if row.scenario.id in wanted_ids]
    chosen: list[RunRow] = []
    seen_outcomes: set[str] = set()
    stories = [row for row in prefetch_rows if not row.scenario.background and row.result.response]
    for row in stories:
        outcome = row.result.decisions[0].outcome if row.result.decisions else "no cards"
        if outcome not in seen_outcomes and outcome != "no cards":
            chosen.append(row)
            seen_outcomes.add(outcome or "")
        if len(chosen) == count:
            return chosen
    chosen += [row for row in stories if row not in chosen][: count - len(chosen)]
    background = [row for row in prefetch_rows if row.scenario.background and row.result.decisions]
    chosen += background[: count - len(chosen)]  # few stories yet: show what background patients got
    return chosen


# ---------------------------------------------------------------------- the demo


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP raise KeyboardInterrupt so `finally` blocks stop the children; handlers restored after.

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(
    *,
    fhir_server: str | None = None,
    fhir_token: str | None = None,
    scenarios_dir: Path | None = None,
    keep_running: bool = False,
    show: Sequence[str] = (),
    today: date | None = None,
    stream: TextIO | None = None,
) -> int:
    """Run the whole demo; 0 when every expected outcome matched, 1 on mismatches, 2 when the set-up failed."""
    progress = Progress(stream)
    timings = Timings()
    today = today or date.today()
    fhir: FhirServerProcess | None = None
    service: ServiceProcess | None = None
    simulator: EhrSimulator | None = None
    workdir = Path(tempfile.mkdtemp(prefix="ketamine-cds-demo-"))
    try:
        with interrupts_as_keyboard_interrupt():
            scenarios = load_all(scenarios_dir)
            stories = [scenario for scenario in scenarios if not scenario.background]
            background_count = len(scenarios) - len(stories)
            progress.step(f"{len(scenarios)} scenarios read ({len(stories)} stories, {background_count} background)")
            for warning in lint(scenarios):
                progress.step(f"warning: {warning}")

            if fhir_server is None:
                progress.step("starting the FHIR server (sekmet-fhir) ...")
                with timings.measure("FHIR server start"):
                    fhir = FhirServerProcess().start()
                fhir_server, fhir_token = fhir.base_url, fhir.token
                progress.step(f"FHIR server ready at {fhir_server} in {timings.phases['FHIR server start']:.1f} s")
            assert fhir_server is not None

            progress.step(f"loading {len(scenarios)} scenario records (dates shifted to {today.isoformat()}) ...")
            with timings.measure("load"):
                report = load_into(fhir_server, scenarios, token=fhir_token, today=today)
            progress.step(f"loaded {report.summary()}")

            key = write_sandbox_keys(workdir, [fhir_server])
            progress.step(f"sandbox client key and trusted issuers written to {workdir}")

            service = ServiceProcess(workdir, workdir / TRUSTED_ISSUERS_FILE)
            progress.step(f"starting the service at {service.base_url} ...")
            simulator = EhrSimulator(service.base_url, fhir_server, fhir_token=fhir_token, key=key)
            with timings.measure("service start"):
                service.start().wait_ready(simulator)
            progress.step(f"service ready (discovery answered) in {timings.phases['service start']:.1f} s")

            fires = sum(1 if scenario.background else len(MODES) for scenario in scenarios)
            progress.step(f"firing {fires} order-sign hooks ...")
            progress.line()
            table = ResultTable(scenarios, progress)
            table.header()
            with timings.measure("fire"):
                rows = fire_all(simulator, scenarios, today=today, on_row=table.row)
            exit_code = report_results(rows, progress, show)
            phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.phases.items())
            progress.line(f"timings: {phases}")
            progress.step("done")
            if keep_running:
                wait_until_interrupted(progress, fhir_server, fhir_token, service.base_url, workdir)
            return exit_code
    except KeyboardInterrupt:
        progress.step("interrupted; stopping")
        return 130
    except Exception as exc:  # set-up failures: say what broke, with the child's log tail where there is one
        progress.step(f"FAILED: {type(exc).__name__}: {exc}")
        return 2
    finally:
        if simulator is not None:
            simulator.close()
        if service is not None:
            service.stop()
        if fhir is not None:
            fhir.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def report_results(rows: Sequence[RunRow], progress: Progress, show: Sequence[str] = ()) -> int:
    """Mismatch details, showcase cards, latency percentiles, verdict; returns the exit code."""
    failures = [row for row in rows if not row.passed]
    checked = [row for row in rows if row.checked]
    progress.line()
    for row in failures:
        progress.line(f"✗ {row.scenario.id} [{row.result.mode}]")
        for problem in row.problems:
            progress.line(f"    {problem}")
    for row in pick_showcase(rows, show):
        progress.line()
        progress.line(f"=== {row.scenario.id}: {row.scenario.title}")
        progress.line(render_cards(row.result.response))
    progress.line()
    progress.line("latency of the hook call (ms):")
    for line in latency_summary(rows):
        progress.line(line)
    progress.line()
    matched = sum(row.passed for row in checked)
    unchecked = len(rows) - len(checked)
    progress.line(f"{matched}/{len(checked)} expected outcomes matched; {unchecked} unchecked (background)")
    return 0 if not failures else 1


def wait_until_interrupted(
    progress: Progress, fhir_base: str, fhir_token: str | None, service_base: str, workdir: Path
) -> None:
    """Keep everything up for manual exploration; Ctrl-C (or SIGTERM) ends it normally."""
    key_path = workdir / KEY_FILE
    token_option = ""
    if fhir_token:
        token_path = workdir / "fhir-token.txt"
        token_path.touch(mode=0o600)
        token_path.write_text(fhir_token, encoding="utf-8")
        token_option = f' --fhir-token "$(cat {token_path})"'
    progress.line()
    progress.line(f"FHIR server:  {fhir_base}")
    progress.line(f"CDS service:  {service_base}/cds-services")
    progress.line(f"client key:   {key_path}")
    progress.line(
        f"fire one:     ketamine-cds sandbox fire SCENARIO_ID --service {service_base} --fhir-server {fhir_base} "
        f"--key {key_path}{token_option}"
    )
    progress.line("running until Ctrl-C ...")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        progress.step("stopping")
