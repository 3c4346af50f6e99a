"""The JSON Schema pass: every structural mistake of a file at once, each as one readable line.

jsonschema's own messages quote whole instances ("{'exists': ...} is not valid under any of the given schemas");
here each error is turned into what an informaticist needs: the key or value at fault, what was expected,
and a "did you mean" for misspelt keys and enum values.
"""

from __future__ import annotations

import datetime
import difflib
from collections.abc import Iterator
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from fhir_mappings.validation import schemas
from fhir_mappings.validation.problems import Collector
from fhir_mappings.validation.yamlpos import LocatedDocument

_TYPE_WORDS = {
    "number": "a number (not a quoted string)",
    "integer": "a whole number",
    "string": "text (quote it)",
    "boolean": "true or false (unquoted)",
    "array": "a list",
    "object": "a mapping",
    "null": "empty",
}


@cache
def validator(name: str) -> Draft202012Validator:
    schema = schemas.SCHEMAS[name]()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def plain(data: Any) -> Any:
    """YAML dates as the ISO text they were written as (JSON Schema knows no date type)."""
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [plain(v) for v in data]
    if isinstance(data, datetime.date | datetime.datetime):
        return data.isoformat()
    return data


def describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (empty)"
    if isinstance(value, str):
        return f"text {value!r}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def label(path: Any) -> str:
    parts = [p for p in path if not isinstance(p, int)]
    return repr(str(parts[-1])) if parts else "the document"


def _leaves(error: ValidationError) -> Iterator[ValidationError]:
    """The errors worth reporting: `if`/`then` and `allOf` wrappers unwrapped to what actually failed."""
    if error.validator in ("allOf",) and error.context:
        for sub in error.context:
            yield from _leaves(sub)
    else:
        yield error


def check_document(doc: LocatedDocument, schema_name: str, out: Collector) -> None:
    data = plain(doc.data)
    for error in validator(schema_name).iter_errors(data):
        for leaf in _leaves(error):
            _report(doc, leaf, out)


def _report(doc: LocatedDocument, error: ValidationError, out: Collector) -> None:
    path = tuple(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    instance = error.instance
    kind = error.validator
    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = sorted(schema.get("properties", {}))
        for key in instance:
            if key in schema.get("properties", {}):
                continue
            hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            where = (
                "; did you mean " + repr(hint[0]) + "?"
                if hint
                else (f"; allowed: {', '.join(allowed)}" if allowed else "")
            )
            out.add(doc, (*path, key), f"unknown key {key!r}{where}", "schema", key=True)
        return
    if kind == "required" and isinstance(instance, dict):
        missing = [k for k in error.validator_value if k not in instance]
        for key in missing:
            out.add(doc, path, f"missing {key!r}{_what_for(key)}", "schema", key=True)
        return
    if kind == "type":
        expected = error.validator_value
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in (expected if isinstance(expected, list) else [expected]))
        out.add(doc, path, f"{label(path)} must be {words}, not {describe(instance)}", "schema")
        return
    if kind == "enum":
        options = [o for o in error.validator_value if isinstance(o, str)]
        hint = difflib.get_close_matches(str(instance), options, n=1, cutoff=0.5) if isinstance(instance, str) else []
        more = f"; did you mean {hint[0]!r}?" if hint else ""
        out.add(doc, path, f"{label(path)}: {describe(instance)} is not one of {', '.join(options)}{more}", "schema")
        return
    if kind == "pattern" and isinstance(instance, str):
        out.add(doc, path, _pattern_message(path, instance, error.validator_value), "schema")
        return
    if kind == "propertyNames":
        name = instance if isinstance(instance, str) else str(instance)
        out.add(doc, path, f"{name!r} is not a valid name: use lower_snake_case", "schema", key=True)
        return
    if kind in ("minItems", "minProperties"):
        out.add(doc, path, f"{label(path)} must not be empty", "schema")
        return
    if kind == "minimum":
        out.add(doc, path, f"{label(path)} must be at least {error.validator_value}, not {instance}", "schema")
        return
    if kind == "minLength":
        out.add(doc, path, f"{label(path)} must not be empty", "schema")
        return
    if kind == "const":
        out.add(doc, path, f"{label(path)} must be {error.validator_value!r}", "schema")
        return
    if kind == "oneOf" and "x-exactly-one" in schema and isinstance(instance, dict):
        options = schema["x-exactly-one"]
        found = [k for k in options if k in instance]
        got = f"found {', '.join(found)}" if found else "found none"
        out.add(doc, path, f"needs exactly one of {', '.join(options)} ({got})", "schema")
        return
    if kind == "anyOf" and "x-discriminators" in schema and isinstance(instance, dict):
        keys = schema["x-discriminators"]
        hint = []
        for key in instance:
            hint += difflib.get_close_matches(str(key), keys, n=1, cutoff=0.6)
        more = f"; did you mean {hint[0]!r}?" if hint else ""
        what = schema.get("description", "").split(":")[0] or "this"
        out.add(
            doc, path, f"{what} needs one of {', '.join(keys)} (has {', '.join(map(str, instance))}){more}", "schema"
        )
        return
    if kind == "anyOf" and {"fallback", "of_policy"} == {
        k for s in error.validator_value for k in s.get("required", [])
    }:
        out.add(doc, path, "a variation names the policy it belongs to: 'fallback' or 'of_policy'", "schema")
        return
    if kind == "not":
        keys = [k for s in error.validator_value.get("anyOf", []) for k in s.get("required", [])]
        present = [k for k in keys if isinstance(instance, dict) and k in instance]
        kind_name = instance.get("kind") if isinstance(instance, dict) else None
        owner = "exclusions" if kind_name == "requirement" else "requirements"
        if present:
            out.add(
                doc,
                (*path, present[0]),
                f"{'/'.join(present)} belong to {owner}, not to a {kind_name}",
                "schema",
                key=True,
            )
        else:
            out.add(doc, path, f"{'/'.join(keys)} not allowed here", "schema")
        return
    if kind == "anyOf":
        description = schema.get("description") or _anyof_description(error.validator_value)
        out.add(doc, path, f"{label(path)} must be {description}, not {describe(instance)}", "schema")
        return
    out.add(doc, path, f"{label(path)}: {error.message[:160]}", "schema")


def _anyof_description(options: list[dict[str, Any]]) -> str:
    words = []
    for option in options:
        if "description" in option:
            words.append(option["description"])
        elif "type" in option:
            words.append(_TYPE_WORDS.get(option["type"], option["type"]))
        elif "const" in option:
            words.append(repr(option["const"]))
    return " or ".join(words) or "of another shape"


def _pattern_message(path: Any, value: str, pattern: str) -> str:
    if pattern == r"\S":
        return f"{label(path)} must not be blank"
    if pattern == schemas.IDENTIFIER:
        return f"{label(path)}: {value!r} is not a valid id (lower_snake_case: letters, digits, underscores)"
    if pattern == schemas.THRESHOLD_REF:
        return f"{label(path)}: {value!r} is not a threshold reference (@name)"
    if pattern.startswith("^https"):
        return f"{label(path)}: {value!r} must be an absolute https:// URL"
    if pattern.startswith("^http"):
        return f"{label(path)}: {value!r} must be an absolute URL"
    if "A-Z][A-Za-z]+" in pattern:
        return f"{label(path)}: {value!r} is not a FHIR resource type name"
    return f"{label(path)}: {value!r} does not have the expected form ({pattern})"


_WHY = {
    "quote": " (every criterion quotes the policy sentence it implements)",
    "ask": " (a requirement says what to document when it is unknown)",
    "met_when": " (a requirement's rule)",
    "holds_when": " (an exclusion's rule)",
    "how": " (say in plain words which FHIR data shows it)",
}


def _what_for(key: str) -> str:
    return _WHY.get(key, "")
