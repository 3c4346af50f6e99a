"""Facts: named statements about the patient or the order, computed from FHIR resources with evidence.

Two kinds, both declared in YAML (`facts.yaml`, and a policy file's own `facts:` section):

- **select** facts pick resources of one type whose code is in a value set, pass a status filter, and
  turn each into an *item* (evidence, date, value, extra fields). Where the code, date and value live
  is a jsonpath-ng expression per resource type (first path that yields wins), compiled once here.
- **derive** facts call a named Python function (see `derivations.py`) with parameters from the YAML
  (value sets, other facts, numbers) — for what a path cannot express: age, blood pressure pairs,
  treatment trials with durations and adherence, the route and setting of the order.

A fact knows whether the data behind it was read: PRESENT (items found), ABSENT (read completely,
nothing found) or UNAVAILABLE (not read, or partly read and nothing found). Rules use that to keep
"unknown" distinct from "no".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from jsonpath_ng.ext import parse as jsonpath_parse

from fhir_mappings.model import Evidence, Fact, FactState
from fhir_mappings.orders import OrderGroup
from fhir_mappings.record import Availability, PatientRecord, medication_concepts
from fhir_mappings.rules import Item
from fhir_mappings.valuesets import CodeMatch, ValueSetRegistry

Resource = dict[str, Any]
FACTS_FILE = Path(__file__).with_name("facts.yaml")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


class FactError(ValueError):
    """A fact definition is invalid; the message names the file, fact and field."""


def parse_fhir_date(value: Any) -> date | None:
    """The calendar date of a FHIR date/dateTime/instant (partial dates → first day); None if not a date."""
    if not isinstance(value, str):
        return None
    m = _DATE.match(value)
    if not m:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1))
    except ValueError:
        return None


class CompiledPath:
    """A jsonpath-ng expression compiled once; `values` returns the matched values in document order."""

    __slots__ = ("expr", "text")

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        try:
            self.expr = jsonpath_parse(text)
        except Exception as exc:  # jsonpath-ng raises several exception types for syntax errors
            raise FactError(f"{where}: invalid jsonpath {text!r}: {exc}") from None

    def values(self, resource: Resource) -> list[Any]:
        return [m.value for m in self.expr.find(resource)]


def _compile_paths(raw: Any, where: str) -> tuple[CompiledPath, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(p, str) for p in items):
        raise FactError(f"{where}: expected a jsonpath or a list of jsonpaths")
    return tuple(CompiledPath(p, where) for p in items)


def first_value(paths: Iterable[CompiledPath], resource: Resource) -> Any:
    for path in paths:
        for value in path.values(resource):
            if value is not None:
                return value
    return None


def all_values(paths: Iterable[CompiledPath], resource: Resource) -> list[Any]:
    out: list[Any] = []
    for path in paths:
        out.extend(v for v in path.values(resource) if v is not None)
    return out


# --- status filters --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatusCheck:
    path: CompiledPath
    values: frozenset[str]
    exclude: bool  # True for not_in
    missing_passes: bool

    def accepts(self, resource: Resource) -> bool:
        found = [v for v in self.path.values(resource) if isinstance(v, str)]
        if not found:
            return self.missing_passes
        hit = any(v in self.values for v in found)
        return not hit if self.exclude else hit


@dataclass(frozen=True)
class StatusFilter:
    name: str
    description: str
    checks: tuple[StatusCheck, ...]

    def accepts(self, resource: Resource) -> bool:
        return all(c.accepts(resource) for c in self.checks)


# --- definitions -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Where a resource type keeps its code, date, end date and value."""

    code: tuple[CompiledPath, ...]
    date: tuple[CompiledPath, ...]
    end: tuple[CompiledPath, ...] = ()
    value: tuple[CompiledPath, ...] = ()
    medication: bool = False  # the code is the medication (medication[x], following medicationReference)


@dataclass(frozen=True)
class SelectFact:
    name: str
    description: str
    resource_type: str
    valuesets: tuple[str, ...]
    status_filter: StatusFilter | None
    shape: Shape
    fields: Mapping[str, tuple[CompiledPath, ...]]
    answers: tuple[str, ...]  # value sets tested against valueCodeableConcept -> item field "answers"

    @property
    def reads(self) -> tuple[str, ...]:
        return (self.resource_type,)


Derivation = Callable[["FactContext", Mapping[str, Any], "DeriveFact"], Fact]


@dataclass(frozen=True)
class DerivationSpec:
    function: Derivation
    params: Mapping[str, str]  # name -> kind: valueset | valuesets | fact | facts | int | number | str | map | any
    reads: tuple[str, ...]  # resource types the derivation reads (for documentation and load checks)
    optional: frozenset[str] = frozenset()


DERIVATIONS: dict[str, DerivationSpec] = {}


def derivation(
    name: str, *, params: Mapping[str, str], reads: Iterable[str], optional: Iterable[str] = ()
) -> Callable[[Derivation], Derivation]:
    """Register a derive function under the name the YAML uses, with its parameter kinds."""

    def register(fn: Derivation) -> Derivation:
        DERIVATIONS[name] = DerivationSpec(fn, dict(params), tuple(reads), frozenset(optional))
        return fn

    return register


@dataclass(frozen=True)
class DeriveFact:
    name: str
    description: str
    function_name: str
    params: Mapping[str, Any]

    @property
    def spec(self) -> DerivationSpec:
        return DERIVATIONS[self.function_name]

    @property
    def reads(self) -> tuple[str, ...]:
        return self.spec.reads


FactDef = SelectFact | DeriveFact


@dataclass
class FactLibrary:
    """Compiled fact definitions, checked against the value sets at load time."""

    facts: dict[str, FactDef]
    filters: dict[str, StatusFilter]
    shapes: dict[str, Shape]
    registry: ValueSetRegistry
    source_text: str = ""

    @classmethod
    def load(cls, registry: ValueSetRegistry, path: str | Path = FACTS_FILE) -> FactLibrary:
        text = Path(path).read_text(encoding="utf-8")
        doc = yaml.load(text, Loader=_Loader) or {}
        where = Path(path).name
        _expect_keys(doc, {"shapes", "filters", "facts"}, where)
        shapes = {
            rtype: _compile_shape(spec, f"{where} shapes.{rtype}") for rtype, spec in (doc.get("shapes") or {}).items()
        }
        filters = {
            name: _compile_filter(name, spec, f"{where} filters.{name}")
            for name, spec in (doc.get("filters") or {}).items()
        }
        library = cls(facts={}, filters=filters, shapes=shapes, registry=registry, source_text=text)
        library.add(doc.get("facts") or {}, where)
        return library

    def add(self, defs: Mapping[str, Any], where: str) -> None:
        """Compile and add fact definitions (a policy file's local facts use this too)."""
        compiled: dict[str, FactDef] = {}
        for name, spec in defs.items():
            if name in self.facts:
                raise FactError(f"{where}: fact {name!r} is already defined")
            compiled[name] = self._compile_fact(name, spec, f"{where} facts.{name}")
        self.facts.update(compiled)
        known = set(self.facts)
        for name, fact in compiled.items():
            if isinstance(fact, DeriveFact):
                _check_derive_params(fact, known, self.registry, f"{where} facts.{name}")

    def reads(self, fact_names: Iterable[str]) -> frozenset[str]:
        """Resource types the facts read, following derived facts' dependencies on other facts.

        A property of the definitions alone: computed when policies load, never per request.
        """
        types: set[str] = set()
        seen: set[str] = set()
        pending = list(fact_names)
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            definition = self.facts[name]
            types.update(definition.reads)
            if isinstance(definition, DeriveFact):
                kinds = definition.spec.params
                for key, value in definition.params.items():
                    if kinds.get(key) == "fact":
                        pending.append(value)
                    elif kinds.get(key) == "facts":
                        pending.extend(value.values() if isinstance(value, Mapping) else value)
        return frozenset(types)

    def extended(self, defs: Mapping[str, Any], where: str, extra_text: str = "") -> FactLibrary:
        copy = FactLibrary(dict(self.facts), self.filters, self.shapes, self.registry, self.source_text + extra_text)
        copy.add(defs, where)
        return copy

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.source_text.encode()).hexdigest()[:12]

    def _compile_fact(self, name: str, spec: Any, where: str) -> FactDef:
        if not isinstance(spec, Mapping):
            raise FactError(f"{where}: must be a mapping")
        if "derive" in spec:
            _expect_keys(spec, {"description", "derive", "params"}, where)
            fn = spec["derive"]
            if fn not in DERIVATIONS:
                raise FactError(f"{where}: unknown derivation {fn!r} (known: {', '.join(sorted(DERIVATIONS))})")
            return DeriveFact(name, str(spec.get("description", "")), fn, dict(spec.get("params") or {}))
        _expect_keys(spec, {"description", "resource", "valueset", "filter", "fields", "answers", *_SHAPE_KEYS}, where)
        rtype = spec.get("resource")
        if rtype not in self.shapes:
            raise FactError(f"{where}: resource {rtype!r} has no shape (known: {', '.join(sorted(self.shapes))})")
        valuesets = spec.get("valueset")
        valuesets = tuple(valuesets) if isinstance(valuesets, list) else (valuesets,)
        for vs in (*valuesets, *(spec.get("answers") or [])):
            if vs not in self.registry:
                raise FactError(f"{where}: unknown value set {vs!r}")
        status_filter = None
        if spec.get("filter") is not None:
            if spec["filter"] not in self.filters:
                raise FactError(f"{where}: unknown filter {spec['filter']!r}")
            status_filter = self.filters[spec["filter"]]
        shape = self.shapes[rtype]
        overrides = {k: _compile_paths(spec[k], f"{where}.{k}") for k in _SHAPE_KEYS if k in spec}
        if overrides:
            shape = Shape(
                code=overrides.get("code", shape.code),
                date=overrides.get("date", shape.date),
                end=overrides.get("end", shape.end),
                value=overrides.get("value", shape.value),
                medication=shape.medication and "code" not in overrides,
            )
        fields = {k: _compile_paths(v, f"{where}.fields.{k}") for k, v in (spec.get("fields") or {}).items()}
        return SelectFact(
            name=name,
            description=str(spec.get("description", "")),
            resource_type=rtype,
            valuesets=valuesets,
            status_filter=status_filter,
            shape=shape,
            fields=fields,
            answers=tuple(spec.get("answers") or ()),
        )


_SHAPE_KEYS = ("code", "date", "end", "value")


def _expect_keys(node: Any, allowed: set[str], where: str) -> None:
    if not isinstance(node, Mapping):
        raise FactError(f"{where}: must be a mapping")
    extra = set(node) - allowed
    if extra:
        raise FactError(f"{where}: unexpected key(s) {', '.join(sorted(extra))}")


def _compile_shape(spec: Any, where: str) -> Shape:
    _expect_keys(spec, {"code", "date", "end", "value"}, where)
    medication = spec.get("code") == "medication"
    code = () if medication else _compile_paths(spec.get("code"), f"{where}.code")
    return Shape(
        code=code,
        date=_compile_paths(spec["date"], f"{where}.date") if "date" in spec else (),
        end=_compile_paths(spec["end"], f"{where}.end") if "end" in spec else (),
        value=_compile_paths(spec["value"], f"{where}.value") if "value" in spec else (),
        medication=medication,
    )


def _compile_filter(name: str, spec: Any, where: str) -> StatusFilter:
    _expect_keys(spec, {"description", "checks"}, where)
    checks = []
    for i, check in enumerate(spec.get("checks") or []):
        cw = f"{where}.checks[{i}]"
        _expect_keys(check, {"path", "in", "not_in", "missing"}, cw)
        if ("in" in check) == ("not_in" in check):
            raise FactError(f"{cw}: exactly one of 'in' / 'not_in'")
        if check.get("missing", "pass") not in ("pass", "fail"):
            raise FactError(f"{cw}.missing: 'pass' or 'fail'")
        values = check.get("in", check.get("not_in"))
        checks.append(
            StatusCheck(
                path=CompiledPath(check["path"], cw),
                values=frozenset(values),
                exclude="not_in" in check,
                missing_passes=check.get("missing", "pass") == "pass",
            )
        )
    return StatusFilter(name, str(spec.get("description", "")), tuple(checks))


def _check_derive_params(fact: DeriveFact, known_facts: set[str], registry: ValueSetRegistry, where: str) -> None:
    spec = fact.spec
    missing = set(spec.params) - set(fact.params) - spec.optional
    if missing:
        raise FactError(f"{where}: missing parameter(s) {', '.join(sorted(missing))}")
    for key, value in fact.params.items():
        kind = spec.params.get(key)
        if kind is None:
            raise FactError(f"{where}.params: unknown parameter {key!r} (expected: {', '.join(sorted(spec.params))})")
        _check_param(kind, value, known_facts, registry, f"{where}.params.{key}")


def _check_param(kind: str, value: Any, known_facts: set[str], registry: ValueSetRegistry, where: str) -> None:
    if kind == "valueset":
        if value not in registry:
            raise FactError(f"{where}: unknown value set {value!r}")
    elif kind == "valuesets":
        values = value.values() if isinstance(value, Mapping) else value
        if not isinstance(values, Iterable) or isinstance(values, str):
            raise FactError(f"{where}: expected a list or mapping of value sets")
        for v in values:
            _check_param("valueset", v, known_facts, registry, where)
    elif kind == "fact":
        if value not in known_facts:
            raise FactError(f"{where}: unknown fact {value!r}")
    elif kind == "facts":
        values = value.values() if isinstance(value, Mapping) else value
        for v in values:
            _check_param("fact", v, known_facts, registry, where)
    elif kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise FactError(f"{where}: expected an integer")
    elif kind == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise FactError(f"{where}: expected a number")
    elif kind == "str" and not isinstance(value, str):
        raise FactError(f"{where}: expected a string")
    elif kind == "map" and not isinstance(value, Mapping):
        raise FactError(f"{where}: expected a mapping")


# --- evaluation --------------------------------------------------------------------------------------
def reference_of(resource: Resource) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def format_value(value: Any) -> str | None:
    """A short human string for a FHIR value (number, Quantity, CodeableConcept, boolean)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping):
        if "value" in value:
            unit = value.get("unit") or value.get("code") or ""
            return f"{format_value(value.get('value'))} {unit}".strip()
        if value.get("text"):
            return str(value["text"])
        for coding in value.get("coding") or []:
            if isinstance(coding, Mapping) and (coding.get("display") or coding.get("code")):
                return str(coding.get("display") or coding.get("code"))
    return str(value)[:80]


def numeric(value: Any) -> Any:
    """Numbers from valueQuantity.value / valueInteger as numbers (Synthea writes 17.0 for a PHQ-9)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("value"), int | float):
        return value["value"]
    return value


class FactContext:
    """Computes facts for one (record, order group) evaluation, each at most once."""

    def __init__(self, library: FactLibrary, record: PatientRecord, group: OrderGroup | None = None) -> None:
        self.library = library
        self.registry = library.registry
        self.record = record
        self.group = group
        self.today: date = record.now.date() if isinstance(record.now, datetime) else record.now
        self._cache: dict[str, Fact] = {}
        self._in_progress: set[str] = set()
        self._concepts: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self._matches: dict[tuple[str, tuple[Any, ...]], CodeMatch | None] = {}

    def fact(self, name: str) -> Fact:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if name in self._in_progress:
            raise FactError(f"fact {name!r} depends on itself")
        definition = self.library.facts.get(name)
        if definition is None:
            raise FactError(f"unknown fact {name!r}")
        self._in_progress.add(name)
        try:
            if isinstance(definition, SelectFact):
                result = self._select(definition)
            else:
                result = definition.spec.function(self, definition.params, definition)
        finally:
            self._in_progress.discard(name)
        self._cache[name] = result
        return result

    def computed(self) -> tuple[Fact, ...]:
        return tuple(self._cache.values())

    # -- helpers shared with derivations ------------------------------------------------------------
    def availability(self, *resource_types: str) -> Availability:
        states = [self.record.availability(t) for t in resource_types]
        if all(s is Availability.READ for s in states):
            return Availability.READ
        if all(s is Availability.UNAVAILABLE for s in states):
            return Availability.UNAVAILABLE
        return Availability.PARTIAL

    def make_fact(
        self, name: str, items: list[Item], reads: Iterable[str], detail: str = "", value: Any = None
    ) -> Fact:
        """PRESENT with items, else ABSENT if everything it reads was read completely, else UNAVAILABLE."""
        availability = self.availability(*reads) if reads else Availability.READ
        complete = availability is Availability.READ
        ordered = tuple(sorted(items, key=lambda i: i.date or date.min, reverse=True))
        if ordered or value is not None:
            evidence = tuple(i.evidence for i in ordered[:12])
            return Fact(name, FactState.PRESENT, ordered if value is None else value, evidence, detail, complete)
        state = FactState.ABSENT if complete else FactState.UNAVAILABLE
        if not complete and not detail:
            detail = f"{', '.join(reads)} not (fully) available"
        return Fact(name, state, (), (), detail, complete)

    def concepts(self, resource: Resource, shape: Shape) -> list[dict[str, Any]]:
        """The coded concepts of a resource per its shape (memoised: several facts test the same resource)."""
        key = (id(resource), id(shape))
        found = self._concepts.get(key)
        if found is None:
            if shape.medication:
                found = self.medication_concepts(resource)
            else:
                found = [c for c in all_values(shape.code, resource) if isinstance(c, Mapping)]
            self._concepts[key] = found
        return found

    def medication_concepts(self, resource: Resource) -> list[dict[str, Any]]:
        """The drug concepts of a medication resource, following medicationReference through the record."""
        return medication_concepts(resource, lambda ref, holder: self.record.resolve(ref, within=holder))

    def match(self, vs_id: str, concepts: list[dict[str, Any]]) -> CodeMatch | None:
        valueset = self.registry.get(vs_id)
        for concept in concepts:
            # Keyed by content, never by id(): concepts built on the fly (note text) are garbage collected
            # and their ids reused, which would hand one concept another's match.
            key = (vs_id, _concept_key(concept))
            if key not in self._matches:
                self._matches[key] = valueset.match_concept(concept)
            found = self._matches[key]
            if found is not None:
                return found
        return None

    def item_for(
        self,
        resource: Resource,
        match: CodeMatch | None,
        *,
        when: date | None,
        date_text: str | None,
        value: Any = None,
        fields: Mapping[str, Any] | None = None,
        codes: Iterable[str] = (),
        note: str | None = None,
        display: str | None = None,
    ) -> Item:
        evidence = Evidence(
            reference=reference_of(resource),
            date=date_text,
            code=match.label() if match else None,
            display=display or (match.display if match else None),
            value=format_value(value),
            note=note,
        )
        all_fields = {"value": numeric(value), **(fields or {})}
        return Item(evidence=evidence, date=when, fields=all_fields, codes=frozenset(codes))

    # -- select facts --------------------------------------------------------------------------------
    def _select(self, definition: SelectFact) -> Fact:
        items: list[Item] = []
        shape = definition.shape
        for resource in self.record.of_type(definition.resource_type):
            concepts = self.concepts(resource, shape)
            if not concepts:
                continue
            matched_sets = []
            match = None
            for vs in definition.valuesets:
                m = self.match(vs, concepts)
                if m is not None:
                    matched_sets.append(vs)
                    match = match or m
            if match is None:
                continue
            if definition.status_filter and not definition.status_filter.accepts(resource):
                continue
            date_text = first_value(shape.date, resource)
            value = first_value(shape.value, resource) if shape.value else None
            fields: dict[str, Any] = {
                "end": parse_fhir_date(first_value(shape.end, resource)) if shape.end else None,
                "status": _status_of(resource),
            }
            for fname, paths in definition.fields.items():
                fields[fname] = first_value(paths, resource)
            if definition.answers:
                answer_concepts = [value] if isinstance(value, Mapping) and "coding" in value else []
                fields["answers"] = frozenset(
                    vs for vs in definition.answers if answer_concepts and self.match(vs, answer_concepts)
                )
            items.append(
                self.item_for(
                    resource,
                    match,
                    when=parse_fhir_date(date_text),
                    date_text=date_text if isinstance(date_text, str) else None,
                    value=value,
                    fields=fields,
                    codes=matched_sets,
                )
            )
        return self.make_fact(definition.name, items, definition.reads)


def _concept_key(concept: Mapping[str, Any]) -> tuple[Any, ...]:
    """A hashable identity of a CodeableConcept's content (codings and text)."""
    codings = concept.get("coding") if isinstance(concept, Mapping) else None
    parts = tuple((c.get("system"), c.get("code"), c.get("display")) for c in codings or () if isinstance(c, Mapping))
    return (*parts, concept.get("text") if isinstance(concept, Mapping) else None)


def _status_of(resource: Resource) -> str | None:
    status = resource.get("status")
    if isinstance(status, str):
        return status
    clinical = resource.get("clinicalStatus")
    if isinstance(clinical, Mapping):
        for coding in clinical.get("coding") or []:
            if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
                return coding["code"]
    return None
