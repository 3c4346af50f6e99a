"""The prefetch queries (`queries.yaml`), checked and compiled once at start-up.

Discovery advertises these templates, the gatherer renders them for each hook call, and the reference
resolver walks the compiled paths. Everything that can be wrong in the file (a token CDS Hooks 2.0 does
not define, an unknown key, a path jsonpath-ng cannot parse, a value set nobody defined) is refused here,
at load, with the query key in the message — never discovered on a patient's request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import quote

import yaml
from jsonpath_ng.ext import parse as parse_jsonpath

DEFAULT_PATH = Path(__file__).with_name("queries.yaml")

# CDS Hooks 2.0 §Prefetch tokens: first-level primitive context fields of order-sign, and the user tokens.
CONTEXT_TOKENS = frozenset({"context.patientId", "context.encounterId", "context.userId"})
USER_TOKENS: Mapping[str, str] = MappingProxyType(
    {
        "userPractitionerId": "Practitioner",
        "userPractitionerRoleId": "PractitionerRole",
        "userPatientId": "Patient",
        "userRelatedPersonId": "RelatedPerson",
    }
)
VALUESETS_TOKEN = "valuesets"  # ours, expanded at load time; never reaches discovery

_TOKEN = re.compile(r"\{\{(.*?)\}\}")
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")
_TEMPLATE_START = re.compile(r"^([A-Z][A-Za-z]+)(/|\?|$)")
_QUERY_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")
_READ_TEMPLATE = re.compile(r"^[A-Z][A-Za-z]+/\{\{[^}]+\}\}$")

_TOP_KEYS = frozenset({"queries", "resolve_references", "limits"})
_QUERY_KEYS = frozenset({"template", "supplies", "required", "code_valuesets"})
_RULE_KEYS = frozenset({"from", "paths", "draft_orders_only", "within_days"})
_LIMIT_KEYS = frozenset({"max_pages_per_query", "max_reference_ids_per_type", "reference_rounds"})
_DEFAULT_LIMITS = MappingProxyType(
    {"max_pages_per_query": 10, "max_reference_ids_per_type": 100, "reference_rounds": 2}
)

# A code token is URL text inside a template: keep what FHIR search syntax and readability need, encode the rest
# (`&`, `#`, `+`, `%`, `=`, space, `\`) so a code can never break the query string it is pasted into.
_CODE_URL_SAFE = ":/.-_~@!'()*;"


class QueryConfigError(ValueError):
    """`queries.yaml` is invalid; the message names the query (or rule) and the problem."""


class SupportsSearchCodes(Protocol):
    """What the loader needs from the value-set registry (`fhir_mappings.valuesets.ValueSetRegistry`)."""

    def search_codes(self, vs_ids: Iterable[str]) -> list[tuple[str, str]]:
        """(system, code) pairs of the value sets; KeyError for an unknown value set id."""
        ...


@dataclass(frozen=True)
class PrefetchQuery:
    """One prefetch key: the template discovery advertises and what its results supply."""

    key: str
    template: str
    supplies: tuple[str, ...]
    required: bool

    @property
    def resource_type(self) -> str:
        """The type the template reads or searches (`Patient` for `Patient/{{context.patientId}}`)."""
        match = _TEMPLATE_START.match(self.template)
        return match.group(1) if match else ""

    @property
    def is_read(self) -> bool:
        """A read (`Type/{{token}}`) answers with one resource, a search with a searchset Bundle."""
        return bool(_READ_TEMPLATE.match(self.template))

    def render(self, context: Mapping[str, Any]) -> str | None:
        """The relative URL for this hook call, or None when a token has no value for it.

        None means "not applicable" (no encounter in context, a user token of another user type), which
        the gatherer records as read-with-no-data rather than as a failure.
        """
        values: dict[str, str] = {}
        for token in _TOKEN.findall(self.template):
            value = _token_value(token, context)
            if value is None:
                return None
            values[token] = value
        return _TOKEN.sub(lambda m: values[m.group(1)], self.template)


@dataclass(frozen=True)
class ResolveRule:
    """Which references of which resources the gatherer resolves from the FHIR server."""

    from_types: tuple[str, ...]
    paths: tuple[Any, ...]  # compiled jsonpath-ng expressions
    path_texts: tuple[str, ...]
    draft_orders_only: bool
    within_days: int | None


@dataclass(frozen=True)
class QueryLimits:
    """Bounds that keep one hook call's FHIR traffic finite whatever the record's size."""

    max_pages_per_query: int
    max_reference_ids_per_type: int
    reference_rounds: int


@dataclass(frozen=True)
class QuerySet:
    """All prefetch queries, reference rules and limits, as loaded from `queries.yaml`."""

    queries: Mapping[str, PrefetchQuery]
    resolve_rules: tuple[ResolveRule, ...]
    limits: QueryLimits

    def discovery_prefetch(self) -> dict[str, str]:
        """The `prefetch` object of the discovery document: key -> template."""
        return {key: query.template for key, query in self.queries.items()}

    def supplied_types(self) -> frozenset[str]:
        """Resource types some query supplies; the facts loader checks its inputs against them."""
        return frozenset(t for query in self.queries.values() for t in query.supplies)


def _token_value(token: str, context: Mapping[str, Any]) -> str | None:
    """The URL-encoded value of one token for this call, or None when it has none."""
    if token in CONTEXT_TOKENS:
        value = context.get(token.removeprefix("context."))
        if not isinstance(value, str) or not value:
            return None
        # userId is `Type/id` and may stand for a whole read; ids never contain `/`, so encode it elsewhere.
        return quote(value, safe="/" if token == "context.userId" else "")
    if token in USER_TOKENS:
        user = context.get("userId")
        if not isinstance(user, str):
            return None
        user_type, _, user_id = user.partition("/")
        if user_type != USER_TOKENS[token] or not user_id or "/" in user_id:
            return None
        return quote(user_id, safe="")
    return None  # unreachable for a loaded QuerySet: the loader refuses other tokens


def _fhir_escape(value: str) -> str:
    """FHIR search escaping (`\\`, `,`, `|`, `$`) so a code is one token, then URL-safe encoding."""
    for char in ("\\", ",", "|", "$"):
        value = value.replace(char, "\\" + char)
    return quote(value, safe=_CODE_URL_SAFE + ",|$")


def _expand_valuesets(key: str, vs_ids: list[str], registry: SupportsSearchCodes) -> str:
    """`system|code,system|code,...` for the union of the value sets, in first-seen order."""
    pairs: dict[tuple[str, str], None] = {}
    for vs_id in vs_ids:
        try:
            found = registry.search_codes([vs_id])
        except KeyError as exc:
            raise QueryConfigError(f"query {key!r}: unknown value set {vs_id!r} in code_valuesets") from exc
        for system, code in found:
            pairs.setdefault((system, code), None)
    if not pairs:
        raise QueryConfigError(f"query {key!r}: the value sets in code_valuesets contain no codes")
    return ",".join(f"{_fhir_escape(system)}|{_fhir_escape(code)}" for system, code in pairs)


def _require_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise QueryConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise QueryConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _type_list(value: Any, where: str, field_name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise QueryConfigError(f"{where}: {field_name} must be a non-empty list of resource types")
    for item in value:
        if not isinstance(item, str) or not _RESOURCE_TYPE.match(item):
            raise QueryConfigError(f"{where}: {field_name} has {item!r}, which is not a resource type name")
    return tuple(value)


def _load_query(key: Any, raw: Any, registry: SupportsSearchCodes) -> PrefetchQuery:
    if not isinstance(key, str) or not _QUERY_KEY.match(key):
        raise QueryConfigError(f"query {key!r}: a key must be letters, digits, '_' or '-'")
    where = f"query {key!r}"
    data = _require_mapping(raw, where)
    _check_keys(data, _QUERY_KEYS, where)

    template = data.get("template")
    if not isinstance(template, str) or not template.strip():
        raise QueryConfigError(f"{where}: template must be a non-empty string")
    if not _TEMPLATE_START.match(template):
        raise QueryConfigError(f"{where}: template must be a relative FHIR URL starting with a resource type")
    supplies = _type_list(data.get("supplies"), where, "supplies")
    required = data.get("required", False)
    if not isinstance(required, bool):
        raise QueryConfigError(f"{where}: required must be true or false")

    vs_ids = data.get("code_valuesets")
    valid_vs_ids = isinstance(vs_ids, list) and vs_ids and all(isinstance(v, str) for v in vs_ids)
    if vs_ids is not None and not valid_vs_ids:
        raise QueryConfigError(f"{where}: code_valuesets must be a non-empty list of value set ids")

    tokens = _TOKEN.findall(template)
    for token in tokens:
        if token == VALUESETS_TOKEN:
            if vs_ids is None:
                raise QueryConfigError(f"{where}: {{{{valuesets}}}} is only allowed together with code_valuesets")
        elif token not in CONTEXT_TOKENS and token not in USER_TOKENS:
            raise QueryConfigError(
                f"{where}: token {{{{{token}}}}} is not a CDS Hooks 2.0 prefetch token "
                f"(allowed: {', '.join(sorted([*CONTEXT_TOKENS, *USER_TOKENS]))})"
            )
    leftover = _TOKEN.sub("", template)
    if "{{" in leftover or "}}" in leftover:
        raise QueryConfigError(f"{where}: template has an unbalanced '{{{{' or '}}}}'")
    if vs_ids is not None:
        if VALUESETS_TOKEN not in tokens:
            raise QueryConfigError(f"{where}: code_valuesets is given but the template has no {{{{valuesets}}}}")
        template = template.replace("{{" + VALUESETS_TOKEN + "}}", _expand_valuesets(key, vs_ids, registry))
    return PrefetchQuery(key=key, template=template, supplies=supplies, required=required)


def _load_rule(index: int, raw: Any) -> ResolveRule:
    where = f"resolve_references[{index}]"
    data = _require_mapping(raw, where)
    _check_keys(data, _RULE_KEYS, where)
    from_types = _type_list(data.get("from"), where, "from")
    path_texts = data.get("paths")
    if not isinstance(path_texts, list) or not path_texts or not all(isinstance(p, str) for p in path_texts):
        raise QueryConfigError(f"{where}: paths must be a non-empty list of jsonpath strings")
    compiled: list[Any] = []
    for text in path_texts:
        try:
            compiled.append(parse_jsonpath(text))
        except Exception as exc:  # JSONPathError mostly, but filter expressions can raise others (re.error, ...)
            raise QueryConfigError(f"{where}: path {text!r} is not valid jsonpath: {exc}") from exc
    draft_orders_only = data.get("draft_orders_only", False)
    if not isinstance(draft_orders_only, bool):
        raise QueryConfigError(f"{where}: draft_orders_only must be true or false")
    within_days = data.get("within_days")
    valid_days = isinstance(within_days, int) and not isinstance(within_days, bool) and within_days >= 0
    if within_days is not None and not valid_days:
        raise QueryConfigError(f"{where}: within_days must be a non-negative integer")
    return ResolveRule(
        from_types=from_types,
        paths=tuple(compiled),
        path_texts=tuple(path_texts),
        draft_orders_only=draft_orders_only,
        within_days=within_days,
    )


def _load_limits(raw: Any) -> QueryLimits:
    data = _require_mapping({} if raw is None else raw, "limits")
    _check_keys(data, _LIMIT_KEYS, "limits")
    values = {**_DEFAULT_LIMITS, **data}
    for name, value in values.items():
        minimum = 0 if name == "reference_rounds" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise QueryConfigError(f"limits: {name} must be an integer >= {minimum}")
    return QueryLimits(**values)


def load_queries(registry: SupportsSearchCodes, path: str | Path | None = None) -> QuerySet:
    """Load and check `queries.yaml` (the shipped one by default); QueryConfigError says what is wrong."""
    source = Path(path) if path is not None else DEFAULT_PATH
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise QueryConfigError(f"{source.name}: not valid YAML: {exc}") from exc
    data = _require_mapping(raw, source.name)
    _check_keys(data, _TOP_KEYS, source.name)
    raw_queries = _require_mapping(data.get("queries"), "queries")
    if not raw_queries:
        raise QueryConfigError("queries: at least one query is needed")
    queries = {key: _load_query(key, value, registry) for key, value in raw_queries.items()}
    raw_rules = data.get("resolve_references") or []
    if not isinstance(raw_rules, list):
        raise QueryConfigError("resolve_references: expected a list of rules")
    rules = tuple(_load_rule(i, rule) for i, rule in enumerate(raw_rules))
    return QuerySet(queries=MappingProxyType(queries), resolve_rules=rules, limits=_load_limits(data.get("limits")))
