"""`mappings validate`: every mistake of a mapping set at once, each as file:line:column and a one-line reason.

Four passes over one mapping directory (the shipped `fhir_mappings/` or a copy with the same layout) and an
optional site configuration:

1. YAML/JSON syntax and duplicate keys, with positions (`yamlpos`);
2. the JSON Schema of each file kind (`schemas`, published in `fhir_mappings/schemas/`): unknown keys, wrong
   types, missing keys, unknown enum values;
3. cross-checks (`crosscheck`): unknown facts / value sets / thresholds / filters / phases / policies, invalid
   jsonpaths, malformed or non-existent codes (`codes`), card texts that restate a threshold (`textcheck`);
4. the service's own loader (`Mappings.load`), whose first error — if the passes above missed it — is located
   from the path its message names (`locate`).

The service runs the same function before it binds its port, and on reload: the same one-line messages. There
(`remembered=True`) a clean verdict reached before on exactly the same files, code and libraries (`verdicts`) lets
it skip passes 1-3 and run only the loader; a set with any problem is never remembered, so it always gets every
pass and the same messages.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fhir_mappings.mappings import MAPPINGS_DIR, MappingError, Mappings, SiteConfig
from fhir_mappings.validation import verdicts
from fhir_mappings.validation.crosscheck import CrossChecker, MappingSet
from fhir_mappings.validation.locate import locate
from fhir_mappings.validation.problems import Collector, Problem
from fhir_mappings.validation.yamlpos import (
    LocatedDocument,
    LocatedYAMLError,
    Position,
    load_located,
    load_located_json,
)

__all__ = ["MappingsInvalid", "Problem", "load_validated", "validate", "validate_and_load"]


class MappingsInvalid(MappingError):
    """The mapping set (or site configuration) has problems; str() is one line per problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _display(path: Path) -> str:
    """A path an editor or terminal can open: relative to the working directory when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") else str(path)


def policy_files(base: Path) -> list[Path]:
    """The policy files, as `load_policies` reads them (a `*.matrix.yaml` beside a policy is test data)."""
    return sorted(p for p in (base / "policies").glob("*.yaml") if not p.name.endswith(".matrix.yaml"))


def mapping_files(base: Path) -> list[Path]:
    return [
        *sorted((base / "valuesets").glob("*.yaml")),
        base / "facts.yaml",
        *policy_files(base),
        base / "queries.yaml",
        base / "routing.yaml",
    ]


def _fingerprint(base: Path, site_config: Path | None) -> str:
    """Content of every data file of the set (fixture cases aside): a changed file means a new validation."""
    digest = hashlib.sha256(str(base).encode())
    files = sorted(
        p for p in base.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and not any(".cases" in d for d in p.parts)
    )
    for path in [*mapping_files(base), *files]:
        digest.update(str(path.relative_to(base)).encode())
        digest.update(path.read_bytes() if path.is_file() else b"\0missing")
    if site_config is not None:
        digest.update(site_config.read_bytes() if site_config.is_file() else b"\0missing")
    return digest.hexdigest()


@dataclass(frozen=True)
class _Outcome:
    problems: list[Problem]
    mappings: Mappings | None
    every_pass: bool  # False: passes 1-3 were skipped on a remembered clean verdict (only the loader ran)


_CACHE: dict[str, _Outcome] = {}
_CACHE_LOCK = threading.Lock()


def validate_and_load(
    directory: str | Path | None = None, site_config: str | Path | None = None, *, remembered: bool = False
) -> tuple[list[Problem], Mappings | None]:
    """All problems of the mapping set, and the loaded Mappings when there are none (memoised by content).

    `remembered=True` (the service's start-up and reload): a clean verdict on exactly these files, this code and
    these libraries, recorded by an earlier full run on this machine, stands for passes 1-3; only the loader runs.
    """
    base = Path(directory).resolve() if directory is not None else MAPPINGS_DIR
    site_path = Path(site_config) if site_config is not None else None
    key = _fingerprint(base, site_path)
    with _CACHE_LOCK:
        known = _CACHE.get(key)
    if known is not None and (known.every_pass or remembered):
        return known.problems, known.mappings
    verdict = verdicts.verdict_key(key)
    outcome = _load_remembered(base, site_path) if remembered and verdicts.is_remembered_clean(verdict) else None
    if outcome is not None and _fingerprint(base, site_path) != key:
        outcome = None  # a file changed while it was being loaded: what was loaded is not what was remembered
    if outcome is None:
        outcome = _Outcome(*_run(base, site_path), every_pass=True)
        if not outcome.problems and outcome.mappings is not None:
            verdicts.remember_clean(verdict)
    with _CACHE_LOCK:
        _CACHE[key] = outcome
    return outcome.problems, outcome.mappings


def _load_remembered(base: Path, site_path: Path | None) -> _Outcome | None:
    """The loader alone, for a set remembered clean; None (then every pass runs) if it fails after all."""
    try:
        site = SiteConfig.from_file(site_path) if site_path is not None else None
        # The ConText pipeline loaded with this very set before: a serving worker loads it in the background.
        mappings = Mappings.load(site, base, text_reader=False)
    except Exception:  # not expected for a remembered set; the full run below says what is wrong, with positions
        return None
    return _Outcome([], mappings, every_pass=False)


def validate(
    directory: str | Path | None = None, site_config: str | Path | None = None, *, remembered: bool = False
) -> list[Problem]:
    return validate_and_load(directory, site_config, remembered=remembered)[0]


def load_validated(
    site_config: str | Path | None = None, directory: str | Path | None = None, *, remembered: bool = True
) -> Mappings:
    """The mapping set, loaded only when it has no problem at all; MappingsInvalid lists them otherwise.

    Used by the service (start-up, reload): a remembered clean verdict is trusted unless `remembered=False`."""
    problems, mappings = validate_and_load(directory, site_config, remembered=remembered)
    if problems or mappings is None:
        raise MappingsInvalid(problems)
    return mappings


def _read(path: Path, schema: str, out: Collector, display: str | None = None) -> LocatedDocument | None:
    file = display or _display(path)
    if not path.is_file():
        out.at(file, Position(1, 1), "file not found", "yaml")
        return None
    try:
        text = path.read_text(encoding="utf-8")
        doc = load_located_json(text, file) if path.suffix == ".json" else load_located(text, file)
    except UnicodeDecodeError:
        out.at(file, Position(1, 1), "not UTF-8 text", "yaml")
        return None
    except LocatedYAMLError as exc:
        out.at(file, exc.position, str(exc), "yaml")
        return None
    for dup_path, here, first in doc.duplicates:
        out.at(file, here, f"duplicate key {dup_path[-1]!r} (already at line {first.line}): keep one", "yaml", dup_path)
    if doc.data is None:
        doc.data = {}
    from fhir_mappings.validation.schema_check import check_document  # jsonschema: only when the passes run

    check_document(doc, schema, out)
    return doc


def _run(base: Path, site_path: Path | None) -> tuple[list[Problem], Mappings | None]:
    out = Collector()
    mset = MappingSet()
    if not base.is_dir():
        out.at(_display(base), Position(1, 1), "mapping directory not found", "yaml")
        return out.sorted(), None
    docs: dict[str, LocatedDocument] = {}

    def keep(doc: LocatedDocument | None, path: Path) -> LocatedDocument | None:
        if doc is not None:
            docs[path.name] = doc
        return doc

    for path in sorted((base / "valuesets").glob("*.yaml")):
        doc = keep(_read(path, "valuesets", out), path)
        if doc is not None:
            mset.valuesets.append(doc)
    if not mset.valuesets:
        out.at(_display(base / "valuesets"), Position(1, 1), "no value-set files (*.yaml)", "yaml")
    mset.facts = keep(_read(base / "facts.yaml", "facts", out), base / "facts.yaml")
    for path in policy_files(base):
        doc = keep(_read(path, "policy", out), path)
        if doc is not None:
            mset.policies.append(doc)
    mset.queries = keep(_read(base / "queries.yaml", "queries", out), base / "queries.yaml")
    mset.routing = keep(_read(base / "routing.yaml", "routing", out), base / "routing.yaml")
    if site_path is not None:
        mset.site = _read(site_path, "site-config", out, display=str(site_path))
        if mset.site is not None:
            docs["<site>"] = mset.site
    CrossChecker(mset, out).run()
    mappings = _loader_pass(base, site_path, docs, out)
    problems = out.sorted()
    return problems, (mappings if not problems else None)


def _loader_pass(
    base: Path, site_path: Path | None, docs: dict[str, LocatedDocument], out: Collector
) -> Mappings | None:
    """The service's own loader, as the last net: what it refuses and the passes above did not see."""
    try:
        site = SiteConfig.from_file(site_path) if site_path is not None else None
        return Mappings.load(site, base)
    except MappingError as exc:
        for line in str(exc).splitlines()[:1]:
            doc, path, reason = locate(line, docs)
            if doc is not None and any(p.file == doc.file for p in out.problems):
                continue  # most likely a consequence of a problem already reported in that file
            if doc is not None:
                out.add(doc, path, reason, "loader")
            else:
                out.at(_display(base), Position(1, 1), reason, "loader")
    except Exception as exc:  # a loader tripping over data the schema already refused
        if not out.problems:
            out.at(_display(base), Position(1, 1), f"the loader failed: {type(exc).__name__}: {exc}", "loader")
    return None


def format_problems(problems: Iterable[Problem]) -> str:
    return "\n".join(str(p) for p in problems)
