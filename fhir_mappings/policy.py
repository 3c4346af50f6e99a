"""Policy definitions: one YAML file per payer policy, loaded and checked once at start-up.

A policy file holds, in the order an informaticist reads the policy: its identity (payer, number,
URL), the services it governs, thresholds and windows, facts of its own, scope rules (e.g. "IV only"),
phases (initial vs reauthorization and how the record tells them apart), and every criterion and
exclusion — each quoting the sentence it implements, saying how the data shows it, and giving the
rule. Mistakes (unknown fact, unknown value set, bad jsonpath, unknown key, missing quote) are
reported with the file and the item's id when the service starts, never at request time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fhir_mappings.facts import FactError, FactLibrary
from fhir_mappings.model import CriterionKind, Outcome, PolicyRef
from fhir_mappings.orders import OrderKind
from fhir_mappings.rules import CompileContext, Rule, RuleError, compile_rule

POLICY_DIR = Path(__file__).with_name("policies")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class PolicyError(ValueError):
    """A policy file is invalid; the message names the file and the item."""


@dataclass(frozen=True)
class Suggestion:
    """An action that truly helps, e.g. ordering the missing PHQ-9 (rendered by `cards`)."""

    label: str
    resource_type: str
    code: Mapping[str, str]  # {"system", "code", "display"}


@dataclass(frozen=True)
class Criterion:
    id: str
    kind: CriterionKind
    title: str
    quote: str
    how: str
    phases: frozenset[str]
    met_when: Rule | None  # requirements
    not_met_when: Rule | None
    holds_when: Rule | None  # exclusions
    lifted_by: Rule | None
    case_by_case_when: Rule | None
    ask: str
    not_met_text: str
    case_by_case_text: str
    clearance: str
    suggestion: Suggestion | None
    reads: frozenset[str] = frozenset()  # resource types its facts read (for "checked 14 Condition ...")
    # A requirement with several parts asks only for the parts not yet documented: (part's met rule, ask).
    ask_parts: tuple[tuple[Rule, str], ...] = ()

    @property
    def facts(self) -> frozenset[str]:
        rules = (self.met_when, self.not_met_when, self.holds_when, self.lifted_by, self.case_by_case_when)
        parts = tuple(rule for rule, _ in self.ask_parts)
        return frozenset().union(*(r.facts for r in (*rules, *parts) if r is not None))


@dataclass(frozen=True)
class ScopeRule:
    """Checked before the criteria, first match wins: e.g. a non-IV ketamine order is outside an IV-only
    policy, or a fourth integration session is beyond the benefit. `silent` rules end the evaluation
    without a card (the order is not what the policy is about, e.g. psychotherapy unrelated to KAP)."""

    id: str
    title: str
    when: Rule
    outcome: Outcome
    message: str
    quote: str
    silent: bool = False


@dataclass(frozen=True)
class Phase:
    id: str
    title: str
    quote: str
    authorization_days: int | None
    when: Rule | None  # None: the default phase


@dataclass(frozen=True)
class Policy:
    ref: PolicyRef
    applies_to: frozenset[OrderKind]
    effective: str
    thresholds: Mapping[str, Any]
    library: FactLibrary
    scope: tuple[ScopeRule, ...]
    phases: tuple[Phase, ...]
    criteria: tuple[Criterion, ...]
    notes: tuple[str, ...]  # facts whose values are informational notes (e.g. dosing)
    obligations: tuple[str, ...]  # documentation the policy requires after a covered service
    links: tuple[tuple[str, str], ...]
    source_file: str
    phase_name: str = "phase"  # "phase" (initial / reauthorization) or "service" (which covered service)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.ref.id

    def phase_ids(self) -> list[str]:
        return [p.id for p in self.phases]


_TOP_KEYS = {
    "policy",
    "phase_name",
    "thresholds",
    "facts",
    "scope",
    "phases",
    "criteria",
    "notes",
    "obligations",
    "links",
}
_POLICY_KEYS = {
    "id",
    "payer",
    "number",
    "title",
    "url",
    "effective",
    "applies_to",
    "source_file",
    "prior_authorization",
}
_CRITERION_KEYS = {
    "id",
    "kind",
    "title",
    "quote",
    "how",
    "phases",
    "met_when",
    "not_met_when",
    "holds_when",
    "lifted_by",
    "case_by_case_when",
    "ask",
    "not_met_text",
    "case_by_case_text",
    "clearance",
    "suggestion",
    "ask_parts",
}


def _keys(node: Any, allowed: set[str], where: str, required: set[str] = frozenset()) -> Mapping[str, Any]:  # type: ignore[assignment]
    if not isinstance(node, Mapping):
        raise PolicyError(f"{where}: must be a mapping")
    extra = set(node) - allowed
    if extra:
        raise PolicyError(f"{where}: unexpected key(s) {', '.join(sorted(extra))}")
    missing = set(required) - set(node)
    if missing:
        raise PolicyError(f"{where}: missing key(s) {', '.join(sorted(missing))}")
    return node


def _text(
    node: Mapping[str, Any], key: str, where: str, required: bool = True, thresholds: Mapping[str, Any] | None = None
) -> str:
    value = node.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise PolicyError(f"{where}.{key}: required text")
    text = " ".join(value.split())
    return text if thresholds is None else expand_thresholds(text, thresholds, f"{where}.{key}")


# `{phq9_severe}` in a card text is the threshold's value, so the text follows the data; `{name:percent}` (0.8 -> 80),
# `{name:weeks}` and `{name:months}` (a number of days) restate it in the unit the sentence uses. `{=6}` is a plain
# number that only looks like a threshold (e.g. a derive parameter): `mappings validate` leaves it alone.
PLACEHOLDER = re.compile(r"\{(?:=(?P<literal>\d+(?:\.\d+)?)|(?P<name>[a-z][a-z0-9_]*)(?::(?P<unit>[a-z]+))?)\}")
_FORMATS: dict[str, Callable[[float], float]] = {
    "": lambda v: v,
    "percent": lambda v: v * 100,
    "weeks": lambda v: v / 7,
    "months": lambda v: round(v / 30.4375),
}


UNITS = tuple(_FORMATS)


def format_threshold(value: Any, unit: str = "") -> str:
    """A threshold as a card says it: `15`, `0.8` as `80` (percent), `42` days as `6` (weeks)."""
    number = _FORMATS[unit](value)
    return f"{number:g}" if isinstance(number, float) else str(number)


def expand_thresholds(text: str, thresholds: Mapping[str, Any], where: str) -> str:
    """Replace `{name}` / `{name:unit}` placeholders by the policy's thresholds; unknown names are refused."""

    def value_of(match: re.Match[str]) -> str:
        if match.group("literal"):
            return match.group("literal")
        name, unit = match.group("name"), match.group("unit") or ""
        if name not in thresholds:
            raise PolicyError(f"{where}: unknown threshold {{{name}}} (defined: {', '.join(sorted(thresholds))})")
        if unit not in _FORMATS:
            raise PolicyError(f"{where}: unknown unit {unit!r} in {{{name}:{unit}}} (known: percent, weeks, months)")
        value = thresholds[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError(f"{where}: threshold {name!r} is not a number")
        return format_threshold(value, unit)

    return PLACEHOLDER.sub(value_of, text) if "{" in text else text


def load_policy(path: str | Path, shared: FactLibrary) -> Policy:
    """Load one policy file on top of the shared fact library; raises PolicyError with the location."""
    path = Path(path)
    name = path.name
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{name}: YAML error: {exc}") from None
    _keys(doc, _TOP_KEYS, name, {"policy", "criteria"})
    meta = _keys(doc["policy"], _POLICY_KEYS, f"{name} policy", {"id", "payer", "number", "title", "url", "applies_to"})
    try:
        applies_to = frozenset(OrderKind(k) for k in meta["applies_to"])
    except ValueError as exc:
        raise PolicyError(f"{name} policy.applies_to: {exc}") from None
    thresholds = dict(doc.get("thresholds") or {})
    try:
        library = shared.extended(doc.get("facts") or {}, f"{name}", extra_text=path.read_text(encoding="utf-8"))
    except FactError as exc:
        raise PolicyError(str(exc)) from None
    ctx = CompileContext(
        known_facts=frozenset(library.facts),
        thresholds=thresholds,
        known_valuesets=frozenset(library.registry.ids()),
        where=name,
    )

    def said(node: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
        return _text(node, key, where, required, thresholds)  # card texts: {threshold} placeholders expanded

    def rule(node: Any, where: str) -> Rule | None:
        if node is None:
            return None
        try:
            return compile_rule(node, ctx, where)
        except RuleError as exc:
            raise PolicyError(str(exc)) from None

    scope = []
    for i, item in enumerate(doc.get("scope") or []):
        where = f"{name} scope[{i}]"
        _keys(
            item,
            {"id", "title", "when", "outcome", "message", "quote", "card"},
            where,
            {"id", "title", "when", "outcome", "message"},
        )
        compiled = rule(item["when"], f"{where}.when")
        assert compiled is not None
        scope.append(
            ScopeRule(
                id=str(item["id"]),
                title=said(item, "title", where),
                when=compiled,
                outcome=Outcome(item["outcome"]),
                message=said(item, "message", where),
                quote=_text(item, "quote", where, False),
                silent=item.get("card", True) is False,
            )
        )
    phases = []
    for i, item in enumerate(doc.get("phases") or [{"id": "initial", "title": "Request", "quote": ""}]):
        where = f"{name} phases[{i}]"
        _keys(item, {"id", "title", "quote", "authorization_days", "when"}, where, {"id", "title"})
        phases.append(
            Phase(
                id=str(item["id"]),
                title=_text(item, "title", where),
                quote=_text(item, "quote", where, False),
                authorization_days=item.get("authorization_days"),
                when=rule(item.get("when"), f"{where}.when"),
            )
        )
    if doc.get("phase_name", "phase") not in ("phase", "service"):
        raise PolicyError(f"{name} phase_name: 'phase' or 'service'")
    if sum(1 for p in phases if p.when is None) != 1:
        raise PolicyError(f"{name} phases: exactly one phase must have no 'when' (the default)")
    phase_ids = {p.id for p in phases}
    criteria: list[Criterion] = []
    seen: set[str] = set()
    for i, item in enumerate(doc["criteria"]):
        where = f"{name} criteria[{i}]"
        _keys(item, _CRITERION_KEYS, where, {"id", "kind", "title", "quote", "how"})
        cid = str(item["id"])
        where = f"{name} criterion {cid}"
        if cid in seen:
            raise PolicyError(f"{where}: duplicate id")
        seen.add(cid)
        kind = CriterionKind(item["kind"])
        phases_of = frozenset(item.get("phases") or phase_ids)
        if not phases_of <= phase_ids:
            raise PolicyError(f"{where}.phases: unknown phase(s) {', '.join(sorted(phases_of - phase_ids))}")
        if kind is CriterionKind.REQUIREMENT and "met_when" not in item:
            raise PolicyError(f"{where}: a requirement needs met_when")
        if kind is CriterionKind.EXCLUSION and "holds_when" not in item:
            raise PolicyError(f"{where}: an exclusion needs holds_when")
        if kind is CriterionKind.REQUIREMENT and {"holds_when", "lifted_by"} & set(item):
            raise PolicyError(f"{where}: holds_when/lifted_by belong to exclusions")
        if kind is CriterionKind.EXCLUSION and {"met_when", "not_met_when"} & set(item):
            raise PolicyError(f"{where}: met_when/not_met_when belong to requirements")
        suggestion = None
        if "suggestion" in item:
            s = _keys(
                item["suggestion"], {"label", "resource", "code"}, f"{where}.suggestion", {"label", "resource", "code"}
            )
            suggestion = Suggestion(str(s["label"]), str(s["resource"]), dict(s["code"]))
        criteria.append(
            Criterion(
                id=cid,
                kind=kind,
                title=said(item, "title", where),
                quote=_text(item, "quote", where),
                how=said(item, "how", where),
                phases=phases_of,
                met_when=rule(item.get("met_when"), f"{where}.met_when"),
                not_met_when=rule(item.get("not_met_when"), f"{where}.not_met_when"),
                holds_when=rule(item.get("holds_when"), f"{where}.holds_when"),
                lifted_by=rule(item.get("lifted_by"), f"{where}.lifted_by"),
                case_by_case_when=rule(item.get("case_by_case_when"), f"{where}.case_by_case_when"),
                ask=said(item, "ask", where, False),
                not_met_text=said(item, "not_met_text", where, False),
                case_by_case_text=said(item, "case_by_case_text", where, False),
                clearance=_text(item, "clearance", where, False),
                suggestion=suggestion,
            )
        )
        parts = []
        for j, part in enumerate(item.get("ask_parts") or []):
            pw = f"{where}.ask_parts[{j}]"
            _keys(part, {"ask", "met_when"}, pw, {"ask", "met_when"})
            parts.append((rule(part["met_when"], f"{pw}.met_when"), _text(part, "ask", pw)))
        if parts and kind is not CriterionKind.REQUIREMENT:
            raise PolicyError(f"{where}.ask_parts: only a requirement has parts to ask for")
        criteria[-1] = replace(criteria[-1], ask_parts=tuple(p for p in parts if p[0] is not None))
        criteria[-1] = replace(criteria[-1], reads=library.reads(criteria[-1].facts))
        if kind is CriterionKind.REQUIREMENT and not criteria[-1].ask:
            raise PolicyError(f"{where}.ask: a requirement must say what to document when it is unknown")
    for fact_name in doc.get("notes") or []:
        if fact_name not in library.facts:
            raise PolicyError(f"{name} notes: unknown fact {fact_name!r}")
    links = []
    for i, link in enumerate(doc.get("links") or []):
        _keys(link, {"label", "url"}, f"{name} links[{i}]", {"label", "url"})
        links.append((str(link["label"]), str(link["url"])))
    ref = PolicyRef(
        id=str(meta["id"]),
        title=_text(meta, "title", f"{name} policy"),
        number=_text(meta, "number", f"{name} policy"),
        payer=_text(meta, "payer", f"{name} policy"),
        url=str(meta["url"]),
        prior_authorization=str(meta.get("prior_authorization", "required")),
    )
    if ref.prior_authorization not in ("required", "not-stated"):
        raise PolicyError(f"{name} policy.prior_authorization: 'required' or 'not-stated'")
    if not ref.url.startswith("https://"):
        raise PolicyError(f"{name} policy.url: must be an absolute https URL")
    return Policy(
        ref=ref,
        applies_to=applies_to,
        effective=str(meta.get("effective", "")),
        thresholds=thresholds,
        library=library,
        scope=tuple(scope),
        phases=tuple(phases),
        criteria=tuple(criteria),
        notes=tuple(doc.get("notes") or ()),
        obligations=tuple(" ".join(str(o).split()) for o in doc.get("obligations") or ()),
        links=tuple(links),
        source_file=str(meta.get("source_file", "")),
        phase_name=str(doc.get("phase_name", "phase")),
    )


def load_policies(shared: FactLibrary, directory: str | Path = POLICY_DIR) -> dict[str, Policy]:
    policies: dict[str, Policy] = {}
    for path in sorted(p for p in Path(directory).glob("*.yaml") if not p.name.endswith(".matrix.yaml")):
        policy = load_policy(path, shared)
        if policy.id in policies:
            raise PolicyError(f"{path.name}: duplicate policy id {policy.id!r}")
        policies[policy.id] = policy
    return policies
