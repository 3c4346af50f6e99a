"""Remembered clean verdicts (`fhir_mappings.validation.verdicts`): a restart on unchanged files skips the schema,
position and cross-check passes and runs only the loader; anything else — a broken set, a changed byte, other code
or libraries, an unusable cache directory — gets every pass, with the same lines as `mappings validate`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_mappings import validation
from fhir_mappings.mappings import MAPPINGS_DIR, Mappings
from fhir_mappings.reading import text
from fhir_mappings.tools.cases import case_files, evaluate_case
from fhir_mappings.validation import MappingsInvalid, load_validated, validate, validate_and_load, verdicts
from tests.tools.conftest import copy_mappings, replace_once

BROKEN = ("policies/mgbhp-031.yaml", "  phq9_severe: 15\n", '  phq9_severe: "15"\n')  # "must be a number"


@pytest.fixture(autouse=True)
def fresh_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache directory of this test's own and an empty in-process memo: as a freshly started process."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(validation, "_CACHE", {})
    return cache


def _new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "_CACHE", {})


def _no_passes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make the full run (passes 1-4) observable: the directories it was asked to validate."""
    runs: list[Path] = []
    full_run = validation._run

    def counted(base: Path, site: Path | None) -> Any:
        runs.append(base)
        return full_run(base, site)

    monkeypatch.setattr(validation, "_run", counted)
    return runs


def _remembered(cache: Path) -> list[str]:
    folder = cache / "ketamine-cds" / "mapping-verdicts"
    return sorted(p.name for p in folder.glob("*.clean")) if folder.is_dir() else []


def test_a_clean_run_is_remembered_and_a_restart_runs_only_the_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_process: Path
) -> None:
    mappings = copy_mappings(tmp_path / "m")
    runs = _no_passes(monkeypatch)
    first = load_validated(directory=mappings)
    assert runs == [mappings.resolve()] and len(_remembered(fresh_process)) == 1
    _new_process(monkeypatch)
    again = load_validated(directory=mappings)
    assert runs == [mappings.resolve()], "the remembered verdict stood for the passes"
    assert again.version == first.version and again is not first


def test_the_linter_and_remembered_false_always_run_every_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mappings = copy_mappings(tmp_path / "m")
    runs = _no_passes(monkeypatch)
    load_validated(directory=mappings)  # remembered
    _new_process(monkeypatch)
    assert validate(mappings) == []  # `mappings validate` does not trust the cache
    load_validated(directory=mappings, remembered=False)
    assert len(runs) == 2


def test_a_broken_set_is_never_remembered_and_is_refused_with_the_same_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_process: Path
) -> None:
    mappings = copy_mappings(tmp_path / "m")
    load_validated(directory=mappings)  # the clean set is remembered ...
    remembered_before = _remembered(fresh_process)
    replace_once(mappings / BROKEN[0], BROKEN[1], BROKEN[2])  # ... then broken
    _new_process(monkeypatch)
    expected = [str(p) for p in validate(mappings)]
    assert expected and any("must be a number" in line for line in expected)
    for _ in range(2):  # twice: a refused set leaves nothing behind that a second start could trust
        _new_process(monkeypatch)
        with pytest.raises(MappingsInvalid) as refused:
            load_validated(directory=mappings)
        assert str(refused.value).splitlines() == expected
    assert _remembered(fresh_process) == remembered_before


def test_the_service_refuses_a_broken_set_with_one_line_and_exit_2_after_a_clean_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check_before_bind`'s line (the gunicorn recipe) is the same whether or not the clean set was remembered."""
    from cds_service import serving
    from cds_service.config import ServiceConfig

    site = tmp_path / "site.yaml"
    site.write_text("no_policy_card: true\n")
    config = ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{tmp_path / 'a.db'}", site_config=str(site))
    monkeypatch.setattr(serving, "_on_exit", lambda _server: None)
    serving.check_before_bind(config, [("127.0.0.1", 8765)])  # clean: remembered
    site.write_text('no_policy_card: "no"\n')
    lines = []
    for _ in range(2):
        _new_process(monkeypatch)
        with pytest.raises(SystemExit) as stopped:
            serving.check_before_bind(config, [("127.0.0.1", 8765)])
        assert stopped.value.code == 2
        lines.append(capsys.readouterr().err.strip().splitlines())
    assert lines[0] == lines[1] and len(lines[0]) == 1
    assert lines[0][0].startswith("ketamine-cds: not starting: the mapping set is invalid: 1 problem(s):")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_changed_byte_of_any_file_of_the_set_is_a_new_verdict(tmp_path: Path, data: st.DataObject) -> None:
    mappings = tmp_path / "m"
    if not mappings.is_dir():
        copy_mappings(mappings)
    files = sorted(p for p in mappings.rglob("*") if p.is_file())
    path = data.draw(st.sampled_from(files))
    original = path.read_bytes()
    at = data.draw(st.integers(0, len(original) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[at]))
    before = verdicts.verdict_key(validation._fingerprint(mappings.resolve(), None))
    try:
        path.write_bytes(original[:at] + bytes([byte]) + original[at + 1 :])
        after = verdicts.verdict_key(validation._fingerprint(mappings.resolve(), None))
    finally:
        path.write_bytes(original)
    assert after != before


def test_other_libraries_or_another_python_are_a_new_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    fingerprint = validation._fingerprint(MAPPINGS_DIR, None)
    verdicts._environment.cache_clear()
    key = verdicts.verdict_key(fingerprint)
    installed = verdicts._installed_distributions()
    assert any(name.startswith("jsonschema-") for name in installed), installed[:5]
    upgraded = [n.replace("jsonschema-", "jsonschema-99.") if n.startswith("jsonschema-") else n for n in installed]
    monkeypatch.setattr(verdicts, "_installed_distributions", lambda: upgraded)
    verdicts._environment.cache_clear()
    try:
        assert verdicts.verdict_key(fingerprint) != key
        monkeypatch.setattr(verdicts, "_installed_distributions", lambda: installed)
        monkeypatch.setattr(verdicts.sys, "version", verdicts.sys.version + " (another build)")
        verdicts._environment.cache_clear()
        assert verdicts.verdict_key(fingerprint) != key
    finally:
        verdicts._environment.cache_clear()


@pytest.mark.parametrize("unusable", ["a-file", "no-home"])
def test_an_unusable_cache_directory_means_every_pass_never_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unusable: str
) -> None:
    if unusable == "a-file":
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    else:
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.setattr(os.path, "expanduser", lambda path: path)
        assert verdicts.cache_dir() is None
    mappings = copy_mappings(tmp_path / "m")
    runs = _no_passes(monkeypatch)
    for _ in range(2):
        _new_process(monkeypatch)
        assert load_validated(directory=mappings).policies
    assert len(runs) == 2


def test_a_file_changed_while_the_remembered_set_loads_gets_every_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mappings = copy_mappings(tmp_path / "m")
    load_validated(directory=mappings)
    _new_process(monkeypatch)
    runs = _no_passes(monkeypatch)
    loader = Mappings.load

    def edited_meanwhile(*args: Any, **kwargs: Any) -> Mappings:
        loaded = loader(*args, **kwargs)
        replace_once(mappings / BROKEN[0], BROKEN[1], BROKEN[2])
        return loaded

    monkeypatch.setattr(Mappings, "load", edited_meanwhile)
    problems, loaded = validate_and_load(mappings, remembered=True)
    assert runs and loaded is None and any("must be a number" in str(p) for p in problems)


def test_the_remembered_set_decides_every_fixture_case_as_the_fully_validated_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Equivalence of the fast path: same version, same decision for each of the policies' fixture cases (the
    ConText pipeline, which the remembered path leaves to its first use, is the one process-wide reader)."""
    full = load_validated(remembered=False)
    _new_process(monkeypatch)
    reader_calls: list[bool] = []
    loader = Mappings.load
    monkeypatch.setattr(
        Mappings,
        "load",
        lambda *a, **k: reader_calls.append(k.get("text_reader", True)) or loader(*a, **k),
    )
    fast = load_validated()
    assert reader_calls == [False], "the remembered path ran the loader alone, without loading the reader"
    assert fast.version == full.version and fast is not full
    cases = case_files()
    assert len(cases) > 100
    for path in cases:
        expected, actual = evaluate_case(path, full).decision, evaluate_case(path, fast).decision
        assert (dataclasses.asdict(actual) if actual else None) == (
            dataclasses.asdict(expected) if expected else None
        ), path.name
    assert text.reader_loaded()
