"""The CDS Hooks sandbox web app (sandbox.cds-hooks.org) against this sandbox: launch URLs, a local build, serving.

The app is the browser EHR simulator most CDS Hooks developers try a service with first. Three things stand
between it and this project's sandbox, and this module deals with each:

- its *Change Patient* picker lists only the first page (20) of `GET /Patient`, so the scenario patients are
  reached with the app's URL parameters (`fhirServiceUrl`, `patientId`, `serviceDiscoveryURL`, plus
  `hook=order-sign&screen=rx-sign` to open the Rx Sign tab): `launch_url`, `scenario_links`;
- its medication list has no ketamine, so a local build with ketamine added is needed: `build_app` copies the
  app's source, adds the entries of `KETAMINE_MEDICATIONS`, runs `npm ci` and `npm run build`, and caches both
  (node_modules by package-lock hash, the build by source hash) because they take minutes;
- the build is a static site: `StaticSite` serves it on loopback.

It only talks to open FHIR servers (`ketamine-cds sandbox server --open`) and signs its calls with a public key
(`sandbox/cds-hooks-sandbox-issuers.json` trusts it inline).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from sandbox.fhir_server import LOOPBACK
from sandbox.scenarios import Scenario

PUBLIC_APP_URL = "https://sandbox.cds-hooks.org/"
MEDICATION_LIST = Path("src/assets/medication-list.js")
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ketamine-cds" / "sandbox-app"


@dataclass(frozen=True)
class AppMedication:
    """One prescribable the app's Rx Sign tab should offer, as its medication list models it."""

    rxcui: str  # what the app sends as medicationCodeableConcept.coding[0].code (RxNorm SCD)
    name: str  # RxNorm name, shown and sent as text/display
    component: str  # RxNorm SCDC (ingredient + strength): the app lists prescribables by component set
    component_name: str
    ingredient: str  # RxNorm IN: the app's "pill" key that groups component sets
    ingredient_name: str


# RxNorm codes from RxNorm Current Prescribable Content 2025-10-06 (see fhir_mappings/valuesets/orders.yaml).
KETAMINE_MEDICATIONS: tuple[AppMedication, ...] = (
    AppMedication("238082", "ketamine 10 MG/ML Injectable Solution", "330467", "ketamine 10 MG/ML", "6130", "ketamine"),
    AppMedication("238084", "ketamine 50 MG/ML Injectable Solution", "330468", "ketamine 50 MG/ML", "6130", "ketamine"),
    AppMedication(
        "238083", "ketamine 100 MG/ML Injectable Solution", "328379", "ketamine 100 MG/ML", "6130", "ketamine"
    ),
    AppMedication(
        "2119381",
        "esketamine 140 MG/ML Nasal Spray",
        "2119377",
        "esketamine 140 MG/ML",
        "2119365",
        "esketamine",
    ),
)
# Bump when the patch changes, so cached builds made with an older patch are not reused.
_PATCH_VERSION = "1"


class WebAppError(RuntimeError):
    """The app could not be built or served; the message says which step failed (and its output tail)."""


# ---------------------------------------------------------------------- launch URLs


def launch_url(
    app_url: str,
    *,
    fhir_server: str,
    patient_id: str,
    discovery_url: str,
    rx_sign: bool = True,
) -> str:
    """The app opened on `patient_id` of the open FHIR server, with the service's discovery URL registered."""
    params = {"fhirServiceUrl": fhir_server, "patientId": patient_id, "serviceDiscoveryURL": discovery_url}
    if rx_sign:
        params.update({"hook": "order-sign", "screen": "rx-sign"})
    return f"{app_url.rstrip('/')}/?{urlencode(params, safe=':/')}"  # ':' and '/' are fine in a query


@dataclass(frozen=True)
class LaunchLink:
    """A scenario patient and the URL that opens the app on it."""

    scenario_id: str
    patient_id: str
    title: str
    expected: str  # the scenario's own expectation (its orders carry more than the app's Rx Sign order does)
    url: str


def _expectation(scenario: Scenario) -> str:
    if scenario.expect_no_cards:
        return "no cards"
    return ", ".join(sorted({e.outcome for e in scenario.expected})) or "nothing in particular"


def scenario_links(
    scenarios: Iterable[Scenario], *, app_url: str, fhir_server: str, discovery_url: str
) -> list[LaunchLink]:
    """One launch link per story patient (background patients left out), sorted by scenario id."""
    links = [
        LaunchLink(
            scenario_id=s.id,
            patient_id=s.patient_id,
            title=s.title,
            expected=_expectation(s),
            url=launch_url(app_url, fhir_server=fhir_server, patient_id=s.patient_id, discovery_url=discovery_url),
        )
        for s in scenarios
        if not s.background
    ]
    return sorted(links, key=lambda link: link.scenario_id)


def format_links(links: Iterable[LaunchLink]) -> str:
    """A block of text a developer can read and click: scenario, patient, the scenario's expectation, URL."""
    lines = []
    for link in links:
        lines.append(f"{link.scenario_id}  (patient {link.patient_id}; scenario expects {link.expected})")
        lines.append(f"    {link.url}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- what the app's Rx Sign sends


def rx_sign_draft_orders(patient_id: str, medication: AppMedication, authored_on: date) -> dict[str, Any]:
    """`context.draftOrders` exactly as the app's Rx Sign builds it with its default instructions (1 pill daily,
    30 days), quirks included: a single-object `category`, no `requester`/`performer`/route, a Bundle without
    `type` (its `createFhirResource`; `tests/fixtures/recorded/` holds requests it really sent)."""
    order = {
        "resourceType": "MedicationRequest",
        "id": "request-123",
        "status": "draft",
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": authored_on.isoformat(),
        "dosageInstruction": [
            {
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                "doseAndRate": [
                    {"doseQuantity": {"value": 1, "system": "http://unitsofmeasure.org", "code": "{pill}"}}
                ],
            }
        ],
        "dispenseRequest": {
            "expectedSupplyDuration": {"value": 30, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"}
        },
        "intent": "order",
        "category": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category", "code": "community"}
            ]
        },
        "medicationCodeableConcept": {
            "text": medication.name,
            "coding": [
                {
                    "display": medication.name,
                    "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                    "code": medication.rxcui,
                }
            ],
        },
    }
    return {"resourceType": "Bundle", "entry": [{"resource": order}]}


# ---------------------------------------------------------------------- the local build


def patch_medication_list(text: str, medications: Iterable[AppMedication] = KETAMINE_MEDICATIONS) -> str:
    """The app's `medication-list.js` with `medications` added to its three maps (names, pills, prescribables)."""
    medications = tuple(medications)
    names: dict[str, str] = {}
    pills: dict[str, list[str]] = {}
    prescribables: dict[str, list[str]] = {}
    for med in medications:
        names.update({med.rxcui: med.name, med.component: med.component_name, med.ingredient: med.ingredient_name})
        pills.setdefault(med.ingredient, [])
        if med.component not in pills[med.ingredient]:
            pills[med.ingredient].append(med.component)
        prescribables.setdefault(med.component, []).append(med.rxcui)
    inserts = {
        "cuiToName: {": [f"    {cui}: {_js_string(name)}," for cui, name in names.items()],
        "pillToComponentSets: {": [
            f"    {pill}: [{', '.join(f'[{_js_string(c)}]' for c in components)}],"
            for pill, components in pills.items()
        ],
        "componentSetsToPrescribables: {": [
            f"    {component}: [{', '.join(_js_string(p) for p in ids)}]," for component, ids in prescribables.items()
        ],
    }
    for anchor, lines in inserts.items():
        if text.count(anchor) != 1:
            raise WebAppError(f"{MEDICATION_LIST}: expected one {anchor!r}; the app's medication list changed shape")
        text = text.replace(anchor, anchor + "\n" + "\n".join(lines), 1)
    return text


def _js_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_files(source: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d not in ("node_modules", "build", ".git"))
        for name in sorted(files):
            yield Path(root) / name


def source_digest(source: Path) -> str:
    """A hash of the app's source tree (without node_modules/build) and of this module's patch."""
    digest = hashlib.sha256(_PATCH_VERSION.encode())
    for med in KETAMINE_MEDICATIONS:
        digest.update(repr(med).encode())
    for path in _source_files(source):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One build at a time per cache directory (two test runs on one machine share the cache)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(command: list[str], cwd: Path, step: str, timeout: float) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WebAppError(f"{step} failed: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise WebAppError(f"{step} failed with exit code {done.returncode}:\n{tail}")


def _make_writable(tree: Path) -> None:
    for root, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            path = Path(root) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
    tree.chmod(tree.stat().st_mode | stat.S_IWUSR)


def build_app(
    source: Path,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    *,
    npm: str = "npm",
    progress: Callable[[str], None] = lambda _message: None,
    timeout: float = 900.0,
) -> Path:
    """The app's production build with ketamine in its medication list; the path of its `build/` directory.

    `source` is never written to (it may be read-only). Reuses a cached build of the same source and patch;
    otherwise copies the source into the cache's work tree for this package-lock (whose node_modules survive
    between builds, so `npm ci` runs only when the lock file changes), patches it and builds it.
    """
    source = source.resolve()
    if not (source / "package-lock.json").is_file() or not (source / MEDICATION_LIST).is_file():
        raise WebAppError(f"{source} does not look like the CDS Hooks sandbox's source (no package-lock.json)")
    if shutil.which(npm) is None:
        raise WebAppError(f"{npm} is not on PATH (Node 20 and npm build the app)")
    cache_dir = cache_dir.resolve()
    key = source_digest(source)
    done = cache_dir / f"build-{key}"
    with _locked(cache_dir):
        if (done / "index.html").is_file():
            progress(f"using the cached build {done}")
            return done
        lock_hash = _digest_file(source / "package-lock.json")[:16]
        work = cache_dir / f"work-{lock_hash}"
        node_modules = work / "node_modules"
        installed_marker = work / ".npm-ci-done"
        if work.exists():
            for child in work.iterdir():
                if child.name not in ("node_modules", installed_marker.name):
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        work.mkdir(parents=True, exist_ok=True)
        for child in source.iterdir():
            if child.name in ("node_modules", "build", ".git"):
                continue
            target = work / child.name
            shutil.copytree(child, target, symlinks=True) if child.is_dir() else shutil.copy2(child, target)
        _make_writable(work)
        medication_list = work / MEDICATION_LIST
        medication_list.write_text(patch_medication_list(medication_list.read_text(encoding="utf-8")), "utf-8")
        if not (installed_marker.is_file() and node_modules.is_dir()):
            progress(f"npm ci in {work} (first build for this package-lock; about a minute)")
            installed_marker.unlink(missing_ok=True)
            _run([npm, "ci", "--no-audit", "--no-fund"], work, "npm ci", timeout)
            installed_marker.write_text(lock_hash, encoding="utf-8")
        progress("npm run build (about a minute)")
        _run([npm, "run", "build"], work, "npm run build", timeout)
        if not (work / "build" / "index.html").is_file():
            raise WebAppError("npm run build finished without build/index.html")
        staging = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir))
        shutil.copytree(work / "build", staging, dirs_exist_ok=True)
        staging.rename(done)
        for old in cache_dir.glob("build-*"):  # keep the cache from growing with every source change
            if old != done and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        progress(f"built {done}")
        return done


# ---------------------------------------------------------------------- serving it


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr: the app loads dozens of files per page."""


class StaticSite:
    """A directory served over HTTP on loopback (a thread; `stop()` or `with` ends it)."""

    def __init__(self, directory: Path, port: int = 0) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self._server = ThreadingHTTPServer((LOOPBACK, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="static-site", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/"

    def start(self) -> StaticSite:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> StaticSite:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
