"""Load scenario records into any FHIR R4 server with plain transactions (PUT, so loading twice is harmless).

Nothing here is specific to the sandbox's own server: the same call loads the scenarios into a public HAPI
server or an EHR's test FHIR endpoint. Draft orders are never posted; they are what the clinician is signing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import requests

from sandbox.fhir_server import fhir_session
from sandbox.scenarios import Scenario

FHIR_JSON = "application/fhir+json"
DEFAULT_TIMEOUT = 30.0


class LoadError(RuntimeError):
    """A scenario's transaction was refused; the message names the scenario and the server's diagnostics."""


@dataclass
class LoadReport:
    """What was loaded, how much, and how long it took."""

    scenario_ids: list[str] = field(default_factory=list)
    resource_count: int = 0
    seconds: float = 0.0
    per_scenario_ms: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.scenario_ids)} scenarios, {self.resource_count} resources in {self.seconds:.2f} s"


def load_into(
    base_url: str,
    scenarios: Iterable[Scenario],
    *,
    token: str | None = None,
    today: date | None = None,
    session: requests.Session | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> LoadReport:
    """POST each scenario's bundle, shifted to `today`, as one transaction; raise LoadError on the first refusal.

    Scenarios that write resources others reference are loaded first, for servers that enforce referential
    integrity (HAPI does).
    """
    today = today or date.today()
    base_url = base_url.rstrip("/")
    http = session or fhir_session(base_url, token)
    report = LoadReport()
    started = time.perf_counter()
    try:
        for scenario in dependency_order(list(scenarios)):
            bundle = scenario.shifted(today).bundle
            scenario_started = time.perf_counter()
            try:
                response = http.post(
                    base_url,
                    json=bundle,
                    headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
                    timeout=timeout,
                )
            except requests.RequestException as exc:
                raise LoadError(f"scenario {scenario.id}: cannot reach {base_url}: {exc}") from exc
            if not 200 <= response.status_code < 300:
                raise LoadError(
                    f"scenario {scenario.id} ({scenario.source}): transaction refused with HTTP "
                    f"{response.status_code}: {operation_outcome_text(response)}"
                )
            report.per_scenario_ms[scenario.id] = (time.perf_counter() - scenario_started) * 1000
            report.scenario_ids.append(scenario.id)
            report.resource_count += len(bundle["entry"])
    finally:
        if session is None:
            http.close()
    report.seconds = time.perf_counter() - started
    return report


def operation_outcome_text(response: requests.Response, limit: int = 2000) -> str:
    """The diagnostics of an OperationOutcome body (never echoes the request), else the start of the body."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:limit] or response.reason or "(empty body)"
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        lines = []
        for issue in body.get("issue", []):
            where = ", ".join(issue.get("expression") or issue.get("location") or [])
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code", "")
            lines.append(f"{issue.get('severity', '?')}: {text}" + (f" [{where}]" if where else ""))
        return "; ".join(lines)[:limit] or "(OperationOutcome without issues)"
    return str(body)[:limit]


def dependency_order(scenarios: Sequence[Scenario]) -> list[Scenario]:
    """Scenarios sorted so that one writing `Type/id` comes before those referencing it (ties: by id).

    A cycle cannot be ordered; it is broken at a deterministic point (a server enforcing integrity would refuse
    one of its transactions, which then names the scenario).
    """
    by_id = {scenario.id: scenario for scenario in sorted(scenarios, key=lambda scenario: scenario.id)}
    writer: dict[str, str] = {}
    for scenario in by_id.values():
        for ref in scenario.resource_refs():
            writer.setdefault(ref, scenario.id)
    needs: dict[str, set[str]] = {}
    for scenario in by_id.values():
        refs = _references(scenario.bundle)
        needs[scenario.id] = {writer[ref] for ref in refs if ref in writer and writer[ref] != scenario.id}
    ordered: list[Scenario] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(scenario_id: str) -> None:
        if scenario_id in done or scenario_id in visiting:
            return
        visiting.add(scenario_id)
        for dependency in sorted(needs[scenario_id]):
            visit(dependency)
        visiting.discard(scenario_id)
        done.add(scenario_id)
        ordered.append(by_id[scenario_id])

    for scenario_id in by_id:
        visit(scenario_id)
    return ordered


def _references(node: Any) -> set[str]:
    found: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            for key, value in current.items():
                if key == "reference" and isinstance(value, str):
                    found.add(value)
                else:
                    stack.append(value)
        elif isinstance(current, list):
            stack.extend(current)
    return found
