"""Observation results in every shape R4 allows, read once.

A result can sit in `value[x]` (Quantity with a comparator, integer, string, boolean, CodeableConcept, Range,
Ratio …), in a `component` whose code names it, or in a member Observation of a panel (`hasMember`); it may
be qualified by `interpretation` (H / L / POS / NEG …) and a `referenceRange`, or be missing with a
`dataAbsentReason`. `readings()` returns every result of an Observation that a code test selects, each with
the path it was read from, so a fact reads "the PHQ-9 total" the same way whether it is a total-score
Observation, a panel component or a panel member. Nothing here guesses: a value that cannot be read as the
asked type is None.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir_mappings.model import Bounds
from fhir_mappings.record import as_list

Resource = dict[str, Any]
Concept = Mapping[str, Any]
CodeTest = Callable[[Concept], bool]
Resolver = Callable[[Any, Resource], Resource | None]

V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_V2_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v2-0078"
_NUMBER = re.compile(r"^\s*(<=|>=|<|>|≤|≥)?\s*(-?\d+(?:\.\d+)?)\s*$")
_COMPARATOR_ALIASES = {"≤": "<=", "≥": ">="}
_VALUE_KEYS = (
    "valueQuantity",
    "valueInteger",
    "valueString",
    "valueBoolean",
    "valueCodeableConcept",
    "valueRange",
    "valueRatio",
    "valueDateTime",
    "valuePeriod",
    "valueTime",
    "valueSampledData",
)


@dataclass(frozen=True)
class Reading:
    """One result: the raw `value[x]` and where it came from. `holder` is the Observation whose code named it
    (the panel for a component, the member for `hasMember`); `path` is relative to the Observation read."""

    holder: Resource
    path: str
    kind: str  # "Quantity" | "integer" | "string" | "boolean" | "CodeableConcept" | "Range" | … | "absent"
    raw: Any
    interpretation: frozenset[str] = field(default_factory=frozenset)
    reference_range: tuple[float | None, float | None] | None = None

    @property
    def concept(self) -> Concept | None:
        return self.raw if self.kind == "CodeableConcept" and isinstance(self.raw, dict) else None

    @property
    def boolean(self) -> bool | None:
        return self.raw if self.kind == "boolean" and isinstance(self.raw, bool) else None

    @property
    def text(self) -> str | None:
        return self.raw if self.kind == "string" and isinstance(self.raw, str) else None

    @property
    def unit(self) -> str | None:
        if self.kind != "Quantity" or not isinstance(self.raw, dict):
            return None
        unit = self.raw.get("code") or self.raw.get("unit")
        return unit if isinstance(unit, str) else None

    def number(self) -> float | Bounds | None:
        """The numeric value: Quantity (a comparator makes it a one-sided bound), integer, or a string that is a
        plain number ("17", "17.0", "<5"). None for anything else."""
        if self.kind == "integer" and isinstance(self.raw, int) and not isinstance(self.raw, bool):
            return float(self.raw)
        if self.kind == "Quantity" and isinstance(self.raw, dict):
            value = self.raw.get("value")
            if not isinstance(value, int | float) or isinstance(value, bool):
                return None
            return _with_comparator(float(value), self.raw.get("comparator"))
        if self.kind == "string" and isinstance(self.raw, str):
            m = _NUMBER.match(self.raw)
            if m:
                return _with_comparator(float(m.group(2)), _COMPARATOR_ALIASES.get(m.group(1), m.group(1)))
        return None


def _with_comparator(value: float, comparator: Any) -> float | Bounds | None:
    if comparator in (None, ""):
        return value
    if comparator in ("<", "<="):
        return Bounds(float("-inf"), value)
    if comparator in (">", ">="):
        return Bounds(value, float("inf"))
    return None  # "ad" (sufficient to achieve this total quantity) and unknown comparators: not a number


def own_value(observation: Mapping[str, Any], prefix: str = "") -> Reading:
    """The `value[x]` of an Observation or component; an "absent" reading when `dataAbsentReason` says why
    there is none, a "none" reading when it has neither (the code alone may state the finding)."""
    interpretation = interpretation_codes(observation)
    ref_range = reference_range(observation)
    # The holder is the element itself, not a copy: facts memoise per-resource verdicts by id(), and a copy per
    # reading would both cost a status evaluation each and reuse the ids of earlier, collected copies.
    holder = observation if isinstance(observation, dict) else dict(observation)
    for key in _VALUE_KEYS:
        if key in observation and observation[key] is not None:
            kind = "CodeableConcept" if key == "valueCodeableConcept" else key[5:]
            if kind in ("Integer", "String", "Boolean"):
                kind = kind.lower()
            return Reading(holder, prefix + key, kind, observation[key], interpretation, ref_range)
    if observation.get("dataAbsentReason") is not None:
        return Reading(
            holder,
            prefix + "dataAbsentReason",
            "absent",
            observation["dataAbsentReason"],
            interpretation,
            ref_range,
        )
    return Reading(holder, prefix.rstrip(".") or "code", "none", None, interpretation, ref_range)


def readings(
    observation: Resource,
    selects: CodeTest,
    resolve: Resolver | None = None,
    *,
    panel: CodeTest | None = None,
) -> Iterator[Reading]:
    """Every result of `observation` whose code `selects` accepts: its own value (when its code is selected),
    its components' values (component.code selected), and — when its code is a panel (`panel` accepts it, or
    it carries `hasMember`) — the values of member Observations whose code is selected (resolved through
    `resolve`; members that cannot be resolved are skipped: they arrive as Observations of their own)."""
    code = observation.get("code")
    own_selected = isinstance(code, dict) and selects(code)
    if own_selected:
        yield own_value(observation)
    found_inside = False
    for i, component in enumerate(as_list(observation.get("component"))):
        if not isinstance(component, dict):
            continue
        ccode = component.get("code")
        if isinstance(ccode, dict) and selects(ccode):
            reading = own_value(component, f"component[{i}].")
            if reading.kind != "none":
                found_inside = True
                yield Reading(
                    observation,
                    reading.path,
                    reading.kind,
                    reading.raw,
                    reading.interpretation or interpretation_codes(observation),
                    reading.reference_range,
                )
    is_panel = isinstance(code, dict) and panel is not None and panel(code)
    if resolve is not None and (is_panel or observation.get("hasMember")):
        for i, ref in enumerate(as_list(observation.get("hasMember"))):
            member = resolve(ref, observation) if isinstance(ref, dict) else None
            if not isinstance(member, dict) or member is observation:
                continue
            mcode = member.get("code")
            if isinstance(mcode, dict) and selects(mcode):
                reading = own_value(member)
                if reading.kind != "none":
                    found_inside = True
                    yield Reading(
                        member,
                        f"hasMember[{i}]→{reading.path}",
                        reading.kind,
                        reading.raw,
                        reading.interpretation,
                        reading.reference_range,
                    )
    if is_panel and not own_selected and not found_inside:
        # A panel code carrying the result itself (a PHQ-9 "panel" 44249-1 with valueInteger 19, as some
        # EHRs and the HL7 Health Care Surveys IG send it): read its own value.
        reading = own_value(observation)
        if reading.kind not in ("none",):
            yield reading


def interpretation_codes(element: Mapping[str, Any]) -> frozenset[str]:
    """The v3/v2 interpretation codes of an Observation or component, upper-case ("H", "POS", "NEG" …)."""
    codes: set[str] = set()
    for concept in as_list(element.get("interpretation")):
        if not isinstance(concept, dict):
            continue
        for coding in as_list(concept.get("coding")):
            if not isinstance(coding, dict) or not isinstance(coding.get("code"), str):
                continue
            if coding.get("system") in (V3_INTERPRETATION, _V2_INTERPRETATION, None):
                codes.add(coding["code"].strip().upper())
    return frozenset(codes)


def reference_range(element: Mapping[str, Any]) -> tuple[float | None, float | None] | None:
    """(low, high) of the first reference range with a numeric bound."""
    for rng in as_list(element.get("referenceRange")):
        if not isinstance(rng, dict):
            continue
        low = _quantity_number(rng.get("low"))
        high = _quantity_number(rng.get("high"))
        if low is not None or high is not None:
            return low, high
    return None


def _quantity_number(quantity: Any) -> float | None:
    if isinstance(quantity, dict):
        value = quantity.get("value")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def unit_factor(unit: str | None, table: Mapping[str, float], default_unit: str | None = None) -> float | None:
    """The factor that converts `unit` to the table's base unit (case-insensitive, UCUM or common spellings);
    a missing unit uses `default_unit` when given, else None; an unknown unit is None — never assumed."""
    if unit is None or not unit.strip():
        if default_unit is None:
            return None
        unit = default_unit
    key = unit.strip()
    if key in table:
        return table[key]
    lowered = {k.lower(): v for k, v in table.items()}
    return lowered.get(key.lower())


@dataclass(frozen=True)
class PolarityReading:
    """Whether a qualitative result says yes/positive (True), no/negative (False) or cannot be told (None),
    and which part of the result decided it (for the card's evidence note)."""

    value: bool | None
    how: str


_POSITIVE_INTERPRETATION = frozenset({"POS", "DET", "A", "AA", "H", "HH", "HU", "RR", "R"})
_NEGATIVE_INTERPRETATION = frozenset({"NEG", "ND", "N"})
_QUALITATIVE_POSITIVE_INTERPRETATION = frozenset({"POS", "DET", "A", "AA", "RR", "R"})


def read_polarity(
    reading: Reading,
    *,
    is_positive: CodeTest,
    is_negative: CodeTest,
    answer_words: Callable[[str], bool | None],
    quantitative: bool = False,
    positive_at_least: float | None = None,
    negative_below: float | None = None,
    cutoff_units: tuple[str, ...] = (),
    code_asserts: bool = False,
) -> PolarityReading:
    """Every signal the result carries — coded answer, boolean, exact answer word, interpretation, number vs
    cut-offs or reference range — must agree; one signal decides; a conflict or none is undetermined.

    A quantitative result (e.g. serum hCG in mIU/mL) is positive above its reference range or the positive
    cut-off, negative within it or below the negative cut-off, undetermined in between. Free text that is more
    than an answer word is narrative: undetermined here (the caller quotes it)."""
    signals: list[tuple[bool, str]] = []
    if reading.kind == "absent":
        return PolarityReading(None, "no result (dataAbsentReason)")
    if reading.kind == "none" and not reading.interpretation:
        # The code may itself state the finding ("declined SUD treatment", "cleared for ketamine").
        return PolarityReading(True, "stated by the code") if code_asserts else PolarityReading(None, "no result")
    concept = reading.concept
    if concept is not None:
        if is_positive(concept):
            signals.append((True, "coded answer"))
        elif is_negative(concept):
            signals.append((False, "coded answer"))
    if reading.boolean is not None:
        signals.append((reading.boolean, "valueBoolean"))
    if reading.text is not None:
        word = answer_words(reading.text)
        if word is not None:
            signals.append((word, "answer text"))
    positive_codes = _POSITIVE_INTERPRETATION if quantitative else _QUALITATIVE_POSITIVE_INTERPRETATION
    if reading.interpretation & positive_codes:
        signals.append((True, "interpretation " + ",".join(sorted(reading.interpretation & positive_codes))))
    elif reading.interpretation & _NEGATIVE_INTERPRETATION:
        signals.append((False, "interpretation " + ",".join(sorted(reading.interpretation & _NEGATIVE_INTERPRETATION))))
    if quantitative:
        number = reading.number()
        if number is not None:
            signals.extend(_quantitative_signals(reading, number, positive_at_least, negative_below, cutoff_units))
    if not signals:
        return PolarityReading(None, "the result does not say" if reading.text is None else "narrative result")
    values = {v for v, _ in signals}
    how = "; ".join(h for _, h in signals)
    if len(values) > 1:
        return PolarityReading(None, f"conflicting result ({how})")
    return PolarityReading(values.pop(), how)


def _quantitative_signals(
    reading: Reading,
    number: float | Bounds,
    positive_at_least: float | None,
    negative_below: float | None,
    cutoff_units: tuple[str, ...],
) -> list[tuple[bool, str]]:
    low, high = (number.low, number.high) if isinstance(number, Bounds) else (number, number)
    unit = reading.unit
    signals: list[tuple[bool, str]] = []
    if unit is not None and unit.lower() in {u.lower() for u in cutoff_units}:
        if positive_at_least is not None and low >= positive_at_least:
            signals.append((True, f"≥ {positive_at_least:g} {unit}"))
        elif negative_below is not None and high < negative_below:
            signals.append((False, f"< {negative_below:g} {unit}"))
    if reading.reference_range is not None:
        _range_low, range_high = reading.reference_range
        if range_high is not None:
            if low > range_high:
                signals.append((True, f"above the reference range (≤ {range_high:g})"))
            elif high <= range_high:
                signals.append((False, f"within the reference range (≤ {range_high:g})"))
    return signals
