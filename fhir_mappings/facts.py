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
from typing import Any, NamedTuple

import yaml
from jsonpath_ng.ext import parse as jsonpath_parse

from fhir_mappings.model import Bounds, Evidence, Fact, FactState
from fhir_mappings.orders import OrderGroup
from fhir_mappings.reading.dates import DateSpan, parse_span
from fhir_mappings.reading.text import normalise
from fhir_mappings.reading.values import CodeTest, PolarityReading, Reading, read_polarity, readings
from fhir_mappings.record import Availability, PatientRecord, as_list, medication_concepts, weakest
from fhir_mappings.rules import Item
from fhir_mappings.valuesets import CodeMatch, ValueSetRegistry

Resource = dict[str, Any]
FACTS_FILE = Path(__file__).with_name("facts.yaml")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MATCH_CACHE_LIMIT = 20_000  # code matches kept per process (a few hundred bytes each: a few MiB at most)
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


_SIMPLE_PATH = re.compile(r"^\$(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\*\])*$")
_SIMPLE_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[\*\]")
_NOT_SET = object()


class CompiledPath:
    """A jsonpath-ng expression compiled once; `values` returns the matched values in document order.

    Nearly every path the mappings use is a chain of fields and `[*]` (`$.clinicalStatus.coding[*].code`): those
    are walked directly, with jsonpath-ng's exact semantics (a field of a non-object matches nothing, a present
    `null` matches, `[*]` yields a list's items or an object's values) at a fraction of its cost — every fact reads
    every resource of its type through these. Anything else goes through jsonpath-ng.
    """

    __slots__ = ("expr", "steps", "text")

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        try:
            self.expr = jsonpath_parse(text)
        except Exception as exc:  # jsonpath-ng raises several exception types for syntax errors
            raise FactError(f"{where}: invalid jsonpath {text!r}: {exc}") from None
        # None = `[*]`; a str = a field. Only for the plain grammar; otherwise jsonpath-ng does the walk.
        self.steps: tuple[str | None, ...] | None = (
            tuple(m.group(1) for m in _SIMPLE_STEP.finditer(text)) if _SIMPLE_PATH.match(text) else None
        )

    def values(self, resource: Resource) -> list[Any]:
        steps = self.steps
        if steps is None:
            return [m.value for m in self.expr.find(resource)]
        current: list[Any] = [resource]
        for step in steps:
            found: list[Any] = []
            if step is None:
                for value in current:
                    if isinstance(value, list | tuple):
                        found.extend(value)
                    elif isinstance(value, dict):
                        found.extend(value.values())
            else:
                for value in current:
                    if isinstance(value, dict):
                        item = value.get(step, _NOT_SET)
                        if item is not _NOT_SET:
                            found.append(item)
            if not found:
                return found
            current = found
        return current


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
    uncertain: frozenset[str] = frozenset()  # values that keep the resource, but not as certain evidence

    def accepts(self, resource: Resource) -> bool:
        return self.verdict(resource) is not False

    def verdict(self, resource: Resource) -> bool | None:
        """True: passes; False: filtered out; None: kept as uncertain (e.g. a provisional diagnosis)."""
        found = [v for v in self.path.values(resource) if isinstance(v, str)]
        if not found:
            return self.missing_passes
        if any(v in self.uncertain for v in found):
            return None
        hit = any(v in self.values for v in found)
        return not hit if self.exclude else hit


@dataclass(frozen=True)
class StatusFilter:
    name: str
    description: str
    checks: tuple[StatusCheck, ...]

    def accepts(self, resource: Resource) -> bool:
        return self.verdict(resource) is not False

    def verdict(self, resource: Resource) -> bool | None:
        """True (passes), False (filtered out) or None (kept, but what it says is not certain)."""
        verdicts = [c.verdict(resource) for c in self.checks]
        if any(v is False for v in verdicts):
            return False
        return None if any(v is None for v in verdicts) else True


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
    panel: tuple[str, ...] = ()  # Observation panels whose components / members hold the selected result
    value_range: tuple[float, float] | None = None  # a result outside it is not a valid score (kept, uncertain)
    polarity: Polarity | None = None  # how a qualitative result reads as positive / negative (field "positive")
    reasons: ReasonSources | None = None  # Condition facts: also diagnoses stated as another resource's reason

    @property
    def reads(self) -> tuple[str, ...]:
        return (self.resource_type, *(self.reasons.types if self.reasons else ()))


@dataclass(frozen=True)
class ReasonSources:
    """Where else a diagnosis is recorded when no Condition resource holds it: the reasonCode of an Encounter,
    Procedure, MedicationRequest or MedicationAdministration (an ED visit for delirium, an antibiotic for
    pneumonia). `within_days` bounds how old such a statement may be for a *current* condition (None: any)."""

    types: tuple[str, ...]
    within_days: int | None


@dataclass(frozen=True)
class Polarity:
    """When an Observation's result means "yes / positive / present" (item field `positive` True), "no /
    negative / absent" (False) or cannot be told (None): coded answers in `positive` / `negative` value sets,
    valueBoolean, an exact answer word in valueString, interpretation codes, and for quantitative results the
    reference range or the `positive_at_least` / `negative_below` cut-offs (in `unit`)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    quantitative: bool = False  # a number is the result (e.g. serum hCG mIU/mL): high means positive
    positive_at_least: float | None = None
    negative_below: float | None = None
    units: tuple[str, ...] = ()  # units the cut-offs are in; a quantity in another unit is read by range only
    code_asserts: bool = False  # the code states the finding: with no value at all it reads as positive


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
                        pending.extend(value.values() if isinstance(value, dict) else value)
        return frozenset(types)

    def extended(self, defs: Mapping[str, Any], where: str, extra_text: str = "") -> FactLibrary:
        copy = FactLibrary(dict(self.facts), self.filters, self.shapes, self.registry, self.source_text + extra_text)
        copy.add(defs, where)
        return copy

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.source_text.encode()).hexdigest()[:12]

    def _compile_fact(self, name: str, spec: Any, where: str) -> FactDef:
        if not isinstance(spec, dict):
            raise FactError(f"{where}: must be a mapping")
        if "derive" in spec:
            _expect_keys(spec, {"description", "derive", "params"}, where)
            fn = spec["derive"]
            if fn not in DERIVATIONS:
                raise FactError(f"{where}: unknown derivation {fn!r} (known: {', '.join(sorted(DERIVATIONS))})")
            return DeriveFact(name, str(spec.get("description", "")), fn, dict(spec.get("params") or {}))
        _expect_keys(
            spec,
            {
                "description", "resource", "valueset", "filter", "fields", "answers", "panel", "range", "polarity",
                "reasons", *_SHAPE_KEYS,
            },
            where,
        )  # fmt: skip
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
        panel = spec.get("panel") or []
        panel = tuple(panel) if isinstance(panel, list) else (panel,)
        for vs in panel:
            if vs not in self.registry:
                raise FactError(f"{where}.panel: unknown value set {vs!r}")
        value_range = spec.get("range")
        if value_range is not None:
            if (
                not isinstance(value_range, list)
                or len(value_range) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value_range)
                or value_range[0] > value_range[1]
            ):
                raise FactError(f"{where}.range: expected [min, max] numbers")
            value_range = (float(value_range[0]), float(value_range[1]))
        if (panel or value_range or "polarity" in spec) and rtype != "Observation":
            raise FactError(f"{where}: panel / range / polarity apply to Observation facts only")
        return SelectFact(
            name=name,
            description=str(spec.get("description", "")),
            resource_type=rtype,
            valuesets=valuesets,
            status_filter=status_filter,
            shape=shape,
            fields=fields,
            answers=tuple(spec.get("answers") or ()),
            panel=panel,
            value_range=value_range,
            polarity=self._compile_polarity(spec["polarity"], f"{where}.polarity") if "polarity" in spec else None,
            reasons=_compile_reasons(spec["reasons"], rtype, f"{where}.reasons") if "reasons" in spec else None,
        )

    def _compile_polarity(self, spec: Any, where: str) -> Polarity:
        _expect_keys(
            spec,
            {"positive", "negative", "quantitative", "positive_at_least", "negative_below", "units", "code_asserts"},
            where,
        )
        sets: dict[str, tuple[str, ...]] = {}
        for key in ("positive", "negative"):
            raw = spec.get(key) or []
            values = tuple(raw) if isinstance(raw, list) else (raw,)
            for vs in values:
                if vs not in self.registry:
                    raise FactError(f"{where}.{key}: unknown value set {vs!r}")
            sets[key] = values
        if not sets["positive"] or not sets["negative"]:
            raise FactError(f"{where}: needs both 'positive' and 'negative' answer value sets")
        cutoffs = {}
        for key in ("positive_at_least", "negative_below"):
            value = spec.get(key)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise FactError(f"{where}.{key}: expected a number")
            cutoffs[key] = float(value) if value is not None else None
        quantitative = spec.get("quantitative", False)
        code_asserts = spec.get("code_asserts", False)
        if not isinstance(quantitative, bool) or not isinstance(code_asserts, bool):
            raise FactError(f"{where}: quantitative / code_asserts: expected true or false")
        units = spec.get("units") or []
        if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
            raise FactError(f"{where}.units: expected a list of unit strings")
        return Polarity(
            sets["positive"], sets["negative"], quantitative, units=tuple(units), code_asserts=code_asserts, **cutoffs
        )


_SHAPE_KEYS = ("code", "date", "end", "value")


def _expect_keys(node: Any, allowed: set[str], where: str) -> None:
    if not isinstance(node, dict):
        raise FactError(f"{where}: must be a mapping")
    extra = set(node) - allowed
    if extra:
        raise FactError(f"{where}: unexpected key(s) {', '.join(sorted(extra))}")


_REASON_TYPES = ("Encounter", "Procedure", "MedicationRequest", "MedicationAdministration")


def _compile_reasons(spec: Any, rtype: str, where: str) -> ReasonSources:
    if rtype != "Condition":
        raise FactError(f"{where}: 'reasons' applies to Condition facts only")
    _expect_keys(spec, {"types", "within_days"}, where)
    # Encounters and procedures state diagnoses; medication reasons are allowed but not the default (a failed
    # medication query would otherwise leave every exclusion undetermined)
    types = spec.get("types", ["Encounter", "Procedure"])
    if not isinstance(types, list) or not types or any(t not in _REASON_TYPES for t in types):
        raise FactError(f"{where}.types: a list of {', '.join(_REASON_TYPES)}")
    days = spec.get("within_days")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool) or days < 0):
        raise FactError(f"{where}.within_days: a non-negative integer")
    return ReasonSources(tuple(types), days)


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
        _expect_keys(check, {"path", "in", "not_in", "missing", "uncertain"}, cw)
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
                uncertain=frozenset(check.get("uncertain") or ()),
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
        values = value.values() if isinstance(value, dict) else value
        if not isinstance(values, Iterable) or isinstance(values, str):
            raise FactError(f"{where}: expected a list or mapping of value sets")
        for v in values:
            _check_param("valueset", v, known_facts, registry, where)
    elif kind == "fact":
        if value not in known_facts:
            raise FactError(f"{where}: unknown fact {value!r}")
    elif kind == "facts":
        values = value.values() if isinstance(value, dict) else value
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
    elif kind == "map" and not isinstance(value, dict):
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
    if isinstance(value, dict):
        if "value" in value:
            unit = value.get("unit") or value.get("code") or ""
            return f"{format_value(value.get('value'))} {unit}".strip()
        if value.get("text"):
            return str(value["text"])
        for coding in value.get("coding") or []:
            if isinstance(coding, dict) and (coding.get("display") or coding.get("code")):
                return str(coding.get("display") or coding.get("code"))
    return str(value)[:80]


def numeric(value: Any) -> Any:
    """Numbers from valueQuantity.value / valueInteger as numbers (Synthea writes 17.0 for a PHQ-9)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value
    if isinstance(value, dict) and isinstance(value.get("value"), int | float):
        return value["value"]
    return value


# Statuses of a resource whose reasonCode is not a stated diagnosis (it did not happen, or not yet).
_NOT_A_STATED_REASON = frozenset({"entered-in-error", "cancelled", "not-done", "planned"})


class ObservationCodes(NamedTuple):
    """The codes of an Observation without hasMember that decide whether `readings` can find a result in it:
    its own code and its components' codes (dict concepts only), with the number of their distinct content
    (Observations with the same codes share it: a fact decides once per number, without hashing the codes)."""

    key: int
    own: dict[str, Any] | None
    components: tuple[dict[str, Any], ...]


class FactContext:
    """Computes facts for one (record, order group) evaluation, each at most once."""

    def __init__(self, library: FactLibrary, record: PatientRecord, group: OrderGroup | None = None) -> None:
        self.library = library
        self.registry = library.registry
        self.record = record
        self.group = group
        self.today: date = record.now.date() if isinstance(record.now, datetime) else record.now
        self.strict = False  # set by the engine while it evaluates a conclusion toward authorization
        self._cache: dict[str, Fact] = {}
        self._in_progress: set[str] = set()
        self._concepts: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self._matches: dict[tuple[str, tuple[Any, ...]], CodeMatch | None] = self.registry.match_cache
        if len(self._matches) > MATCH_CACHE_LIMIT:  # bounded: a long-running worker sees many distinct concepts
            self._matches.clear()
        self._concept_keys: dict[int, tuple[Any, tuple[Any, ...]]] = {}
        self._verdicts: dict[tuple[int, int], bool | None] = {}
        self._plan: list[tuple[Resource, ObservationCodes | None]] | None = None
        self._reason_concepts: dict[str, list[tuple[Resource, list[dict[str, Any]]]]] = {}

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
        """The weakest availability of the types (each memoised by the record)."""
        return weakest(self.record.availability(t) for t in resource_types)

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
                found = [c for c in all_values(shape.code, resource) if isinstance(c, dict)]
            self._concepts[key] = found
        return found

    def medication_concepts(self, resource: Resource) -> list[dict[str, Any]]:
        """The drug concepts of a medication resource, following medicationReference through the record."""
        return medication_concepts(resource, lambda ref, holder: self.record.resolve(ref, within=holder))

    def _observation_plan(self) -> list[tuple[Resource, ObservationCodes | None]]:
        """The record's Observations in order, each with the codes that decide whether it can yield a reading
        (its own code and its components' codes) when it has no hasMember, else None (a panel's members are
        resolved through the record: read through `readings` every time)."""
        if self._plan is None:
            plan: list[tuple[Resource, ObservationCodes | None]] = []
            numbers: dict[tuple[Any, ...], int] = {}
            for observation in self.record.of_type("Observation"):
                if observation.get("hasMember"):
                    plan.append((observation, None))
                    continue
                code = observation.get("code")
                own = code if isinstance(code, dict) else None
                parts = [c.get("code") for c in as_list(observation.get("component")) if isinstance(c, dict)]
                inside = tuple(c for c in parts if isinstance(c, dict))
                key = (
                    _concept_key(own) if own is not None else None,
                    tuple(_concept_key(c) for c in inside),
                )
                number = numbers.setdefault(key, len(numbers))
                plan.append((observation, ObservationCodes(number, own, inside)))
            self._plan = plan
        return self._plan

    def verdict(self, status_filter: StatusFilter, resource: Resource) -> bool | None:
        """`status_filter.verdict` of a record resource, computed once per request (several facts share a filter).

        Keyed by the ids of the filter (the library's) and of the resource (the record's): both outlive this context.
        Conditions are seen as the filters see them (`_as_filtered`: abated means resolved).
        """
        key = (id(status_filter), id(resource))
        found = self._verdicts.get(key, _NOT_SET)
        if found is _NOT_SET:
            found = self._verdicts[key] = status_filter.verdict(_as_filtered(resource))
        return found  # type: ignore[return-value]

    def match(self, vs_id: str, concepts: list[dict[str, Any]]) -> CodeMatch | None:
        for concept in concepts:
            # Matches are keyed by content, never by id(): concepts built on the fly (note text) are garbage
            # collected and their ids reused. The content key itself is computed once per concept object: the
            # object is held in `_concept_keys` with its key, so its id cannot be reused while this context lives.
            entry = self._concept_keys.get(id(concept))
            if entry is None or entry[0] is not concept:
                entry = (concept, _concept_key(concept))
                self._concept_keys[id(concept)] = entry
            key = (vs_id, entry[1])
            found = self._matches.get(key, _NOT_SET)
            if found is _NOT_SET:
                found = self._matches[key] = self.registry.get(vs_id).match_concept(concept)
            if found is not None:
                return found  # type: ignore[return-value]
        return None

    def item_for(
        self,
        resource: Resource,
        match: CodeMatch | None,
        *,
        when: date | None = None,
        date_text: str | None = None,
        span: DateSpan | None = None,
        value: Any = None,
        fields: Mapping[str, Any] | None = None,
        codes: Iterable[str] = (),
        note: str | None = None,
        display: str | None = None,
        path: str | None = None,
        certain: bool = True,
        support: Iterable[Evidence] = (),
    ) -> Item:
        """One item with its evidence. `span` (a possibly partial date) sets the item's date and window span;
        `certain=False` keeps the item as evidence that can never satisfy a rule on its own; a `match` made on
        text alone marks the item text-only (it cannot meet a requirement, see rules.FactSource.strict)."""
        text_only = match is not None and match.via == "text"
        if text_only:
            note = "; ".join(n for n in (note, "named only in text, no code") if n)
        if span is not None:
            when, date_text = span.low, date_text or span.text
        evidence = Evidence(
            reference=reference_of(resource),
            date=date_text,
            code=match.label() if match else None,
            display=display or (match.display if match else None),
            value=format_value(value),
            note=note,
            path=path,
        )
        all_fields = {"value": numeric(value), **(fields or {})}  # a "value" in fields wins (e.g. Bounds)
        return Item(
            evidence=evidence,
            date=when,
            fields=all_fields,
            codes=frozenset(codes),
            span=(span.low, span.high) if span is not None and not span.exact else None,
            certain=certain,
            text_only=text_only,
            support=tuple(support),
        )

    def span(self, resource: Resource, paths: Iterable[CompiledPath]) -> tuple[DateSpan | None, str | None]:
        """The first of `paths` that holds a (possibly partial) date, and the path's text."""
        for compiled in paths:
            for value in compiled.values(resource):
                found = parse_span(value)
                if found is not None:
                    return found, compiled.text
        return None, None

    def resolver(self) -> Callable[[Any, Resource], Resource | None]:
        return lambda ref, holder: self.record.resolve(ref, within=holder)

    # -- select facts --------------------------------------------------------------------------------
    def _select(self, definition: SelectFact) -> Fact:
        if definition.resource_type == "Observation":
            return self._select_observations(definition)
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
            status = self.verdict(definition.status_filter, resource) if definition.status_filter else True
            if status is False:
                continue
            span, date_path = self.span(resource, shape.date)
            end_span, _ = self.span(resource, shape.end) if shape.end else (None, None)
            fields: dict[str, Any] = {
                # an end date (abatement) as a (earliest, latest) pair when partial: windows decide at both ends
                "end": (end_span.low if end_span.exact else (end_span.low, end_span.high)) if end_span else None,
                "status": _status_of(_as_filtered(resource)),
            }
            for fname, paths in definition.fields.items():
                fields[fname] = first_value(paths, resource)
            doubts = _doubts(status, match)
            items.append(
                self.item_for(
                    resource,
                    match,
                    span=span,
                    fields=fields,
                    codes=matched_sets,
                    path=date_path,
                    certain=not doubts,
                    note="; ".join(doubts) or None,
                )
            )
        if definition.reasons is not None:
            items.extend(self._stated_reasons(definition, {i.evidence.reference for i in items}))
        return self.make_fact(definition.name, items, definition.reads)

    def _stated_reasons(self, definition: SelectFact, conditions: set[str]) -> list[Item]:
        """Diagnoses of the fact's value sets stated as the reasonCode of other resources (a Condition they
        reference is read as a Condition already), dated by that resource; recent enough for a current fact."""
        from fhir_mappings.reading.dates import first_span  # local: dates is imported lazily elsewhere too

        assert definition.reasons is not None
        paths = {
            "Encounter": ("period.start",),
            "Procedure": ("performedDateTime", "performedPeriod.start"),
            "MedicationRequest": ("authoredOn",),
            "MedicationAdministration": ("effectiveDateTime", "effectivePeriod.start"),
        }
        items: list[Item] = []
        for rtype in definition.reasons.types:
            for resource, concepts in self._stated_reason_concepts(rtype):
                matched = [vs for vs in definition.valuesets if self.match(vs, concepts) is not None]
                if not matched:
                    continue
                span, _ = first_span(resource, paths[rtype])
                window = definition.reasons.within_days
                if window is not None and (span is None or (self.today - span.high).days > window):
                    continue
                match = self.match(matched[0], concepts)
                items.append(
                    self.item_for(
                        resource,
                        match,
                        span=span,
                        fields={"end": None, "status": None},
                        codes=matched,
                        path="reasonCode",
                        note=f"stated as the reason for {rtype}/{resource.get('id')}",
                    )
                )
        return items

    def _stated_reason_concepts(self, rtype: str) -> list[tuple[Resource, list[dict[str, Any]]]]:
        """The record's resources of `rtype` that state a reason (reasonCode concepts) and were not cancelled,
        planned or not done, with those concepts: once per type, every diagnosis fact with reasons reads them."""
        found = self._reason_concepts.get(rtype)
        if found is None:
            found = []
            for resource in self.record.of_type(rtype):
                if resource.get("status") in _NOT_A_STATED_REASON:
                    continue
                concepts = [c for c in as_list(resource.get("reasonCode")) if isinstance(c, dict)]
                if concepts:
                    found.append((resource, concepts))
            self._reason_concepts[rtype] = found
        return found

    def _select_observations(self, definition: SelectFact) -> Fact:
        """Observation facts read every result shape (value[x], components, panel members) through
        `reading.values`; each result found is one item, deduplicated by the Observation that holds it."""
        shape = definition.shape
        resolve = self.resolver()

        def selects(concept: Mapping[str, Any]) -> bool:
            return any(self.match(vs, [concept]) is not None for vs in definition.valuesets)

        def is_panel(concept: Mapping[str, Any]) -> bool:
            return any(self.match(vs, [concept]) is not None for vs in definition.panel)

        items: list[Item] = []
        seen: set[str] = set()
        wanted: dict[int, bool] = {}  # per distinct set of codes: can an Observation with them be read here
        for observation, codes in self._observation_plan():
            if codes is not None:
                # An Observation without hasMember yields a reading only when its code or a component's code is
                # selected, or its code is a panel (`readings` reads nothing else): decided once per distinct set
                # of codes, not per Observation.
                decided = wanted.get(codes.key)
                if decided is None:
                    own = codes.own
                    decided = wanted[codes.key] = (
                        own is not None and (selects(own) or bool(definition.panel and is_panel(own)))
                    ) or any(selects(c) for c in codes.components)
                if not decided:
                    continue
            status = self.verdict(definition.status_filter, observation) if definition.status_filter else True
            if status is False:
                continue
            for reading in readings(observation, selects, resolve, panel=is_panel if definition.panel else None):
                holder = reading.holder
                member = holder is not observation and holder.get("resourceType") == "Observation"
                key = f"{reference_of(holder)}#{reading.path.split('→')[-1]}"
                if key in seen:
                    continue
                seen.add(key)
                holder_status = (
                    self.verdict(definition.status_filter, holder) if member and definition.status_filter else status
                )
                if holder_status is False:
                    continue
                match = self._first_match(definition.valuesets, _code_of(holder, reading.path))
                span = self.span(holder, shape.date)[0] if member else None
                if span is None:
                    span = self.span(observation, shape.date)[0]
                items.append(self._observation_item(definition, observation, reading, match, span, holder_status))
        return self.make_fact(definition.name, items, definition.reads)

    def _first_match(self, valuesets: Iterable[str], concept: Mapping[str, Any] | None) -> CodeMatch | None:
        if not isinstance(concept, dict):
            return None
        for vs in valuesets:
            found = self.match(vs, [concept])
            if found is not None:
                return found
        return None

    def _observation_item(
        self,
        definition: SelectFact,
        observation: Resource,
        reading: Reading,
        match: CodeMatch | None,
        span: DateSpan | None,
        status: bool | None,
    ) -> Item:
        number = reading.number()
        doubts = _doubts(status, match)
        if reading.kind == "absent":
            doubts.append("no result: " + (format_value(reading.raw) or "data absent"))
        if reading.kind == "none" and definition.polarity is None:
            doubts.append("no result recorded")
        if definition.value_range is not None and number is not None:
            low, high = definition.value_range
            n_low, n_high = (number.low, number.high) if isinstance(number, Bounds) else (number, number)
            if n_low < low or n_high > high:
                doubts.append(f"value outside the scale's range {low:g}–{high:g}")
        raw = None if reading.kind in ("absent", "none") else reading.raw
        fields: dict[str, Any] = {
            "value": number if number is not None else raw,  # Bounds stay Bounds: rules compare both ends
            "status": observation.get("status") if isinstance(observation.get("status"), str) else None,
        }
        for fname, paths in definition.fields.items():
            fields[fname] = first_value(paths, reading.holder)
        if definition.answers:
            answer_concepts = [dict(reading.concept)] if reading.concept is not None else []
            fields["answers"] = frozenset(
                vs for vs in definition.answers if answer_concepts and self.match(vs, answer_concepts)
            )
        notes = list(doubts)
        if definition.polarity is not None:
            polarity = self.polarity(definition.polarity, reading)
            fields["positive"] = polarity.value
            said = {True: "positive", False: "negative", None: "undetermined"}[polarity.value]
            notes.insert(0, f"{said}: {polarity.how}")
        code = _code_of(reading.holder, reading.path)
        return self.item_for(
            reading.holder,
            match,
            span=span,
            value=number if number is not None else raw,
            fields=fields,
            codes=[vs for vs in definition.valuesets if self._first_match([vs], code) is not None],
            note="; ".join(notes) or None,
            path=reading.path,
            certain=not doubts,
        )

    def polarity(self, spec: Polarity, reading: Reading) -> PolarityReading:
        def in_sets(sets: tuple[str, ...]) -> CodeTest:
            return lambda concept: any(self.match(vs, [concept]) is not None for vs in sets)

        def answer_words(text: str) -> bool | None:
            said = normalise(text)
            if not said:
                return None
            for sets, answer in ((spec.positive, True), (spec.negative, False)):
                for vs in sets:
                    if said in self.registry.get(vs).normalised_patterns():
                        return answer
            return None

        return read_polarity(
            reading,
            is_positive=in_sets(spec.positive),
            is_negative=in_sets(spec.negative),
            answer_words=answer_words,
            quantitative=spec.quantitative,
            positive_at_least=spec.positive_at_least,
            negative_below=spec.negative_below,
            cutoff_units=spec.units,
            code_asserts=spec.code_asserts,
        )


def _doubts(status: bool | None, match: CodeMatch | None) -> list[str]:
    """Why an item may not be taken as certain: an uncertain status (provisional, preliminary …)."""
    return ["status not confirmed (e.g. provisional, differential, preliminary)"] if status is None else []


def _code_of(resource: Resource, path: str) -> Mapping[str, Any] | None:
    """The code of the element a reading came from: a component's code, else the resource's code."""
    own = path.split("→")[-1]
    if own.startswith("component["):
        index = int(own[len("component[") : own.index("]")])
        components = as_list(resource.get("component"))
        if 0 <= index < len(components) and isinstance(components[index], dict):
            return components[index].get("code")
    code = resource.get("code")
    return code if isinstance(code, dict) else None


def _as_filtered(resource: Resource) -> Resource:
    """A Condition with an abatement and no clinicalStatus is not current: R4 invariant con-4 says an abated
    condition's status is inactive, resolved or remission. Filters see it as resolved."""
    if (
        resource.get("resourceType") == "Condition"
        and resource.get("clinicalStatus") is None
        and any(k.startswith("abatement") and resource.get(k) not in (None, False) for k in resource)
    ):
        return {**resource, "clinicalStatus": {"coding": [{"code": "resolved"}]}}
    return resource


def _concept_key(concept: Mapping[str, Any]) -> tuple[Any, ...]:
    """A hashable identity of a CodeableConcept's content (codings and text)."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    parts = tuple((c.get("system"), c.get("code"), c.get("display")) for c in codings or () if isinstance(c, dict))
    return (*parts, concept.get("text") if isinstance(concept, dict) else None)


def _status_of(resource: Resource) -> str | None:
    status = resource.get("status")
    if isinstance(status, str):
        return status
    clinical = resource.get("clinicalStatus")
    if isinstance(clinical, dict):
        for coding in clinical.get("coding") or []:
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                return coding["code"]
    return None
