"""`ketamine-cds evaluate`: the same decisions as the service, for every sandbox story; `--explain` says why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.scenarios import Scenario, load_all
from tests.harness import FIXED_NOW, ServiceUnderTest, mocked_fhir, order_sign_request, start_service
from tests.tools.conftest import SANDBOX_SITE, STORIES, run_cli, run_json

DECISION_EXTENSION = "ketamine-cds.decision"
SCENARIOS = load_all(include_background=True)
TODAY = FIXED_NOW.date()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceUnderTest]:
    service = start_service(tmp_path_factory.mktemp("svc"), site_config=str(SANDBOX_SITE), now=FIXED_NOW)
    yield service
    service.stop()


def _story_file(scenario: Scenario, directory: Path) -> Path:
    """The story as the service sees it today (dates shifted to the harness clock), as an evaluate input."""
    current = scenario.shifted(TODAY)
    path = directory / f"{scenario.id}.json"
    path.write_text(
        json.dumps(
            {
                "id": current.id,
                "anchor_date": TODAY.isoformat(),
                "patient_id": current.patient_id,
                "user_id": current.user_id,
                "encounter_id": current.encounter_id,
                "draft_orders": current.draft_orders,
                "bundle": current.bundle,
            }
        )
    )
    return path


def _as_stored(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The resources as a FHIR server stores a transaction: `urn:uuid:` references rewritten to Type/id."""
    local = {
        e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle["entry"]
        if "fullUrl" in e
    }

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (local.get(v, v) if k == "reference" else rewrite(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    return [rewrite(e["resource"]) for e in bundle["entry"]]


def _service_decisions(service: ServiceUnderTest, scenario: Scenario) -> list[dict[str, Any]]:
    current = scenario.shifted(TODAY)
    resources = _as_stored(current.bundle)
    body = order_sign_request(
        current.draft_orders,
        patient_id=current.patient_id,
        user_id=current.user_id,
        encounter_id=current.encounter_id,
    )
    rsps, _mock = mocked_fhir(service, resources)
    with rsps:  # no prefetch: the service reads the record from the (mocked) EHR FHIR server itself
        response = service.post_hook(body)
    assert response.status_code == 200, response.text
    return [
        card["extension"][DECISION_EXTENSION]
        for card in response.json()["cards"]
        if DECISION_EXTENSION in card.get("extension", {})
    ]


def _key(decision: dict[str, Any]) -> str:
    return json.dumps(decision, sort_keys=True)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_evaluate_json_equals_the_service_decision_extension(
    scenario: Scenario, service: ServiceUnderTest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _story_file(scenario, tmp_path)
    code, offline = run_json(
        capsys,
        "evaluate",
        str(path),
        "--site-config",
        str(SANDBOX_SITE),
        "--as-of",
        TODAY.isoformat(),
        "--format",
        "json",
    )
    assert code == 0
    online = _service_decisions(service, scenario)
    assert sorted(map(_key, offline)) == sorted(map(_key, online))  # type: ignore[arg-type]
    if scenario.expected:
        assert offline, "a story with expectations has decisions"


def test_explain_gives_branch_rule_tree_facts_paths_and_valueset_entries(capsys: pytest.CaptureFixture[str]) -> None:
    story = STORIES / "mgb-031-documentation-needed.json"
    code, doc = run_json(capsys, "evaluate", str(story), "--explain", "--format", "json")
    assert code == 0
    (entry,) = doc  # type: ignore[misc]
    assert entry["decision"]["outcome"] == "documentation-needed"
    explanation = entry["explanation"]
    assert explanation["route"]["payer"] == "Mass General Brigham Health Plan"
    assert explanation["phase"]["id"] == "initial"
    criteria = {c["id"]: c for c in explanation["criteria"]}
    severity = criteria["initial-3-severity"]
    assert severity["status"] == "unknown"
    assert severity["branch"] == "met_when is false, not_met_when is not true"
    assert severity["consistent"] is True
    assert severity["rules"]["met_when"]["rule"] == "any of"
    first = severity["rules"]["met_when"]["parts"][0]
    assert first == {"rule": "exists phq9_scores where (within 30 days and value >= 15)", "value": "false"}
    phq9 = next(f for f in severity["facts"] if f["name"] == "phq9_scores")
    item = phq9["items"][0]
    assert item["reference"].startswith("Observation/")
    assert item["paths"]["value"] == "Observation.valueQuantity.value"
    assert item["paths"]["date"] == "Observation.effectiveDateTime"
    assert item["valueset_entries"][0]["valueset"] == "obs_phq9_total"
    assert item["valueset_entries"][0]["entry"].startswith("listed code 44261-6")
    mdd = criteria["initial-1-unipolar-mdd"]
    assert mdd["status"] == "met" and mdd["branch"] == "met_when is true"
    every_branch = {c["branch"] for c in explanation["criteria"]}
    assert "holds_when is false" in every_branch


def test_explain_text_and_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    story = STORIES / "mgb-031-three-trials.json"
    code, out, _ = run_cli(capsys, "evaluate", str(story), "--explain")
    assert code == 0
    assert "criteria-not-met" in out
    assert "decided by: met_when is false, not_met_when is true" in out
    assert "fact treatment_trials = present" in out
    code, md, _ = run_cli(capsys, "evaluate", str(story), "--format", "markdown")
    assert code == 0
    assert md.count("| not met |") >= 1
    assert "## mgbhp-031 (Medical Policy 031): criteria-not-met [initial]" in md


def test_without_an_order_the_right_kind_is_assumed_and_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    story = json.loads((STORIES / "mgb-031-initial-likely-authorized.json").read_text())
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps(story["bundle"]))  # a plain Bundle: no draft order
    code, out, _ = run_cli(capsys, "evaluate", str(bundle), "--as-of", story["anchor_date"])
    assert code == 0
    assert "No order given: assumed a draft IV ketamine infusion" in out
    assert "mgbhp-031" in out
    story = json.loads((STORIES / "uuhp-integration-likely-authorized.json").read_text())
    bundle.write_text(json.dumps(story["bundle"]))
    code, decisions = run_json(capsys, "evaluate", str(bundle), "--as-of", story["anchor_date"], "--format", "json")
    assert code == 0
    assert decisions[0]["policy"] == "uuhp-mp-054"  # type: ignore[index]
    assert decisions[0]["service"] == "integration-therapy"  # type: ignore[index]
    assert "ServiceRequest/assumed-integration-psychotherapy" in decisions[0]["orders"]  # type: ignore[index]


def test_order_and_policy_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    story = json.loads((STORIES / "mgb-031-initial-likely-authorized.json").read_text())
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps(story["bundle"]))
    order = tmp_path / "order.json"
    order.write_text(json.dumps(story["draft_orders"][0]))
    args = ["evaluate", str(bundle), "--order", str(order), "--as-of", story["anchor_date"], "--format", "json"]
    code, decisions = run_json(capsys, *args)
    assert code == 0
    assert decisions[0]["outcome"] == "likely-authorized"  # type: ignore[index]
    assert decisions[0]["orders"] == [f"MedicationRequest/{story['draft_orders'][0]['id']}"]  # type: ignore[index]
    code, decisions = run_json(capsys, *args, "--policy", "uuhp-mp-054")
    assert code == 0
    assert decisions[0]["policy"] == "uuhp-mp-054" and decisions[0]["outcome"] == "not-covered"  # type: ignore[index]


def test_unusable_input_is_one_line_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, out, err = run_cli(capsys, "evaluate", str(broken))
    assert code == 2
    assert err.strip().startswith("ketamine-cds: ") and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err
    code, _, err = run_cli(capsys, "evaluate", str(STORIES / "mgb-031-pregnancy.json"), "--policy", "nope")
    assert code == 2 and "unknown policy 'nope'" in err
