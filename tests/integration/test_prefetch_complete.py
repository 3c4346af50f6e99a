"""When the EHR executed every advertised template (conformantly), the service makes no FHIR request at all.

The templates carry `_include` / `_revinclude` (`:iterate`) for every reference the facts follow; sekmet-fhir ignores
some of them, so the EHR simulator assembles those the way a conformant server does and the bench's
`complete_pages` sends whole searches. Only references that no CDS Hooks 2.0 token can reach (a draft order's
performer who is not the user) are still fetched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from cds_service.bench import complete_pages
from cds_service.discovery import discovery_document
from cds_service.fhir_client import FhirClient
from cds_service.prefetch import FhirAccess, gather_record
from fhir_mappings.validation import load_validated
from sandbox.demo import write_sandbox_keys
from sandbox.ehr import EhrSimulator
from sandbox.fhir_server import FhirServerProcess
from sandbox.loader import load_into
from sandbox.scenarios import find_scenario, load_all

pytestmark = pytest.mark.fhir_server
SITE_CONFIG = Path(__file__).resolve().parents[2] / "sandbox" / "site-config.yaml"
World = tuple[Any, EhrSimulator, list[Any]]
STORIES = ("mgb-031-reauthorization-improved", "uuhp-integration-likely-authorized", "mgb-031-pregnancy")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    mappings = load_validated(str(SITE_CONFIG))
    scenarios = load_all(include_background=True)
    with FhirServerProcess() as fhir:
        load_into(fhir.base_url, scenarios, token=fhir.token)
        key = write_sandbox_keys(tmp_path_factory.mktemp("keys"), [fhir.base_url])
        simulator = EhrSimulator("http://127.0.0.1:9", fhir.base_url, fhir_token=fhir.token, key=key)
        simulator._discovery = discovery_document(mappings.queries)  # no service needed to read the templates
        yield mappings, simulator, scenarios
        simulator.close()


class CountingClient(FhirClient):
    def __init__(self) -> None:
        super().__init__(timeout=5, max_workers=4, page_size=1000)
        self.requested: list[str] = []

    def fetch_many(self, base_url: str, requests: dict[str, str], **kwargs: Any) -> Any:
        self.requested.extend(requests.values())
        return super().fetch_many(base_url, requests, **kwargs)


def _gather(mappings: Any, simulator: EhrSimulator, scenario: Any, client: CountingClient, *, complete: bool) -> Any:
    body = simulator.build_request(scenario, mode="prefetch", today=date.today())
    if complete:
        complete_pages(simulator._fhir, body["prefetch"], scenario.patient_id)
    orders = [entry["resource"] for entry in body["context"]["draftOrders"]["entry"]]
    access = FhirAccess(simulator.fhir_base, simulator.fhir_token, lambda url: True)
    return gather_record(
        queries=mappings.queries,
        context=body["context"],
        prefetch=body["prefetch"],
        fhir=access,
        client=client,
        now=datetime.now(UTC),
        deadline=time.monotonic() + 10,
        draft_orders=orders,
    )


@pytest.mark.parametrize("story", STORIES)
def test_no_fhir_request_when_every_template_was_executed(
    world: tuple[Any, EhrSimulator, list[Any]], story: str
) -> None:
    mappings, simulator, scenarios = world
    client = CountingClient()
    record = _gather(mappings, simulator, find_scenario(story, scenarios), client, complete=True)
    assert client.requested == []
    assert record.unresolved_references == {}
    # the references the facts follow are in the record: the requester's role and its practitioner with roles
    requester = record.draft_orders[0].get("requester")
    role = record.resolve(requester)
    assert role is not None and record.resolve(role["practitioner"]) is not None


def test_the_same_record_as_when_the_service_resolves_references(world: World) -> None:
    """Without the simulator's help (first pages only) the service fetches; the record it ends with is the same."""
    mappings, simulator, scenarios = world
    scenario = find_scenario(STORIES[0], scenarios)
    complete = _gather(mappings, simulator, scenario, CountingClient(), complete=True)
    fetching = CountingClient()
    partial = _gather(mappings, simulator, scenario, fetching, complete=False)
    assert fetching.requested  # sekmet's CareTeam search comes paged: the service follows `next`
    keys = {f"{r['resourceType']}/{r['id']}" for r in complete.resources}
    assert keys == {f"{r['resourceType']}/{r['id']}" for r in partial.resources}
