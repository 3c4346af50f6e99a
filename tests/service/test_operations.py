"""Operations in process: configuration refusals, the per-call JSON log line (no PHI, no token), request ids,
ProxyFix, /readyz and /metrics (see tests/service/test_gunicorn_ops.py for the same under real gunicorn)."""

from __future__ import annotations

import copy
import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY

from cds_service import serving
from cds_service.app import create_app
from cds_service.audit import AuditStore, HookCallRecord
from cds_service.config import ConfigError, ServiceConfig, check_environment
from cds_service.observability import CALL_LOG_FIELDS, _classify_fetch_failure, json_formatter
from tests.harness import mocked_fhir, order_sign_request, start_service
from tests.service.test_http import NON_KETAMINE_ORDER

BASE_CASE = Path(__file__).parents[2] / "fhir_mappings/policies/mgbhp-031.cases/base.json"
TOKEN = "ehr-access-token-123"  # the FHIR bearer token harness requests carry


@pytest.fixture
def service(tmp_path: Path):
    svc = start_service(tmp_path)
    yield svc
    svc.stop()


def _call_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The service's call lines exactly as the JSON formatter writes them."""
    formatter = json_formatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "ketamine_cds.call"]


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _base_request(base: dict[str, Any]) -> dict[str, Any]:
    return order_sign_request(
        copy.deepcopy(base["draft_orders"]),
        patient_id=base["patient_id"],
        user_id=base["user_id"],
        encounter_id=base["encounter_id"],
    )


# --- configuration --------------------------------------------------------------------------------------


def test_unknown_variable_is_refused_naming_the_closest_option() -> None:
    with pytest.raises(ConfigError) as refused:
        check_environment({"KETAMINE_CDS_DATABSE": "sqlite:////srv/audit.db"})
    assert str(refused.value) == (
        "unknown environment variable KETAMINE_CDS_DATABSE; did you mean KETAMINE_CDS_DATABASE?"
    )
    check_environment({"KETAMINE_CDS_DATABASE": "x", "KETAMINE_CDS_REQUIRE_POSTGRES": "1", "OTHER": "y"})


def test_serve_refuses_a_misspelt_variable_before_anything_else(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from cds_service.cli import main

    monkeypatch.setenv("KETAMINE_CDS_LOG_LEVLE", "DEBUG")
    assert main(["serve", "--insecure-no-auth"]) == 2
    assert "KETAMINE_CDS_LOG_LEVLE; did you mean KETAMINE_CDS_LOG_LEVEL?" in capsys.readouterr().err


def test_insecure_no_auth_refuses_a_public_interface() -> None:
    with pytest.raises(ConfigError, match=r"--insecure-no-auth refuses to listen on 0\.0\.0\.0"):
        ServiceConfig(insecure_no_auth=True, host="0.0.0.0").validate()
    ServiceConfig(insecure_no_auth=True, host="::1").validate()


@pytest.mark.parametrize(
    ("config", "addresses", "expected"),
    [
        (ServiceConfig(insecure_no_auth=True), [("0.0.0.0", 8765)], "--insecure-no-auth refuses to listen on"),
        (ServiceConfig(trusted_issuers="x"), [("0.0.0.0", 8765)], "KETAMINE_CDS_PUBLIC_BASE_URL"),
        (ServiceConfig(insecure_no_auth=True), [("127.0.0.1", 9000)], "JWT `aud` would have to be"),
    ],
)
def test_binds_that_would_misbehave_are_refused_in_one_line(
    config: ServiceConfig, addresses: list[Any], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        serving.check_before_bind(config, addresses, mappings_checked=True)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ketamine-cds: not starting: ") and expected in err


# --- the call's log line ----------------------------------------------------------------------------------


def test_an_evaluated_call_logs_one_line_without_phi_or_token(service, caplog: pytest.LogCaptureFixture) -> None:
    base = json.loads(BASE_CASE.read_text())
    decided = _sample("ketamine_cds_decisions_total", outcome="likely-authorized")
    fhir_stage = _sample("ketamine_cds_stage_duration_seconds_count", stage="fhir_fetch")
    rsps, _ = mocked_fhir(service, [copy.deepcopy(e["resource"]) for e in base["bundle"]["entry"]])
    caplog.set_level(logging.INFO)
    with rsps:
        answer = service.post_hook(_base_request(base), headers={"X-Request-ID": "req-7f3a"})
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "req-7f3a"
    (line,) = _call_lines(caplog)
    assert set(line) - {"time", "level", "logger", "pid", "message"} <= set(CALL_LOG_FIELDS)
    assert line["request_id"] == "req-7f3a" and line["status"] == 200 and line["outcome"] == "evaluated"
    assert line["decisions"] == ["likely-authorized"] and line["endpoint"] == "/cds-services/ketamine-prior-auth"
    assert {"parse", "auth", "fhir_fetch", "evaluation"} <= set(line["stages_ms"])
    assert line["hook_instance"] and line["duration_ms"] > 0
    text = json.dumps(line)
    for secret in (base["patient_id"], base["user_id"].split("/")[-1], TOKEN, "Bearer"):
        assert secret not in text
    assert _sample("ketamine_cds_decisions_total", outcome="likely-authorized") == decided + 1
    assert _sample("ketamine_cds_stage_duration_seconds_count", stage="fhir_fetch") == fhir_stage + 1


def test_a_refused_call_logs_which_field(service, caplog: pytest.LogCaptureFixture) -> None:
    order = dict(NON_KETAMINE_ORDER, category={"text": "one object, not a list"})
    caplog.set_level(logging.INFO)
    answer = service.post_hook(order_sign_request([order], patient_id="pat-9931"))
    assert answer.status_code == 422
    (line,) = _call_lines(caplog)
    assert line["status"] == 422 and line["outcome"] == "refused" and len(line["hook_instance"]) == 36
    assert line["reason"] == "context.draftOrders.entry[0].resource: MedicationRequest.category: expected an array"
    assert "pat-9931" not in json.dumps(line)
    body = order_sign_request([order], patient_id="pat-9931")
    body["hookInstance"] = "Jane Roe 1961-02-03"  # not a UUID: whatever it says stays out of the log
    assert service.post_hook(body).status_code == 422
    assert _call_lines(caplog)[-1]["hook_instance"] is None


def test_traceparent_is_honoured_and_echoed(service, caplog: pytest.LogCaptureFixture) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    caplog.set_level(logging.INFO)
    answer = requests.get(service.base_url + "/cds-services", headers={"traceparent": traceparent}, timeout=10)
    assert answer.headers["traceparent"] == traceparent
    assert answer.headers["X-Request-ID"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    (line,) = _call_lines(caplog)
    assert line["trace_id"] == line["request_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    bad = requests.get(service.base_url + "/cds-services", headers={"X-Request-ID": "a b\tc"}, timeout=10)
    assert len(bad.headers["X-Request-ID"]) == 32 and "traceparent" not in bad.headers  # not echoed: a fresh id


@pytest.mark.parametrize(("proxies", "expected"), [(0, "127.0.0.1"), (1, "203.0.113.9")])
def test_proxy_fix_trusts_only_the_configured_hops(
    tmp_path: Path, proxies: int, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{tmp_path / 'a.db'}", proxies=proxies)
    client = create_app(config).test_client()
    caplog.set_level(logging.INFO)
    client.get("/cds-services", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
    (line,) = _call_lines(caplog)
    assert line["remote_addr"] == expected


def test_fhir_fetch_failures_are_counted_by_kind(service) -> None:
    base = json.loads(BASE_CASE.read_text())
    before = _sample("ketamine_cds_fhir_fetch_failures_total", kind="http")
    rsps, fhir = mocked_fhir(service, [copy.deepcopy(e["resource"]) for e in base["bundle"]["entry"]])
    fhir.fail_types = {"Observation"}
    with rsps:
        assert service.post_hook(_base_request(base)).status_code == 200
    assert _sample("ketamine_cds_fhir_fetch_failures_total", kind="http") > before
    assert [_classify_fetch_failure(r) for r in ("timeout", "HTTP 503", "invalid JSON", "page limit")] == [
        "timeout",
        "http",
        "error",
        None,
    ]


# --- health, readiness, metrics -------------------------------------------------------------------------


def test_readyz_checks_mappings_and_a_real_write(service) -> None:
    ready = requests.get(service.base_url + "/readyz", timeout=10)
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert checks["mappings"]["ok"] and checks["audit_store"]["ok"] and checks["audit_queue"]["ok"]
    assert requests.get(service.base_url + "/healthz", timeout=10).json()["status"] == "ok"


def test_readyz_is_503_when_the_store_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    AuditStore(f"sqlite:///{path}").close()  # an existing store at head
    read_only = AuditStore(f"sqlite:///file:{path}?mode=ro&uri=true")
    config = ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{path}")
    client = create_app(config, audit=read_only).test_client()
    answer = client.get("/readyz")
    assert answer.status_code == 503
    store = answer.get_json()["checks"]["audit_store"]
    assert store["ok"] is False and "readonly" in store["error"]
    read_only.close()


def test_readyz_is_503_while_the_audit_queue_is_backed_up(tmp_path: Path) -> None:
    store = AuditStore("sqlite://", queue_size=4)
    config = ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{tmp_path / 'unused.db'}")
    client = create_app(config, audit=store).test_client()
    record = HookCallRecord(
        received_at=datetime.now(UTC),
        service_id="s",
        endpoint="hook",
        hook=None,
        hook_instance=None,
        status_code=200,
        latency_ms=1.0,
        outcome="evaluated",
        decisions=[],
        cards=[],
        system_actions=[],
        mapping_version=None,
        issuer=None,
        patient_id=None,
        user_id=None,
        fhir_server=None,
        error=None,
    )
    release = threading.Event()
    write = store._insert_calls

    def slow_database(rows: list[dict[str, Any]]) -> None:  # the database stalls: rows pile up in the queue
        release.wait(30)
        write(rows)

    store._insert_calls = slow_database  # type: ignore[method-assign]
    for _ in range(3):
        store.record_call(record)
    answer = client.get("/readyz")
    release.set()
    assert answer.status_code == 503 and answer.get_json()["checks"]["audit_queue"]["depth"] == 3
    store.flush()
    assert client.get("/readyz").status_code == 200
    store.close()


def test_metrics_counts_a_call(service) -> None:
    def calls() -> float:
        text = requests.get(service.base_url + "/metrics", timeout=10).text
        wanted = 'ketamine_cds_calls_total{endpoint="/cds-services/ketamine-prior-auth",outcome="triaged-out",'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted))

    before = calls()
    assert service.post_hook(order_sign_request([NON_KETAMINE_ORDER], patient_id="p1")).status_code == 200
    assert calls() == before + 1


def test_the_gunicorn_configuration_tunes_each_worker_after_it_built_the_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve and your own gunicorn share `serving.settings`: its post_worker_init freezes start-up objects and
    raises the young-generation threshold (large records were super-linear under CPython's default 700)."""
    import gc

    from cds_service.runtime import GC_THRESHOLDS

    monkeypatch.setattr(serving, "prepare_metrics_dir", lambda: None)  # no metrics directory for this process
    monkeypatch.setattr(serving, "CONFIGURED", serving.CONFIGURED)
    config = ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{tmp_path / 'a.db'}")
    hook = serving.settings(config)["post_worker_init"]
    before = gc.get_threshold()
    try:
        hook(object())
        assert gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
