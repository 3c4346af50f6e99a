"""JSON Schemas of every mapping file, built here and published in `fhir_mappings/schemas/`.

The file structures are written out by hand (they change when a loader changes); the parameters of derive
facts are generated from the live registry (`fhir_mappings.facts.DERIVATIONS`, whose specs declare each
parameter's kind), so a new derive function or parameter is in the schema without editing this file.
`ketamine-cds mappings schemas --write` regenerates the published files; a test keeps them current.

The rule language uses `if`/`then` on the discriminating key (`exists`, `count`, …) rather than `oneOf`,
so both a YAML language server and `mappings validate` report the mistake inside the rule that has it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fhir_mappings import derive as _derive  # noqa: F401  (registers the derive functions)
from fhir_mappings import mappings as _mappings
from fhir_mappings import policy as _policy
from fhir_mappings import queries as _queries
from fhir_mappings import valuesets as _valuesets
from fhir_mappings.facts import DERIVATIONS
from fhir_mappings.model import CriterionKind, Outcome
from fhir_mappings.orders import OrderKind

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_ID = "https://ketamine-cds.example.org/schemas/"
COMPARISONS = (">=", ">", "<=", "<", "==", "!=")
FIELD_OPERATORS = (*COMPARISONS, "in", "is", "present", "contains")
VERIFICATION = ("verified", "secondary", "unverified", "local-default", "gap")
IDENTIFIER = "^[a-z][a-z0-9_]*$"
THRESHOLD_REF = "^@[a-z][a-z0-9_]*$"

_TEXT = {"type": "string", "pattern": r"\S"}  # a non-blank text
_NAME = {"type": "string", "pattern": IDENTIFIER}
_THRESHOLD = {"type": "string", "pattern": THRESHOLD_REF, "description": "a policy threshold, written @name"}
_JSONPATH = {"type": "string", "minLength": 1, "description": "a jsonpath-ng expression"}
_JSONPATHS = {
    "anyOf": [_JSONPATH, {"type": "array", "items": _JSONPATH, "minItems": 1}],
    "description": "a jsonpath-ng expression, or a list of them (the first that yields wins)",
}
_STRINGS = {"type": "array", "items": _TEXT}
_LINK = {
    "type": "object",
    "properties": {"label": _TEXT, "url": {"type": "string", "pattern": "^https?://"}},
    "required": ["label", "url"],
    "additionalProperties": False,
}
_IDENTIFIER_VALUE = {
    "type": "object",
    "properties": {"system": _TEXT, "value": _TEXT},
    "required": ["system", "value"],
    "additionalProperties": False,
}


def _loader_keys(module: Any, name: str) -> frozenset[str]:
    """The keys a loader accepts (its own constant), so the schema never refuses what the service would load."""
    return frozenset(getattr(module, name, ()) or ())


def _accepting(properties: dict[str, Any], module: Any, name: str) -> dict[str, Any]:
    """`properties` plus any key the loader accepts that is not described here yet (allowed, not typed)."""
    for key in sorted(_loader_keys(module, name) - set(properties)):
        properties[key] = {"description": "accepted by the loader; not yet described in this schema"}
    return properties


def _only(key: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {key: schema},
        "required": [key],
        "additionalProperties": False,
        "description": description,
    }


def _discriminated(branches: dict[str, dict[str, Any]], what: str) -> dict[str, Any]:
    """An object that is one of several shapes, told apart by which key it has (first listed wins)."""
    keys = list(branches)
    all_of = []
    for i, key in enumerate(keys):
        earlier = keys[:i]
        condition: dict[str, Any] = {"required": [key]}
        if earlier:
            condition["not"] = {"anyOf": [{"required": [k]} for k in earlier]}
        all_of.append({"if": condition, "then": branches[key]})
    return {
        "type": "object",
        "minProperties": 1,
        "anyOf": [{"required": [k]} for k in keys],
        "allOf": all_of,
        "description": f"{what}: one of {', '.join(keys)}",
        "x-discriminators": keys,
    }


def _exactly_one(keys: tuple[str, ...]) -> dict[str, Any]:
    return {"oneOf": [{"required": [k]} for k in keys], "x-exactly-one": list(keys)}


def rule_language_defs() -> dict[str, Any]:
    """`$defs` for rules (on facts) and conditions (on one item of a fact) — see rules.py."""
    cond_ref = {"$ref": "#/$defs/condition"}
    rule_ref = {"$ref": "#/$defs/rule"}
    count_value = {"anyOf": [{"type": "integer"}, _THRESHOLD]}
    days = {"anyOf": [{"type": "integer", "minimum": 0}, _THRESHOLD]}
    absent = {"enum": ["unknown", False, "false"], "description": "'unknown': no item means unknown, not false"}
    field_cond = {
        "type": "object",
        "properties": {
            "field": _TEXT,
            **{op: {} for op in FIELD_OPERATORS},
            "in": {"anyOf": [{"type": "array"}, _THRESHOLD]},
            "present": {"type": "boolean"},
        },
        "required": ["field"],
        "additionalProperties": False,
        **_exactly_one(FIELD_OPERATORS),
    }
    condition = _discriminated(
        {
            "all": _only("all", {"type": "array", "items": cond_ref, "minItems": 1}, "every condition holds"),
            "any": _only("any", {"type": "array", "items": cond_ref, "minItems": 1}, "some condition holds"),
            "not": _only("not", cond_ref, "the condition does not hold"),
            "field": field_cond,
            "within_days": {
                "type": "object",
                "properties": {"within_days": days, "of": _TEXT},
                "additionalProperties": False,
            },
            "older_than_days": {
                "type": "object",
                "properties": {"older_than_days": days, "of": _TEXT},
                "additionalProperties": False,
            },
            "code_in": _only("code_in", _NAME, "the item's code is in the value set"),
        },
        "a condition on one item",
    )

    def fact_rule(key: str, extra: dict[str, Any], required: tuple[str, ...] = (), ops: tuple[str, ...] = ()) -> Any:
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {key: {**_NAME, "description": "a fact name"}, "where": cond_ref, **extra},
            "required": [key, *required],
            "additionalProperties": False,
        }
        if ops:
            schema.update(_exactly_one(ops))
        return schema

    after = {
        "type": "object",
        "properties": {"fact": _NAME, "where": cond_ref},
        "required": ["fact"],
        "additionalProperties": False,
    }
    rule = _discriminated(
        {
            "all": _only("all", {"type": "array", "items": rule_ref, "minItems": 1}, "every rule is true"),
            "any": _only("any", {"type": "array", "items": rule_ref, "minItems": 1}, "some rule is true"),
            "not": _only("not", rule_ref, "the rule is false"),
            "exists": fact_rule(
                "exists",
                {
                    "absent": absent,
                    "after": {
                        "anyOf": [after, {"type": "array", "items": after, "minItems": 1}],
                        "description": "items dated on or after the latest item of another fact (or of several)",
                    },
                },
            ),
            "count": fact_rule("count", {op: count_value for op in COMPARISONS}, ops=COMPARISONS),
            "distinct": fact_rule(
                "distinct", {"field": _TEXT, **{op: count_value for op in COMPARISONS}}, ("field",), COMPARISONS
            ),
            "latest": fact_rule("latest", {"then": cond_ref, "absent": absent}, ("then",)),
            "value": fact_rule("value", {op: {} for op in (*COMPARISONS, "is")}, ops=(*COMPARISONS, "is")),
        },
        "a rule",
    )
    return {"rule": rule, "condition": condition}


_PARAM_KINDS: dict[str, dict[str, Any]] = {
    "valueset": {**_NAME, "description": "a value set id"},
    "valuesets": {
        "anyOf": [{"type": "array", "items": _NAME}, {"type": "object", "additionalProperties": _NAME}],
        "description": "value set ids: a list, or label -> value set id",
    },
    "fact": {**_NAME, "description": "a fact name"},
    "facts": {
        "anyOf": [{"type": "array", "items": _NAME}, {"type": "object", "additionalProperties": _NAME}],
        "description": "fact names: a list, or label -> fact name",
    },
    "int": {"type": "integer"},
    "number": {"type": "number"},
    "str": {"type": "string"},
    "map": {"type": "object"},
    "any": {},
}


def derive_param_schemas() -> list[dict[str, Any]]:
    """One `if derive == NAME then params: {...}` per registered derivation, from its declared kinds."""
    branches = []
    for name in sorted(DERIVATIONS):
        spec = DERIVATIONS[name]
        params = {key: _PARAM_KINDS.get(kind, {}) for key, kind in spec.params.items()}
        required = sorted(set(spec.params) - set(spec.optional))
        params_schema: dict[str, Any] = {"type": "object", "properties": params, "additionalProperties": False}
        then: dict[str, Any] = {"properties": {"params": params_schema}}
        if required:
            params_schema["required"] = required
            then["required"] = ["params"]
        doc = (spec.function.__doc__ or "").strip().split("\n\n")[0]
        branches.append(
            {
                "if": {"properties": {"derive": {"const": name}}, "required": ["derive"]},
                "then": {**then, "description": " ".join(doc.split())},
            }
        )
    return branches


def fact_defs() -> dict[str, Any]:
    select = {
        "type": "object",
        "properties": {
            "description": {"type": "string"},
            "resource": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$", "description": "the resource type read"},
            "valueset": {"anyOf": [_NAME, {"type": "array", "items": _NAME, "minItems": 1}]},
            "filter": _NAME,
            "fields": {"type": "object", "additionalProperties": _JSONPATHS},
            "answers": {"type": "array", "items": _NAME},
            "code": _JSONPATHS,
            "date": _JSONPATHS,
            "end": _JSONPATHS,
            "value": _JSONPATHS,
            "panel": {
                "anyOf": [_NAME, {"type": "array", "items": _NAME}],
                "description": "Observation: value sets of panel codes whose components / members hold the result",
            },
            "range": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 2,
                "maxItems": 2,
                "description": "Observation: [min, max] a valid result lies in",
            },
            "polarity": {
                "type": "object",
                "properties": {
                    "positive": {"anyOf": [_NAME, {"type": "array", "items": _NAME, "minItems": 1}]},
                    "negative": {"anyOf": [_NAME, {"type": "array", "items": _NAME, "minItems": 1}]},
                    "quantitative": {"type": "boolean"},
                    "positive_at_least": {"type": "number"},
                    "negative_below": {"type": "number"},
                    "units": {"type": "array", "items": {"type": "string"}},
                    "code_asserts": {"type": "boolean"},
                },
                "required": ["positive", "negative"],
                "additionalProperties": False,
                "description": "Observation: how a qualitative result reads (answer value sets, cut-offs)",
            },
            "reasons": {
                "type": "object",
                "properties": {
                    "types": {
                        "type": "array",
                        "items": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"},
                        "minItems": 1,
                    },
                    "within_days": {"type": "integer", "minimum": 0},
                },
                "additionalProperties": False,
                "description": "Condition: also read diagnoses stated as the reason of an encounter, procedure, ...",
            },
        },
        "required": ["resource", "valueset"],
        "additionalProperties": False,
        "description": "a select fact: resources of one type whose code is in a value set",
    }
    derive = {
        "type": "object",
        "properties": {
            "description": {"type": "string"},
            "derive": {"enum": sorted(DERIVATIONS), "description": "a derive function (fhir_mappings.facts)"},
            "params": {"type": "object"},
        },
        "required": ["derive"],
        "additionalProperties": False,
        "allOf": derive_param_schemas(),
        "description": "a derive fact: a named function with parameters",
    }
    return {
        "fact": {
            "type": "object",
            "if": {"required": ["derive"]},
            "then": {"$ref": "#/$defs/derive_fact"},
            "else": {"$ref": "#/$defs/select_fact"},
        },
        "select_fact": select,
        "derive_fact": derive,
    }


def _document(name: str, title: str, schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"$schema": DIALECT, "$id": BASE_ID + f"{name}.schema.json", "title": title, **schema}
    if defs:
        doc["$defs"] = defs
    return doc


def policy_schema() -> dict[str, Any]:
    rule_ref = {"$ref": "#/$defs/rule"}
    text_with_thresholds = {**_TEXT, "description": "text; numbers that restate a threshold are written {name}"}
    criterion = {
        "type": "object",
        "properties": _accepting(
            {
                "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
                "kind": {"enum": [k.value for k in CriterionKind]},
                "title": _TEXT,
                "quote": {**_TEXT, "description": "the policy sentence this criterion implements"},
                "how": text_with_thresholds,
                "phases": {"type": "array", "items": _TEXT, "minItems": 1},
                "met_when": rule_ref,
                "not_met_when": rule_ref,
                "holds_when": rule_ref,
                "lifted_by": rule_ref,
                "case_by_case_when": rule_ref,
                "ask": text_with_thresholds,
                "not_met_text": text_with_thresholds,
                "case_by_case_text": text_with_thresholds,
                "clearance": _TEXT,
                "ask_parts": {
                    "type": "array",
                    "description": "parts of a requirement: the card asks only for parts whose met_when is not true",
                    "items": {
                        "type": "object",
                        "properties": {"ask": text_with_thresholds, "met_when": rule_ref},
                        "required": ["ask", "met_when"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                },
                "suggestion": {
                    "type": "object",
                    "properties": {
                        "label": _TEXT,
                        "resource": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"},
                        "code": {
                            "type": "object",
                            "properties": {"system": _TEXT, "code": _TEXT, "display": {"type": "string"}},
                            "required": ["system", "code"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["label", "resource", "code"],
                    "additionalProperties": False,
                },
            },
            _policy,
            "_CRITERION_KEYS",
        ),
        "required": ["id", "kind", "title", "quote", "how"],
        "additionalProperties": False,
        "allOf": [
            {
                "if": {"properties": {"kind": {"const": "requirement"}}, "required": ["kind"]},
                "then": {
                    "required": ["met_when", "ask"],
                    "not": {"anyOf": [{"required": ["holds_when"]}, {"required": ["lifted_by"]}]},
                },
            },
            {
                "if": {"properties": {"kind": {"const": "exclusion"}}, "required": ["kind"]},
                "then": {
                    "required": ["holds_when"],
                    "not": {"anyOf": [{"required": ["met_when"]}, {"required": ["not_met_when"]}]},
                },
            },
        ],
    }
    scope = {
        "type": "object",
        "properties": {
            "id": _TEXT,
            "title": _TEXT,
            "when": rule_ref,
            "outcome": {"enum": [o.value for o in Outcome]},
            "message": text_with_thresholds,
            "quote": {"type": "string"},
            "card": {"type": "boolean", "description": "false: end the evaluation without a card"},
        },
        "required": ["id", "title", "when", "outcome", "message"],
        "additionalProperties": False,
    }
    phase = {
        "type": "object",
        "properties": {
            "id": _TEXT,
            "title": _TEXT,
            "quote": {"type": "string"},
            "authorization_days": {"type": "integer", "minimum": 1},
            "when": rule_ref,
        },
        "required": ["id", "title"],
        "additionalProperties": False,
    }
    meta = {
        "type": "object",
        "properties": _accepting(
            {
                "id": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]*$"},
                "payer": _TEXT,
                "number": _TEXT,
                "title": _TEXT,
                "url": {"type": "string", "pattern": "^https://"},
                "effective": {"type": "string"},
                "applies_to": {"type": "array", "items": {"enum": [k.value for k in OrderKind]}, "minItems": 1},
                "source_file": {"type": "string"},
                "prior_authorization": {"enum": ["required", "not-stated"]},
            },
            _policy,
            "_POLICY_KEYS",
        ),
        "required": ["id", "payer", "number", "title", "url", "applies_to"],
        "additionalProperties": False,
    }
    schema = {
        "type": "object",
        "properties": _accepting(
            {
                "policy": meta,
                "phase_name": {"enum": ["phase", "service"]},
                "thresholds": {
                    "type": "object",
                    "propertyNames": {"pattern": IDENTIFIER},
                    "additionalProperties": {"type": "number", "description": "a number (not a quoted string)"},
                },
                "facts": {
                    "type": "object",
                    "propertyNames": {"pattern": IDENTIFIER},
                    "additionalProperties": {"$ref": "#/$defs/fact"},
                },
                "scope": {"type": "array", "items": scope},
                "phases": {"type": "array", "items": phase, "minItems": 1},
                "criteria": {"type": "array", "items": criterion, "minItems": 1},
                "notes": {"type": "array", "items": _NAME},
                "obligations": _STRINGS,
                "links": {"type": "array", "items": _LINK},
            },
            _policy,
            "_TOP_KEYS",
        ),
        "required": ["policy", "criteria"],
        "additionalProperties": False,
    }
    return _document(
        "policy",
        "ketamine-cds policy file (fhir_mappings/policies/*.yaml)",
        schema,
        {**rule_language_defs(), **fact_defs()},
    )


def facts_schema() -> dict[str, Any]:
    shape = {
        "type": "object",
        "properties": {
            "code": {"anyOf": [{"const": "medication"}, _JSONPATHS], "description": "jsonpath(s), or 'medication'"},
            "date": _JSONPATHS,
            "end": _JSONPATHS,
            "value": _JSONPATHS,
        },
        "required": ["code"],
        "additionalProperties": False,
    }
    check = {
        "type": "object",
        "properties": {
            "path": _JSONPATH,
            "in": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "not_in": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "missing": {"enum": ["pass", "fail"]},
            "uncertain": {
                "type": "array",
                "items": {"type": "string"},
                "description": "values kept as uncertain evidence (unknown, never true)",
            },
        },
        "required": ["path"],
        "additionalProperties": False,
        **_exactly_one(("in", "not_in")),
    }
    status_filter = {
        "type": "object",
        "properties": {"description": {"type": "string"}, "checks": {"type": "array", "items": check}},
        "additionalProperties": False,
    }
    schema = {
        "type": "object",
        "properties": {
            "shapes": {
                "type": "object",
                "propertyNames": {"pattern": "^[A-Z][A-Za-z]+$"},
                "additionalProperties": shape,
            },
            "filters": {
                "type": "object",
                "propertyNames": {"pattern": IDENTIFIER},
                "additionalProperties": status_filter,
            },
            "facts": {
                "type": "object",
                "propertyNames": {"pattern": IDENTIFIER},
                "additionalProperties": {"$ref": "#/$defs/fact"},
            },
        },
        "additionalProperties": False,
    }
    return _document("facts", "ketamine-cds shared facts (fhir_mappings/facts.yaml)", schema, fact_defs())


def valuesets_schema() -> dict[str, Any]:
    concept = {
        "type": "object",
        "properties": _accepting(
            {
                "code": {"type": "string", "pattern": r"\S", "description": "the code, always quoted"},
                "display": {"type": "string"},
                "verification": {"enum": list(VERIFICATION)},
                "note": {"type": "string"},
            },
            _valuesets,
            "_CONCEPT_KEYS",
        ),
        "required": ["code"],
        "additionalProperties": False,
    }
    include = {
        "type": "object",
        "properties": _accepting(
            {
                "system": {"type": "string", "pattern": r"^\S+$"},
                "match": {"enum": ["exact", "prefix", "ingredient"]},
                "prefixes": {"type": "array", "items": {"type": "string", "pattern": r"\S"}, "minItems": 1},
                "concepts": {"type": "array", "items": concept},
            },
            _valuesets,
            "_INCLUDE_KEYS",
        ),
        "required": ["system"],
        "additionalProperties": False,
        "if": {"properties": {"match": {"const": "prefix"}}, "required": ["match"]},
        "then": {"required": ["prefixes"]},
        "else": {"required": ["concepts"], "not": {"required": ["prefixes"]}},
    }
    value_set = {
        "type": "object",
        "properties": _accepting(
            {
                "title": _TEXT,
                "policy_refs": _STRINGS,
                "verification": {"enum": list(VERIFICATION)},
                "source": _TEXT,
                "notes": {"type": "string"},
                "include": {"type": "array", "items": include},
                "text_patterns": _STRINGS,
                "site_configurable": {"type": "boolean"},
            },
            _valuesets,
            "_SET_KEYS",
        ),
        "required": ["title", "verification", "source", "include"],
        "additionalProperties": False,
    }
    schema = {
        "type": "object",
        "properties": {
            "valuesets": {"type": "object", "propertyNames": {"pattern": IDENTIFIER}, "additionalProperties": value_set}
        },
        "required": ["valuesets"],
        "additionalProperties": False,
    }
    return _document("valuesets", "ketamine-cds value sets (fhir_mappings/valuesets/*.yaml)", schema)


def queries_schema() -> dict[str, Any]:
    resource_types = {"type": "array", "items": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"}, "minItems": 1}
    query = {
        "type": "object",
        "properties": _accepting(
            {
                "template": {"type": "string", "pattern": "^[A-Z][A-Za-z]+(/|\\?|$)"},
                "supplies": resource_types,
                "required": {"type": "boolean"},
                "code_valuesets": {"type": "array", "items": _NAME, "minItems": 1},
            },
            _queries,
            "_QUERY_KEYS",
        ),
        "required": ["template", "supplies"],
        "additionalProperties": False,
    }
    rule = {
        "type": "object",
        "properties": _accepting(
            {
                "from": resource_types,
                "paths": {"type": "array", "items": _JSONPATH, "minItems": 1},
                "draft_orders_only": {"type": "boolean"},
                "within_days": {"type": "integer", "minimum": 0},
            },
            _queries,
            "_RULE_KEYS",
        ),
        "required": ["from", "paths"],
        "additionalProperties": False,
    }
    schema = {
        "type": "object",
        "properties": {
            "queries": {
                "type": "object",
                "propertyNames": {"pattern": "^[A-Za-z0-9_\\-]+$"},
                "additionalProperties": query,
                "minProperties": 1,
            },
            "resolve_references": {"type": "array", "items": rule},
            "limits": {
                "type": "object",
                "properties": _accepting(
                    {
                        "max_pages_per_query": {"type": "integer", "minimum": 1},
                        "max_reference_ids_per_type": {"type": "integer", "minimum": 1},
                        "reference_rounds": {"type": "integer", "minimum": 0},
                    },
                    _queries,
                    "_LIMIT_KEYS",
                ),
                "additionalProperties": False,
            },
        },
        "required": ["queries"],
        "additionalProperties": False,
    }
    return _document("queries", "ketamine-cds prefetch queries (fhir_mappings/queries.yaml)", schema)


def routing_schema() -> dict[str, Any]:
    plan_cond_ref = {"$ref": "#/$defs/plan_condition"}
    phrases = {"type": "array", "items": _TEXT, "minItems": 1}
    plan_condition = _discriminated(
        {
            "any": _only("any", {"type": "array", "items": plan_cond_ref, "minItems": 1}, "some condition holds"),
            "all": _only("all", {"type": "array", "items": plan_cond_ref, "minItems": 1}, "every condition holds"),
            "type_in": _only("type_in", _NAME, "Coverage.type is in the value set"),
            "class_text": _only("class_text", phrases, "a Coverage.class value or name contains a phrase"),
            "payer_name": _only("payer_name", phrases, "the matched payer name contains a phrase"),
        },
        "a plan condition",
    )
    pointer = {
        "type": "object",
        "properties": {"program": _TEXT, "message": _TEXT},
        "required": ["program", "message"],
        "additionalProperties": False,
    }
    variation = {
        "type": "object",
        "properties": {
            "program": _TEXT,
            "quote": _TEXT,
            "message": _TEXT,
            "fallback": _TEXT,
            "links": {"type": "array", "items": _LINK},
            "of_policy": _TEXT,
        },
        "required": ["program", "quote", "message"],
        "additionalProperties": False,
        "anyOf": [{"required": ["fallback"]}, {"required": ["of_policy"]}],
    }
    plan = {
        "type": "object",
        "properties": {
            "id": _TEXT,
            "label": _TEXT,
            "when": plan_cond_ref,
            "policy": _TEXT,
            "variation": variation,
            "esketamine": pointer,
        },
        "required": ["id", "when"],
        "additionalProperties": False,
        **_exactly_one(("policy", "variation")),
    }
    payer = {
        "type": "object",
        "properties": {
            "id": _TEXT,
            "name": _TEXT,
            "identifiers": {"type": "array", "items": _IDENTIFIER_VALUE},
            "names": _STRINGS,
            "plans": {"type": "array", "items": plan},
            "esketamine": pointer,
            "policy_index": {"type": "string", "pattern": "^https?://"},
        },
        "required": ["id", "name", "plans"],
        "additionalProperties": False,
    }
    schema = {
        "type": "object",
        "properties": {
            "settings": {
                "type": "object",
                "properties": {"no_policy_card": {"type": "boolean"}},
                "additionalProperties": False,
            },
            "payers": {"type": "array", "items": payer},
        },
        "additionalProperties": False,
    }
    return _document(
        "routing", "ketamine-cds routing (fhir_mappings/routing.yaml)", schema, {"plan_condition": plan_condition}
    )


def site_config_schema() -> dict[str, Any]:
    coding = {
        "type": "object",
        "properties": {"system": _TEXT, "code": {"type": "string", "pattern": r"\S"}, "display": {"type": "string"}},
        "required": ["system", "code"],
        "additionalProperties": False,
    }
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "credentialed_clinics": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"system": _TEXT, "value": _TEXT, "name": {"type": "string"}},
                    "required": ["system", "value"],
                    "additionalProperties": False,
                },
            },
            "valuesets": {
                "type": "object",
                "propertyNames": {"pattern": IDENTIFIER},
                "additionalProperties": {"type": "array", "items": coding},
            },
            "payers": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"identifiers": {"type": "array", "items": _IDENTIFIER_VALUE}, "names": _STRINGS},
                    "additionalProperties": False,
                },
            },
            "no_policy_card": {"type": "boolean", "description": "true / false (unquoted)"},
        },
        "additionalProperties": False,
    }
    _accepting(schema["properties"], _mappings, "_SITE_KEYS")
    return _document("site-config", "ketamine-cds site configuration (--site-config)", schema)


SCHEMAS = {
    "policy": policy_schema,
    "facts": facts_schema,
    "valuesets": valuesets_schema,
    "queries": queries_schema,
    "routing": routing_schema,
    "site-config": site_config_schema,
}


def render(name: str) -> str:
    return json.dumps(SCHEMAS[name](), indent=2, ensure_ascii=False) + "\n"


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema to `directory` (the published copies); returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCHEMAS:
        path = directory / f"{name}.schema.json"
        path.write_text(render(name), encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of published schemas that differ from what the code generates now."""
    out = []
    for name in SCHEMAS:
        path = directory / f"{name}.schema.json"
        if not path.is_file() or path.read_text(encoding="utf-8") != render(name):
            out.append(name)
    return out
