"""A real FHIR R4 server process (sekmet-fhir) on loopback, for the demo and integration tests.

The server runs as a child process in its own process group with a throw-away data directory, so a sandbox
run never touches anything persistent and `stop()` can take down everything it started. Only the start-up
settings are sekmet-specific; everything that talks to the server afterwards is plain FHIR REST.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

import requests
import yaml

LOOPBACK = "127.0.0.1"
DEFAULT_START_TIMEOUT = 30.0
_LOG_TAIL_CHARS = 3000
_PR_SET_PDEATHSIG = 1
_PORT_ATTEMPTS = 3


class FhirServerError(RuntimeError):
    """The FHIR server could not be started; the message carries the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def fhir_session(base_url: str, token: str | None) -> requests.Session:
    """A pooled session that speaks FHIR JSON to `base_url` with the bearer token (if any) on every call."""
    session = requests.Session()
    session.headers.update({"Accept": "application/fhir+json"})
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def sekmet_command() -> list[str]:
    """How to run sekmet's CLI with the current interpreter's installation (script next to python preferred)."""
    script = Path(sys.executable).parent / "sekmet"
    if script.exists():
        return [str(script)]
    try:
        import sekmet.cli  # noqa: F401  (only checks that the package is importable)
    except ImportError as exc:
        raise FhirServerError(
            "sekmet-fhir is not installed in this environment; install the sandbox extra: pip install -e '.[sandbox]'"
        ) from exc
    return [sys.executable, "-c", "from sekmet.cli import app; app()"]


def terminate_process_group(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop a child started with `start_new_session=True`: SIGTERM its group, wait, SIGKILL what is left."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=timeout)
    _signal_group(process, signal.SIGKILL)  # stragglers the leader left in its group, if any


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def child_preexec() -> Callable[[], None] | None:
    """`preexec_fn` for sandbox children: on Linux, die with the parent thread; elsewhere nothing."""
    return _die_with_parent if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM us if the parent dies without cleaning up (no orphans)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class FhirServerProcess:
    """A sekmet FHIR server on a free loopback port with a fresh temp data dir and a random bearer token.

    `open_access=True` drops the token: every request is answered without authentication, as the CDS Hooks sandbox
    web app needs (it only talks to open FHIR servers). The server binds 127.0.0.1 in both modes, so an open
    server is reachable from this machine only.

    Use as a context manager (`with FhirServerProcess().start() as server:`) or call `stop()`; stopping also
    happens at interpreter exit as a last resort, and on Linux the server is SIGTERMed by the kernel when the
    thread that started it dies (so start it from a long-lived thread).
    """

    def __init__(self, *, start_timeout: float = DEFAULT_START_TIMEOUT, open_access: bool = False) -> None:
        self.start_timeout = start_timeout
        self.open_access = open_access
        self.port: int | None = None
        self.token: str | None = None
        self.startup_seconds: float | None = None
        self._instance_name = f"ketamine-cds sandbox FHIR {secrets.token_hex(6)}"
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise FhirServerError("the FHIR server has not been started")
        return f"http://{LOOPBACK}:{self.port}/fhir"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def data_dir(self) -> Path | None:
        """The throw-away directory holding settings, database and log (deleted by `stop()`)."""
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "sekmet.log" if self._workdir else None

    def start(self, port: int | None = None, token: str | None = None) -> FhirServerProcess:
        """Start the server and wait until `/metadata` answers; raises FhirServerError with its log tail.

        Without `port`, a free one is picked; if another process grabs it first, start-up is retried on a new one.
        An open server has no token (`token` must then be None).
        """
        if self._process is not None:
            raise FhirServerError("this FhirServerProcess is already started")
        if self.open_access and token is not None:
            raise FhirServerError("an open FHIR server takes no token")
        # hex: a token starting with "-" would be read as an option by `--fhir-token TOKEN` (argparse)
        self.token = None if self.open_access else token or secrets.token_hex(32)
        started = time.perf_counter()
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._start_once(port or free_port())
                break
            except FhirServerError as exc:
                lost_port_race = port is None and "address already in use" in str(exc).lower()
                if not lost_port_race or attempt == _PORT_ATTEMPTS:
                    raise
        self.startup_seconds = time.perf_counter() - started
        return self

    def _start_once(self, port: int) -> None:
        self.port = port
        self._workdir = Path(tempfile.mkdtemp(prefix="ketamine-cds-fhir-"))
        settings_path = self._workdir / "settings.yaml"
        settings_path.write_text(yaml.safe_dump(self._settings()), encoding="utf-8")
        try:
            self._log = (self._workdir / "sekmet.log").open("wb")
            self._process = subprocess.Popen(
                [*sekmet_command(), "serve", "-c", str(settings_path)],
                cwd=self._workdir,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() can signal everything it spawned
                preexec_fn=child_preexec(),
            )
            atexit.register(self.stop)
            self._wait_ready()
        except BaseException:  # includes KeyboardInterrupt while waiting: never leave a half-started server
            self.stop()
            raise

    def _settings(self) -> dict[str, object]:
        assert self._workdir is not None and self.port is not None
        data_dir = self._workdir / "data"
        return {
            "base_url": f"http://{LOOPBACK}:{self.port}/fhir",
            "host": LOOPBACK,
            "port": self.port,
            "data_dir": str(data_dir),
            "own_private_key_path": str(data_dir / "keys" / "sekmet_private.pem"),
            "simulator": {"enabled": False},  # it would answer orders with tasks/results behind our back
            "log_inbound": False,
            # a name unique to this process, so readiness cannot be fooled by another server on the same port
            "software_name": self._instance_name,
            # /metadata stays open in sekmet; everything else needs the token, as an EHR's FHIR API would —
            # unless the server is open (for browser clients that send no token), loopback-bound all the same
            "server_auth": {"types": ["none"]} if self.open_access else {"types": ["bearer"], "tokens": [self.token]},
        }

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        url = f"{self.base_url}/metadata"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise FhirServerError(
                    f"sekmet exited with code {self._process.returncode} during start-up:\n{self.log_tail()}"
                )
            if self._answers_metadata(url):
                return
            time.sleep(0.1)
        raise FhirServerError(
            f"sekmet did not answer {url} within {self.start_timeout:.0f} s; log tail:\n{self.log_tail()}"
        )

    def _answers_metadata(self, url: str) -> bool:
        try:
            response = requests.get(url, headers={"Accept": "application/fhir+json"}, timeout=1.0)
            return (
                response.status_code == 200 and response.json().get("software", {}).get("name") == self._instance_name
            )
        except (requests.RequestException, ValueError, AttributeError):
            return False

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The last `chars` characters of the server log (start-up errors, tracebacks)."""
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        if self._log is not None:
            with contextlib.suppress(ValueError):
                self._log.flush()
        return path.read_bytes()[-chars:].decode("utf-8", errors="replace")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL; remove the data dir. Safe to call more than once."""
        process, self._process = self._process, None
        if process is not None:
            terminate_process_group(process, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def session(self) -> requests.Session:
        """A FHIR session for this server, with its token."""
        return fhir_session(self.base_url, self.token)

    def __enter__(self) -> FhirServerProcess:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
