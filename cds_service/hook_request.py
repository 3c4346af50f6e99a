"""Parse and validate an `order-sign` request (CDS Hooks 2.0 §Calling a CDS Service, order-sign v1.0).

The envelope is checked with a JSON Schema (cheap, runs on every call, including the hot path of
non-ketamine orders); the draft orders that the service will actually evaluate get a full FHIR R4
structural check later (`validate_orders_fhir`). Unknown keys are ignored everywhere (CRD: "SHALL
ignore unexpected elements"). Strict mode follows CRD 2.0.1; lenient mode accepts the CDS Hooks
sandbox's quirks (draftOrders Bundle without `type`, orders without `intent`/`requester`, a
hookInstance that is not a UUID).
"""

from __future__ import annotations

import copy
import gc
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple

import fastjsonschema
import jsonschema
import orjson

from cds_service.errors import CRD_RULE, Issue, ServiceError
from fhir_mappings.resource_shapes import shape_problems

HOOK = "order-sign"
# Request resources an order-sign draftOrders Bundle may carry: order-sign 1.0 (Device/Medication/Nutrition/
# Service requests, VisionPrescription) plus what CRD adds (CommunicationRequest, Task).
ORDER_TYPES = (
    "MedicationRequest",
    "ServiceRequest",
    "DeviceRequest",
    "NutritionOrder",
    "VisionPrescription",
    "CommunicationRequest",
    "Task",
)
_UUID = r"^(urn:uuid:)?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_FHIR_ID = r"^[A-Za-z0-9\-\.]{1,64}$"
_USER_ID = r"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-\.]{1,64}$"


def _schema(lenient: bool) -> dict[str, Any]:
    order_required = ["resourceType", "id", "status"] + ([] if lenient else ["intent"])
    bundle_required = ["resourceType", "entry"] + ([] if lenient else ["type"])
    return {
        "type": "object",
        "required": ["hook", "hookInstance", "context"],
        "properties": {
            "hook": {"type": "string", "const": HOOK},
            "hookInstance": {"type": "string", "minLength": 1, **({} if lenient else {"pattern": _UUID})},
            "fhirServer": {"type": "string", "pattern": "^https?://[^\\s]+$"},
            "fhirAuthorization": {
                "type": "object",
                "required": ["access_token", "token_type", "expires_in", "scope", "subject"],
                "properties": {
                    "access_token": {"type": "string", "minLength": 1},
                    "token_type": {"type": "string", "pattern": "^[Bb][Ee][Aa][Rr][Ee][Rr]$"},
                    "expires_in": {"type": "integer"},
                    "scope": {"type": "string"},
                    "subject": {"type": "string"},
                    "patient": {"type": "string"},
                },
            },
            "context": {
                "type": "object",
                "required": ["userId", "patientId", "draftOrders"],
                "properties": {
                    "userId": {"type": "string", "pattern": _USER_ID},
                    "patientId": {"type": "string", "pattern": _FHIR_ID},
                    "encounterId": {"type": "string", "pattern": _FHIR_ID},
                    "draftOrders": {
                        "type": "object",
                        "required": bundle_required,
                        "properties": {
                            "resourceType": {"const": "Bundle"},
                            "type": {"type": "string", "minLength": 1},
                            "entry": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["resource"],
                                    "properties": {
                                        "resource": {
                                            "type": "object",
                                            "required": order_required,
                                            "properties": {
                                                "resourceType": {"type": "string", "enum": list(ORDER_TYPES)},
                                                "id": {"type": "string", "pattern": _FHIR_ID},
                                                "status": {"type": "string", "minLength": 1},
                                                "intent": {"type": "string", "minLength": 1},
                                            },
                                        }
                                    },
                                },
                            },
                        },
                    },
                },
            },
            "prefetch": {"type": "object"},
            "extension": {"type": "object"},
        },
        # CDS Hooks: fhirServer is REQUIRED when fhirAuthorization is present.
        "dependentRequired": {"fhirAuthorization": ["fhirServer"]},
    }


@cache
def _validator(lenient: bool) -> jsonschema.protocols.Validator:
    schema = _schema(lenient)
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    return validator_cls(schema)


@cache
def _fast_validator(lenient: bool) -> Callable[[Any], Any]:
    """The same schema compiled to Python by fastjsonschema (draft-07: `dependentRequired` is `dependencies`).

    Used only to say "valid" quickly on every call; whenever it refuses, the jsonschema validator above gives the
    detailed messages (and the verdict), so a difference could only make a call slower, never change its answer —
    as long as this one is never more lenient, which `tests/reliability/test_fast_json.py` checks.
    """
    schema = copy.deepcopy(_schema(lenient))
    schema["dependencies"] = schema.pop("dependentRequired")
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return fastjsonschema.compile(schema)


def _schema_errors(body: dict[str, Any], lenient: bool) -> list[jsonschema.ValidationError]:
    try:
        _fast_validator(lenient)(body)
    except fastjsonschema.JsonSchemaException:
        return sorted(_validator(lenient).iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
    return []


@dataclass(frozen=True)
class HookRequest:
    """A validated order-sign call. The access token lives only here, in memory, for this call."""

    hook_instance: str
    context: dict[str, Any]
    draft_orders: list[dict[str, Any]]
    fhir_server: str | None = None
    access_token: str | None = field(default=None, repr=False)
    prefetch: dict[str, Any] | None = None
    configuration: dict[str, Any] = field(default_factory=dict)  # davinci-crd.configuration

    @property
    def patient_id(self) -> str:
        return str(self.context["patientId"])

    @property
    def user_id(self) -> str:
        return str(self.context["userId"])


@dataclass(frozen=True)
class JsonLimits:
    """Explicit bounds on what one JSON document may cost to parse and walk.

    Every body the service parses (hook calls, feedback, FHIR server answers, JWT segments) goes through
    `load_json` with limits like these, so no input can exhaust the stack, the CPU or the store downstream.
    """

    max_bytes: int = 8 * 1024 * 1024
    max_depth: int = 64  # nesting of objects/arrays; a Bundle in prefetch with contained resources needs ~15
    max_string_length: int = 1_000_000  # characters of any one string (keys included)
    max_number_length: int = 40  # characters of any one number's text ("1e999999" is refused, not inf)
    max_values: int = 2_000_000  # strings, numbers, literals, objects and arrays in the whole document


class JsonInputError(ValueError):
    """A document refused at the boundary: `status` 400 (not JSON we accept) or 413 (over a limit); PHI-free."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_constant(name: str) -> Any:
    raise JsonInputError(400, f"{name} is not a JSON number")


def load_json(raw: bytes | str, limits: JsonLimits) -> Any:
    """Parse one JSON document within `limits`, or raise JsonInputError; never anything else.

    Deliberate choices: an object with a duplicate key is refused (400: parsers disagree on which value
    wins, which is how signatures and validators get bypassed); NaN/Infinity and numbers that overflow to
    infinity are refused (400: not JSON, and not representable in the answer or the store); a string with a
    lone surrogate is refused (400: not Unicode text); NUL is valid JSON and kept (the audit store
    sanitises it). Size, depth, string and number length and value count over the limit answer 413.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > limits.max_bytes:
        raise JsonInputError(413, f"larger than {limits.max_bytes} bytes")
    if json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"):
        raise JsonInputError(400, "not UTF-8 (RFC 8259: JSON exchanged between systems is UTF-8)")
    fast = _fast_load(raw, limits)
    return fast if fast is not _SLOW_PATH else _exact_load(raw, limits)


def _exact_load(raw: bytes, limits: JsonLimits) -> Any:
    """The reference parse (stdlib json with hooks): decides every document the fast path is not sure of."""

    def number(text: str, convert: Any) -> Any:
        if len(text) > limits.max_number_length:
            raise JsonInputError(413, f"a number longer than {limits.max_number_length} characters")
        value = convert(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise JsonInputError(400, "a number out of range")
        return value

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise JsonInputError(400, "an object with a duplicate key")
        return result

    try:
        document = json.loads(
            raw,
            object_pairs_hook=unique_keys,
            parse_int=lambda text: number(text, int),
            parse_float=lambda text: number(text, float),
            parse_constant=_refuse_constant,
        )
    except JsonInputError:
        raise
    except RecursionError:
        raise JsonInputError(413, f"nested deeper than {limits.max_depth} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JsonInputError(400, f"not valid JSON ({exc.__class__.__name__})") from None
    except ValueError:  # e.g. an encoding json cannot detect
        raise JsonInputError(400, "not valid JSON") from None
    _check_structure(raw, document, limits)
    return document


_SLOW_PATH = object()
_GC_PAUSE_BYTES = 1024 * 1024
# Numbers orjson reads differently from the exact path: an integer of 19+ digits (orjson makes it a float), and a
# number longer than the limit (the exact path refuses it). Looked for in the raw text, strings included (a match
# in a string only costs the exact path), with C-speed byte translation: digits (or number characters) become '#',
# everything else a space, and a run of '#' is searched. Floats are read to the same double by both (correctly
# rounded; the differential tests include the subnormal and overflow edges); an overflow is an orjson error.
_DIGITS = bytes(35 if chr(c) in "0123456789" else 32 for c in range(256))
_NUMBER_CHARS = bytes(35 if chr(c) in "0123456789.eE+-" else 32 for c in range(256))


def _unusual_numbers(raw: bytes, max_number_length: int) -> bool:
    return (
        raw.translate(_DIGITS).find(b"#" * 19) != -1
        or raw.translate(_NUMBER_CHARS).find(b"#" * (max_number_length + 1)) != -1
    )


def _fast_load(raw: bytes, limits: JsonLimits) -> Any:
    """The document parsed by orjson when that provably decides as the exact path does; else `_SLOW_PATH`.

    orjson refuses NaN/Infinity, invalid UTF-8, lone surrogate escapes, a BOM and nesting beyond 1,024: those (and
    any other error) go to the exact path, which refuses them with its own status and reason, and so do an integer
    of 19+ digits (orjson makes it a float) and a number longer than the limit. What orjson accepts and the exact
    path would not (a duplicate key, or over the depth, value or string bound) is found from orjson's own indented
    serialisation of the document (`_checked_by_dump`: C-speed passes over bytes), or, when the raw text has an
    escape those passes cannot see through or the document is too deep to serialise, by a walk of the parsed
    containers (`_checked_by_walk`). Both check in the exact path's order: duplicate, depth, values, strings.
    """
    if _unusual_numbers(raw, limits.max_number_length):
        return _SLOW_PATH
    collect = len(raw) > _GC_PAUSE_BYTES and gc.isenabled()
    if collect:  # a large body makes millions of objects: no collection scans them while they are being built
        gc.disable()
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _SLOW_PATH
    finally:
        if collect:
            gc.enable()
    if _ESCAPE_THE_DUMP_HIDES.search(raw) is None:
        try:
            dump = orjson.dumps(document, option=orjson.OPT_INDENT_2)
        except orjson.JSONEncodeError:  # nested beyond the encoder's 254 levels (the decoder takes 1,024)
            pass
        else:
            return _checked_by_dump(raw, document, dump, limits)
    return _checked_by_walk(raw, document, limits)


# An escaped colon (`\u003a`, `\u003A`) would make the raw text's colon count short of the dump's; a surrogate escape
# (orjson refuses a lone one, a pair is one character) is checked by the exact string walk, as it always was.
_ESCAPE_THE_DUMP_HIDES = re.compile(rb"\\u(?:003[aA]|[dD][89a-fA-F])")
# What `_checked_by_dump` counts in the dump. When it counts several times (a body over the value bound) everything
# else is deleted first: one C pass, then the counts run over about an eighth of the bytes. Colons, newlines and a
# `{` or `[` followed by a newline count the same on both (the deletion cannot make such a pair from a bracket in a
# string: the string's closing quote is kept, and a newline is never inside a string); `{}` and `[]`, counted as an
# upper bound, may only be more.
_NOT_COUNTED = bytes(c for c in range(256) if c not in b'{}[]\n":')


def _checked_by_dump(raw: bytes, document: Any, dump: bytes, limits: JsonLimits) -> Any:
    """`document` (orjson's parse of `raw`) judged from `dump` = orjson.dumps(document, option=OPT_INDENT_2).

    What orjson writes (pinned by tests/reliability/test_json_dump_checks.py): `"key": value`; in a string, `"`,
    `\\` and control characters escaped and every other character as itself (`:` included, a newline never); each
    member of an object or array on a line of its own, indented two spaces per level of its container (the top one
    is level 1), a non-empty container's closing bracket on a line of its own, an empty one as `{}` or `[]`, and no
    final newline. So a newline byte is always structural, and from `raw` having no escaped colon (the caller's check):

    - duplicate keys. A `:` byte outside a string ends a key, one per key; inside a string it is a colon character
      (an escaped one would be `\\u003a`). So `raw` holds K_raw + C_raw colons and the dump K + C, for the K_raw keys
      written and the K kept, and the colon characters C_raw in the strings written and C in those kept. The kept
      strings are some of the written ones, so K_raw >= K and C_raw >= C, and K_raw = K exactly when no key was
      written twice: equal counts prove no duplicate; unequal ones go to the exact path, which decides.
    - depth. A container at level L >= 2 is a member of one at level L - 1, so it starts a line indented 2(L - 1)
      spaces: without a newline followed by 2 * max_depth spaces, nothing is deeper than max_depth (>= 1). With
      one (a member at exactly max_depth levels has that indent too) the walk measures the depth.
    - values. The exact path's figure, structural commas + containers + 1, is V + E for V values and E empty
      containers (the commas are V - 1 - N for N non-empty ones); see `_values_within`. Each comma takes a byte
      and each container two, so it is at most len(raw): a body no longer than max_values needs no count.
    - strings. A string lies within one line, and more than max_string_length characters take more bytes than
      that: the strings are walked only when the body is longer than the bound and the dump may have such a line.
    """
    counted = dump.translate(None, _NOT_COUNTED) if len(raw) > limits.max_values else dump
    if raw.count(b":") != counted.count(b":"):
        return _SLOW_PATH
    figures: _Figures | None = None
    if limits.max_depth < 1 or dump.find(b"\n" + b"  " * limits.max_depth) != -1:
        figures = _walk_figures(document)
        if figures.deepest > limits.max_depth:
            raise JsonInputError(413, f"nested deeper than {limits.max_depth} levels")
    if len(raw) > limits.max_values:
        within = _values_within(counted, limits.max_values)
        if within is None:
            figures = figures or _walk_figures(document)
            within = figures.value_bound <= limits.max_values
        if not within:
            raise JsonInputError(413, f"more than {limits.max_values} values")
    if len(raw) > limits.max_string_length:
        long_line = _may_hold_long_line(dump, limits.max_string_length)
        if long_line or (long_line is None and _may_hold_long_string(raw, limits.max_string_length)):
            _check_walk(document, limits)
    return document


def _values_within(counted: bytes, max_values: int) -> bool | None:
    """Whether V + E <= max_values (see `_checked_by_dump`), counted on the indented dump or on its bytes kept by
    `_NOT_COUNTED`; None when the counts cannot tell (only with empty containers or brackets in strings near the bound).

    Every newline starts one of the V - 1 members or one of the N closing brackets, so V = newlines + 1 - N, and N
    is the count of `{` or `[` followed by a newline (nothing else is: a newline is never inside a string). E is
    at most the count of `{}` and `[]`, which may also be found in strings; and E <= V <= newlines + 1.
    """
    newlines = counted.count(b"\n")
    if 2 * (newlines + 1) <= max_values:
        return True
    values = newlines + 1 - counted.count(b"{\n") - counted.count(b"[\n")
    if values > max_values:
        return False
    if values + counted.count(b"{}") + counted.count(b"[]") <= max_values:
        return True
    return None


_MAX_LINE_PROBES = 4096


def _may_hold_long_line(dump: bytes, max_length: int) -> bool | None:
    """True when some line of `dump` may be longer than `max_length` bytes; None when too costly to tell this way.

    A run of more than max_length bytes without a newline covers a whole block [kB, (k+1)B) for B = (max_length +
    1) // 2 (its first block start is at most B - 1 bytes in, and 2B - 1 <= max_length + 1): so when every whole
    block holds a newline, no line is that long. One C-level search per block (a few dozen for a large body).
    """
    block = (max_length + 1) // 2
    if block < 1 or len(dump) // block > _MAX_LINE_PROBES:
        return None
    return any(dump.find(b"\n", start, start + block) == -1 for start in range(0, len(dump) - block + 1, block))


class _Figures(NamedTuple):
    """What the exact path measures of a document's structure, counted on the parsed containers."""

    keys: int
    value_bound: int  # the exact path's: structural commas + containers + 1
    deepest: int


def _walk_figures(document: Any) -> _Figures:
    """Keys, the value bound and the depth, one nesting level at a time (its depth is the loop count)."""
    keys = commas = containers = deepest = 0
    level = [document] if type(document) is dict or type(document) is list else []
    while level:
        deepest += 1
        deeper: list[Any] = []
        for value in level:
            size = len(value)
            commas += size - 1 if size else 0
            if type(value) is dict:
                keys += size
                value = value.values()
            deeper.extend([v for v in value if type(v) is dict or type(v) is list])
        containers += len(level)
        level = deeper
    return _Figures(keys=keys, value_bound=commas + containers + 1, deepest=deepest)


def _checked_by_walk(raw: bytes, document: Any, limits: JsonLimits) -> Any:
    """`document` judged from a walk of its containers and the raw bytes, for a body `_checked_by_dump` cannot take.

    - a duplicate key: every key ends with `"`, optional whitespace and `:`; such sequences in the raw text are at
      least as many as the keys written (a string may contain one too), so as many as the parsed objects hold
      members means no key was written twice;
    - depth and the value bound are the exact path's own figures (bracket nesting; commas + containers + 1),
      computed from the containers; string length and lone surrogates are checked exactly as before.
    """
    figures = _walk_figures(document)
    # Whitespace deleted everywhere (inside strings too, which can only add matches): `":` then ends every key.
    if raw.translate(None, b" \t\r\n").count(b'":') != figures.keys:
        return _SLOW_PATH
    if figures.deepest > limits.max_depth:
        raise JsonInputError(413, f"nested deeper than {limits.max_depth} levels")
    if figures.value_bound > limits.max_values:
        raise JsonInputError(413, f"more than {limits.max_values} values")
    if _may_hold_long_string(raw, limits.max_string_length) or _SURROGATE_ESCAPE.search(raw):
        _check_walk(document, limits)
    return document


def _may_hold_long_string(raw: bytes, max_length: int) -> bool:
    """True when some string token's raw text may be longer than `max_length` (then the exact walk decides).

    Without an escaped quote in the document, a string's raw text is the run of non-quote bytes after its opening
    quote, so one C-level search for a quote followed by more than `max_length` non-quote bytes finds it (a long
    run between strings, e.g. a long array of numbers, only costs the walk). Otherwise every token is measured.
    """
    if len(raw) <= max_length:
        return False
    if b'\\"' not in raw:
        return _long_run(max_length).search(raw) is not None
    return any(m.end() - m.start() - 2 > max_length for m in _STRING_TOKEN.finditer(raw))


@cache
def _long_run(max_length: int) -> re.Pattern[bytes]:
    return re.compile(rb'"[^"]{%d}' % (max_length + 1))


_STRING_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: 3x faster than an alternation
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_BRACKETS_ONLY = bytes(c for c in range(256) if c not in b"[]{}")
_DEPTH_STEP = [0] * 256
_DEPTH_STEP[ord("[")] = _DEPTH_STEP[ord("{")] = 1
_DEPTH_STEP[ord("]")] = _DEPTH_STEP[ord("}")] = -1


def _check_structure(raw: bytes, document: Any, limits: JsonLimits, skeleton: bytes | None = None) -> None:
    """Depth, value count, string length and lone surrogates of a document json.loads accepted.

    Fast path on the bytes (regular expressions and C-level counting, no walk of the parsed value): with the
    strings cut out, what is left is the structure, whose bracket nesting is the depth and whose commas bound
    the number of values. Only when a string might be over the limit or a surrogate escape appears is the
    parsed document walked exactly.
    """
    if skeleton is None:
        skeleton = _STRING_TOKEN.sub(b'""', raw)
    brackets = skeleton.translate(None, _BRACKETS_ONLY)
    if brackets and max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets))) > limits.max_depth:
        raise JsonInputError(413, f"nested deeper than {limits.max_depth} levels")
    if skeleton.count(b",") + len(brackets) // 2 + 1 > limits.max_values:  # an upper bound of the value count
        raise JsonInputError(413, f"more than {limits.max_values} values")
    long_string = len(raw) > limits.max_string_length and any(
        m.end() - m.start() - 2 > limits.max_string_length for m in _STRING_TOKEN.finditer(raw)
    )
    if long_string or _SURROGATE_ESCAPE.search(raw):
        _check_walk(document, limits)


def _check_walk(document: Any, limits: JsonLimits) -> None:
    """Depth, string length, lone surrogates and value count, in one iterative pass (no recursion)."""
    max_depth, max_string = limits.max_depth, limits.max_string_length
    stack: list[tuple[Any, int]] = [(document, 1)]
    values = 0
    while stack:
        value, depth = stack.pop()
        values += 1
        if isinstance(value, str):
            _check_string(value, max_string)
        elif isinstance(value, dict | list):
            if depth > max_depth:
                raise JsonInputError(413, f"nested deeper than {max_depth} levels")
            is_object = isinstance(value, dict)
            for key, item in value.items() if is_object else enumerate(value):
                if is_object:
                    _check_string(key, max_string)
                if isinstance(item, dict | list):
                    stack.append((item, depth + 1))
                elif isinstance(item, str):
                    values += 1
                    _check_string(item, max_string)
                else:
                    values += 1
        if values > limits.max_values:
            raise JsonInputError(413, f"more than {limits.max_values} values")


def _check_string(text: str, max_length: int) -> None:
    if len(text) > max_length:
        raise JsonInputError(413, f"a string longer than {max_length} characters")
    if not text.isascii() and _SURROGATE.search(text):
        raise JsonInputError(400, "a string with a lone surrogate (not Unicode text)")


def parse_json(raw: bytes, limits: JsonLimits | None = None) -> Any:
    """The request body as JSON: 400 when it is not JSON we accept (CRD: 400 = not parsable), 413 over a limit."""
    try:
        return load_json(raw, limits or JsonLimits())
    except JsonInputError as exc:
        code = "too-costly" if exc.status == 413 else "structure"
        raise ServiceError(exc.status, f"request body {exc.reason}", code=code) from None


def normalise_body(body: Any, *, lenient: bool) -> Any:
    """The one place a parsed request body is adjusted before validation: in `--lenient` mode the tolerances
    of real clients (cds_service/tolerances.py), applied once; strict mode takes the body as sent."""
    if not lenient:
        return body
    from cds_service.tolerances import apply_tolerances  # only lenient deployments pay for it

    return apply_tolerances(body)


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "$"


def _message(error: jsonschema.ValidationError) -> str:
    """Messages that describe the rule broken without echoing (possibly PHI) values."""
    v = error.validator
    where = _path(error)
    if v == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        return f"{where}: missing required field {missing[0] if missing else ''}".strip()
    if v == "dependentRequired":
        return "fhirServer is required when fhirAuthorization is present"
    if v == "const":
        return f"{where}: must be {error.validator_value!r}"
    if v == "enum":
        return f"{where}: must be one of {', '.join(map(str, error.validator_value))}"
    if v == "type":
        return f"{where}: must be of JSON type {error.validator_value}"
    if v == "pattern":
        return f"{where}: has an invalid format"
    if v == "minLength":
        return f"{where}: must not be empty"
    return f"{where}: invalid ({v})"


def validate_request(body: Any, *, lenient: bool) -> HookRequest:
    """Check the envelope; 400 if the body is not an object, 422 listing every problem otherwise."""
    if not isinstance(body, dict):
        raise ServiceError(400, "request body must be a JSON object", code="structure")
    errors = _schema_errors(body, lenient)
    issues = [Issue(diagnostics=_message(e), expression=_path(e)) for e in errors]
    context = body.get("context") if isinstance(body.get("context"), dict) else {}
    bundle = context.get("draftOrders") if isinstance(context.get("draftOrders"), dict) else {}
    entries = bundle.get("entry") if isinstance(bundle.get("entry"), list) else []
    orders = [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
    if not issues:
        issues.extend(_shape_issues(orders))
    if not issues:
        issues.extend(_semantic_issues(body, context, orders, lenient))
    if issues:
        raise ServiceError(422, issues[:20])
    fhir_auth = body.get("fhirAuthorization") or {}
    extension = body.get("extension") if isinstance(body.get("extension"), dict) else {}
    configuration = extension.get("davinci-crd.configuration")
    return HookRequest(
        hook_instance=body["hookInstance"],
        context=context,
        draft_orders=orders,
        fhir_server=body.get("fhirServer"),
        access_token=fhir_auth.get("access_token"),
        prefetch=body.get("prefetch"),
        configuration=configuration if isinstance(configuration, dict) else {},
    )


def _shape_issues(orders: list[dict[str, Any]]) -> list[Issue]:
    """Every draft order must have the JSON shape R4 defines before triage reads it (a `code` that is a
    string, a `coding` that is an object, a single value where R4 has an array): 422, naming the element."""
    issues: list[Issue] = []
    for index, order in enumerate(orders):
        where = f"context.draftOrders.entry[{index}].resource"
        issues.extend(
            Issue(f"{where}: {problem}", code="structure", expression=where) for problem in shape_problems(order)
        )
    return issues


def _semantic_issues(
    body: dict[str, Any], context: dict[str, Any], orders: list[dict[str, Any]], lenient: bool
) -> list[Issue]:
    """Rules JSON Schema cannot express: ids unique, subject is the context patient, requester present."""
    issues: list[Issue] = []
    seen: set[str] = set()
    patient_ref = f"Patient/{context['patientId']}"
    for index, order in enumerate(orders):
        where = f"context.draftOrders.entry[{index}].resource"
        key = f"{order['resourceType']}/{order['id']}"
        if key in seen:
            issues.append(Issue(f"{where}: duplicate draft order id {key}", expression=where, rule=CRD_RULE))
        seen.add(key)
        subject = order.get("subject") or order.get("patient")
        ref = subject.get("reference") if isinstance(subject, dict) else None
        ref = ref if isinstance(ref, str) else None
        if ref is not None and not (ref == patient_ref or ref.endswith("/" + patient_ref)):
            issues.append(Issue(f"{where}.subject: does not reference context.patientId", expression=where))
        if not lenient and order["resourceType"] in ("MedicationRequest", "ServiceRequest"):
            if not isinstance(order.get("requester"), dict):
                missing = f"{where}.requester: missing (required by CRD order profiles)"
                issues.append(Issue(missing, expression=where, rule=CRD_RULE))
            if ref is None:
                issues.append(Issue(f"{where}.subject: missing", expression=where))
    return issues


_FHIR_MODELS: dict[str, Any] = {}


def _fhir_model(resource_type: str) -> Any:
    """The fhir.resources R4B model class (R4B = R4 for every request resource here), imported once."""
    if resource_type not in _FHIR_MODELS:
        module = __import__(f"fhir.resources.R4B.{resource_type.lower()}", fromlist=[resource_type])
        _FHIR_MODELS[resource_type] = getattr(module, resource_type)
    return _FHIR_MODELS[resource_type]


def warm_up_fhir_models() -> None:
    """Import the models at start-up so the first clinician's request does not pay for it."""
    for resource_type in ("MedicationRequest", "ServiceRequest"):
        _fhir_model(resource_type)


def validate_orders_fhir(orders: list[dict[str, Any]], indexes: dict[str, int]) -> None:
    """Full FHIR R4 structural validation of the draft orders the service will evaluate (422 on failure).

    Only the few orders that passed triage are validated (~0.3 ms each): a malformed ketamine order
    must be refused with a clear message rather than evaluated on half-parsed data.
    """
    issues: list[Issue] = []
    for order in orders:
        key = f"{order['resourceType']}/{order['id']}"
        where = f"context.draftOrders.entry[{indexes.get(key, 0)}].resource"
        try:
            _fhir_model(order["resourceType"]).model_validate(order)
        except (ValueError, TypeError) as exc:
            errors = getattr(exc, "errors", None)
            details = errors() if callable(errors) else []
            for err in details[:5] or [{"loc": (), "msg": "invalid FHIR resource"}]:
                loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
                msg = str(err.get("msg", "invalid")).split("\n")[0][:160]
                issues.append(Issue(f"{where}{'.' + loc if loc else ''}: {msg}", expression=where))
    if issues:
        raise ServiceError(422, issues[:20])
