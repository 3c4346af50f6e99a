"""A serving worker answers before it is warm and warms up in the background (cds_service.runtime): every answer
is the one a warm worker gives, /readyz says not ready until the warm-up has finished, and the ConText pipeline is
built once however many calls ask for it at the same time."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cds_service import runtime, serving
from cds_service.app import create_app
from cds_service.config import ServiceConfig
from cds_service.runtime import WarmUp
from fhir_mappings.reading import text
from tests.harness import order_sign_request
from tests.service.test_http import NON_KETAMINE_ORDER

HOOK = "/cds-services/ketamine-prior-auth"


def _config(tmp_path: Path, name: str) -> ServiceConfig:
    """An app of its own database; the shipped mapping set."""
    return ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{tmp_path / name}")


def _deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a worker forked by a gunicorn master that ran our `on_starting`."""
    monkeypatch.setattr(runtime, "_warm_up_in_worker_init", True)


def _without_ids(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_ids(v) for k, v in node.items() if k not in ("uuid", "id")}
    if isinstance(node, list):
        return [_without_ids(v) for v in node]
    return node


def test_warm_up_runs_its_steps_once_and_says_when_it_is_done() -> None:
    calls: list[str] = []
    warm = WarmUp([lambda: calls.append("a"), lambda: calls.append("b")])
    assert not warm.done.is_set() and not warm.ok
    threads = [threading.Thread(target=warm.run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert calls == ["a", "b"] and warm.ok and warm.seconds is not None
    warm.run()
    assert calls == ["a", "b"]


def test_a_failed_warm_up_step_is_reported_by_type_and_re_raised_only_when_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> None:
        raise ValueError("a message that might quote data")

    background = WarmUp([broken])
    with caplog.at_level(logging.ERROR, logger="ketamine_cds"):
        background.start_in_background().join(10)
    assert background.done.is_set() and not background.ok and background.error == "ValueError"
    assert "ValueError" in caplog.text and "might quote" not in caplog.text
    in_process = WarmUp([broken])
    with pytest.raises(ValueError):
        in_process.run(reraise=True)
    assert in_process.done.is_set() and in_process.error == "ValueError"


def test_an_app_built_in_process_is_warm_and_ready_when_create_app_returns(tmp_path: Path) -> None:
    state = create_app(_config(tmp_path, "a.db")).extensions["ketamine_cds"]
    assert state.warm_up.ok and text.reader_loaded()
    answer = create_app(_config(tmp_path, "b.db")).test_client().get("/readyz")
    assert answer.status_code == 200 and answer.get_json()["checks"]["warm_up"] == {"ok": True, "done": True}


def test_a_worker_answers_before_it_is_warm_and_is_ready_once_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _deferred(monkeypatch)
    app = create_app(_config(tmp_path, "a.db"))
    state = app.extensions["ketamine_cds"]
    client = app.test_client()
    assert not state.warm_up.done.is_set()
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.get_json()["checks"]["warm_up"] == {"ok": False, "done": False}
    order = dict(NON_KETAMINE_ORDER, subject={"reference": "Patient/p1"})
    answered = client.post(HOOK, json=order_sign_request([order], patient_id="p1"))
    warm_app = create_app(_config(tmp_path, "b.db"))
    expected = warm_app.test_client().post(HOOK, json=order_sign_request([order], patient_id="p1"))
    assert answered.status_code == expected.status_code == 200
    assert _without_ids(answered.get_json()) == _without_ids(expected.get_json())
    state.warm_up.run()
    assert client.get("/readyz").status_code == 200


def test_post_worker_init_starts_the_warm_up_of_the_app_the_worker_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    _deferred(monkeypatch)
    app = create_app(_config(tmp_path, "a.db"))
    state = app.extensions["ketamine_cds"]
    steps: list[str] = []
    state.warm_up = WarmUp([lambda: steps.append("warm")])
    before = gc.get_threshold()
    try:
        serving._tune_worker(SimpleNamespace(wsgi=app))
        assert state.warm_up.done.wait(30) and steps == ["warm"]
    finally:
        time.sleep(0.05)  # the thread's own GC tuning after the steps
        gc.unfreeze()
        gc.set_threshold(*before)


def test_only_our_gunicorn_master_defers_the_warm_up_of_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "_warm_up_in_worker_init", False)
    monkeypatch.setattr(serving, "prepare_metrics_dir", lambda: None)
    monkeypatch.setattr(serving, "CONFIGURED", serving.CONFIGURED)
    config = _config(tmp_path, "a.db")
    on_starting = serving.settings(config, mappings_checked=True)["on_starting"]
    assert not runtime.warm_up_is_deferred()
    on_starting(SimpleNamespace(cfg=SimpleNamespace(address=[("127.0.0.1", 8765)]), log=logging.getLogger("t")))
    assert runtime.warm_up_is_deferred()


def test_evaluations_while_the_reader_loads_in_the_background_decide_as_a_warm_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fixture cases evaluated while the warm-up thread is still loading spaCy/medspacy: each call that reads a note
    waits for that one pipeline, and every decision is the one a warm process gives."""
    import dataclasses

    from fhir_mappings.tools.cases import case_files, evaluate_case
    from fhir_mappings.validation import load_validated

    mappings = load_validated()
    cases = case_files()
    text.shared_reader()
    warm = [evaluate_case(path, mappings).decision for path in cases]
    monkeypatch.setattr(text, "_shared", None)  # a worker that has not loaded it yet
    WarmUp([text.shared_reader]).start_in_background()
    cold = [evaluate_case(path, mappings).decision for path in cases]
    assert text.reader_loaded()
    for path, expected, actual in zip(cases, warm, cold, strict=True):
        assert (dataclasses.asdict(actual) if actual else None) == (
            dataclasses.asdict(expected) if expected else None
        ), path.name


def test_the_context_reader_is_built_once_for_concurrent_first_calls_and_a_failure_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[int] = []
    fail_first = [True]

    class SlowReader:
        def __init__(self, rules: Any) -> None:
            time.sleep(0.05)
            if fail_first[0]:
                fail_first[0] = False
                raise RuntimeError("spaCy could not be loaded")
            built.append(1)

    monkeypatch.setattr(text, "_shared", None)
    monkeypatch.setattr(text, "ContextReader", SlowReader)
    with pytest.raises(RuntimeError):
        text.shared_reader()
    assert not text.reader_loaded()
    readers: list[Any] = []
    threads = [threading.Thread(target=lambda: readers.append(text.shared_reader())) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert built == [1] and len(readers) == 6 and all(r is readers[0] for r in readers)
