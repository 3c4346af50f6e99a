"""Card text follows the data: a number in a card text that restates a threshold must be its placeholder.

A criterion's texts (`title`, `how`, `ask`, `not_met_text`, `case_by_case_text`; a scope rule's `message`) are
read for numbers said as a comparison or a duration — "≥ 15", "at least four", "within the last 30 days",
"1–3 days", "80 %", "6 months", "18 or older". Each is compared with the thresholds the item's own rules use:

- the number *is* one of them (in days, weeks, months or percent as the text says it): it must be written as the
  placeholder (`{phq9_severe}`, `{min_trial_days:weeks}`), otherwise the next threshold change makes it a lie;
- it is none of them although the rules use a threshold of that kind: the text disagrees with the data.

`{=6}` marks a number that only looks like a threshold (a derive parameter, a count the policy names).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fhir_mappings.policy import PLACEHOLDER, format_threshold

TEXT_KEYS = ("title", "how", "ask", "not_met_text", "case_by_case_text", "message")
RULE_KEYS = ("met_when", "not_met_when", "holds_when", "lifted_by", "case_by_case_when", "when")
_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}
_NUM = r"(?:\d+(?:\.\d+)?|" + "|".join(_WORDS) + r")"
_OP = (
    r"(?:≥|≤|>=|<=|>|<|at least|at most|more than|fewer than|less than|no more than|older than|younger than|"
    r"within(?: the (?:last|past))?|in the (?:last|past)|the (?:last|past)|over|under|beyond the|up to)"
)
_UNIT = r"(?:%|days?\b|weeks?\b|months?\b|years?\b|hours?\b|minutes?\b)"
_PATTERNS = (
    # "≥ 15", "at least 42 days", "within the last 7 days", "fewer than four"
    re.compile(rf"(?<![\w.-])(?P<op>{_OP})\s+(?P<num>{_NUM})(?:\s*[–-]\s*(?P<num2>\d+))?\s*(?P<unit>{_UNIT})?", re.I),
    # "1–3 days", "6 weeks", "80 %"
    re.compile(rf"(?<![\w.\-/])(?P<num>\d+(?:\.\d+)?)(?:\s*[–-]\s*(?P<num2>\d+))?\s*(?P<unit>{_UNIT})", re.I),
    # "18 or older", "two or more"
    re.compile(rf"(?<![\w.-])(?P<num>{_NUM})\s+or\s+(?:older|more|above|younger|less|fewer)\b", re.I),
)


@dataclass(frozen=True)
class NumberInText:
    text: str  # as written, e.g. "≥ 15"
    value: float
    unit: str  # "" | "days" | "weeks" | "months" | "years" | "percent"


def _unit(raw: str | None) -> str:
    if not raw:
        return ""
    raw = raw.lower()
    return "percent" if raw == "%" else raw.rstrip("s") + "s"


def _value(raw: str) -> float:
    return float(_WORDS.get(raw.lower(), raw)) if raw.lower() in _WORDS else float(raw)


def numbers_in(text: str) -> Iterator[NumberInText]:
    """Numbers said as comparisons or durations, placeholders removed first."""
    bare = PLACEHOLDER.sub(lambda m: "\0" * len(m.group(0)), text)
    seen: set[int] = set()
    for pattern in _PATTERNS:
        for m in pattern.finditer(bare):
            if m.start("num") in seen:
                continue
            seen.add(m.start("num"))
            unit = _unit(m.groupdict().get("unit"))
            yield NumberInText(m.group(0).strip(), _value(m.group("num")), unit)
            if m.groupdict().get("num2"):
                yield NumberInText(m.group(0).strip(), _value(m.group("num2")), unit)


def threshold_refs(node: Any, out: set[str] | None = None) -> set[str]:
    """Threshold names (`@name`) a rule mentions."""
    out = set() if out is None else out
    if isinstance(node, Mapping):
        for value in node.values():
            threshold_refs(value, out)
    elif isinstance(node, list):
        for value in node:
            threshold_refs(value, out)
    elif isinstance(node, str) and node.startswith("@"):
        out.add(node[1:])
    return out


def _kind(name: str, value: float) -> str:
    """What a threshold counts, from its name (`min_days_after_kap`, `min_hours_after_dosing`) or its value."""
    words = name.split("_")
    for unit in ("days", "hours", "minutes"):
        if unit in words:
            return unit
    if isinstance(value, float) and 0 < value < 1:
        return "percent"
    return ""


def _said_as(number: NumberInText, name: str, value: float) -> str | None:
    """The placeholder that says `number` if it restates threshold `name`, else None."""
    kind = _kind(name, value)
    if kind == "days":
        for unit, placeholder in (
            ("days", f"{{{name}}}"),
            ("weeks", f"{{{name}:weeks}}"),
            ("months", f"{{{name}:months}}"),
        ):
            said = format_threshold(value, "" if unit == "days" else unit)
            if number.unit == unit and said == f"{number.value:g}" and (unit != "weeks" or value % 7 == 0):
                return placeholder
        return None
    if kind == "percent":
        return f"{{{name}:percent}}" if number.unit == "percent" and abs(value * 100 - number.value) < 1e-9 else None
    if kind in ("hours", "minutes"):
        return f"{{{name}}}" if number.unit == kind and number.value == value else None
    return f"{{{name}}}" if number.unit == "" and number.value == value else None


def _compatible(number: NumberInText, name: str, value: float) -> bool:
    kind = _kind(name, value)
    if kind == "days":
        return number.unit in ("days", "weeks", "months")
    if kind in ("percent", "hours", "minutes"):
        return number.unit == kind
    return number.unit == ""


def check_texts(item: Mapping[str, Any], thresholds: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(text key, one-line reason, the words at fault) for every number in the item's texts that restates or
    contradicts a threshold."""
    numeric = {k: v for k, v in thresholds.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    used = {name for key in RULE_KEYS if key in item for name in threshold_refs(item[key])} & set(numeric)
    if not used:
        return
    for key in TEXT_KEYS:
        text = item.get(key)
        if not isinstance(text, str):
            continue
        for number in numbers_in(" ".join(text.split())):
            matches = [(n, p) for n in sorted(used) if (p := _said_as(number, n, numeric[n])) is not None]
            if matches:
                name, placeholder = matches[0]
                yield (
                    key,
                    number.text,
                    (
                        f"{key}: {number.text!r} restates threshold {name} = {format_threshold(numeric[name])}: write "
                        f"{placeholder} so the text follows the threshold"
                    ),
                )
                continue
            related = [n for n in sorted(used) if _compatible(number, n, numeric[n])]
            if related:
                shown = ", ".join(f"{n} = {format_threshold(numeric[n])}" for n in related)
                yield (
                    key,
                    number.text,
                    (
                        f"{key}: {number.text!r} disagrees with the thresholds this rule uses ({shown}); use a "
                        f"placeholder such as {{{related[0]}}}, or {{={number.value:g}}} for a number that is not "
                        "a threshold"
                    ),
                )
