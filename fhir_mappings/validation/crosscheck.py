"""Cross-file checks with positions: every reference resolves, every path compiles, every code is real.

The loaders make the same checks and stop at the first; here each is made for every item, so an informaticist
sees all mistakes of a change at once. Rules are compiled with the engine's own compiler (`rules.compile_rule`),
one rule at a time, so the rule language has exactly one definition.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonpath_ng.ext import parse as jsonpath_parse

from fhir_mappings.facts import DERIVATIONS
from fhir_mappings.policy import PLACEHOLDER, UNITS
from fhir_mappings.rules import CompileContext, RuleError, compile_rule
from fhir_mappings.validation.codes import code_problem, prefix_problem
from fhir_mappings.validation.problems import Collector
from fhir_mappings.validation.textcheck import RULE_KEYS, TEXT_KEYS, check_texts
from fhir_mappings.validation.yamlpos import LocatedDocument, Path
from fhir_mappings.valuesets import RXNORM, canonical_system

_RULE_PATH = re.compile(r"\.?([A-Za-z_][\w]*)|\[(\d+)\]")


@dataclass
class MappingSet:
    """The located documents of one mapping set (and an optional site configuration)."""

    valuesets: list[LocatedDocument] = field(default_factory=list)
    facts: LocatedDocument | None = None
    policies: list[LocatedDocument] = field(default_factory=list)
    queries: LocatedDocument | None = None
    routing: LocatedDocument | None = None
    site: LocatedDocument | None = None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _hint(name: Any, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class CrossChecker:
    def __init__(self, mappings: MappingSet, out: Collector) -> None:
        self.m = mappings
        self.out = out
        self.valuesets: dict[str, tuple[LocatedDocument, Path]] = {}
        self.shared_facts: set[str] = set()
        self.policy_ids: dict[str, LocatedDocument] = {}

    # -- entry point --------------------------------------------------------------------------------
    def run(self) -> None:
        for doc in self.m.valuesets:
            self.check_valuesets(doc)
        if self.m.facts is not None:
            facts = _mapping(_mapping(self.m.facts.data).get("facts"))
            self.shared_facts = set(facts)
            self.check_facts_file(self.m.facts)
        for doc in self.m.policies:
            self.check_policy(doc)
        if self.m.queries is not None:
            self.check_queries(self.m.queries)
        if self.m.routing is not None:
            self.check_routing(self.m.routing)
        if self.m.site is not None:
            self.check_site(self.m.site)

    def known_valueset(self, doc: LocatedDocument, path: Path, vs_id: Any) -> None:
        if isinstance(vs_id, str) and vs_id not in self.valuesets:
            self.out.add(doc, path, f"unknown value set {vs_id!r}{_hint(vs_id, self.valuesets)}", "reference")

    def jsonpath(self, doc: LocatedDocument, path: Path, text: Any) -> None:
        if not isinstance(text, str):
            return
        try:
            jsonpath_parse(text)
        except Exception as exc:  # jsonpath-ng raises several exception types for syntax errors
            reason = " ".join(str(exc).split())[:120]
            self.out.add(doc, path, f"invalid jsonpath {text!r}: {reason}", "reference")

    def jsonpaths(self, doc: LocatedDocument, path: Path, value: Any) -> None:
        if isinstance(value, list):
            for i, text in enumerate(value):
                self.jsonpath(doc, (*path, i), text)
        else:
            self.jsonpath(doc, path, value)

    # -- value sets -----------------------------------------------------------------------------------
    def check_valuesets(self, doc: LocatedDocument) -> None:
        sets = _mapping(_mapping(doc.data).get("valuesets"))
        for vs_id, spec in sets.items():
            path = ("valuesets", vs_id)
            if vs_id in self.valuesets:
                first_doc, first_path = self.valuesets[vs_id]
                first = first_doc.position(first_path, key=True)
                self.out.add(
                    doc,
                    path,
                    f"value set {vs_id!r} is already defined in {first_doc.file}:{first.line}",
                    "reference",
                    key=True,
                )
                continue
            self.valuesets[vs_id] = (doc, path)
            for i, include in enumerate(_list(_mapping(spec).get("include"))):
                self.check_include(doc, (*path, "include", i), _mapping(include))

    def check_include(self, doc: LocatedDocument, path: Path, include: Mapping[str, Any]) -> None:
        raw = include.get("system")
        if not isinstance(raw, str):
            return
        system = canonical_system(raw)
        if include.get("match") == "ingredient" and system != RXNORM:
            self.out.add(doc, (*path, "match"), f"'match: ingredient' only works for RxNorm ({RXNORM})", "code")
        for j, concept in enumerate(_list(include.get("concepts"))):
            code = _mapping(concept).get("code")
            if isinstance(code, str) and include.get("match") != "ingredient":
                problem = code_problem(system, code)
                if problem:
                    self.out.add(doc, (*path, "concepts", j, "code"), problem, "code")
            elif isinstance(code, str):
                problem = code_problem(RXNORM, code)
                if problem:
                    self.out.add(doc, (*path, "concepts", j, "code"), problem, "code")
        if include.get("match") == "prefix":
            for j, prefix in enumerate(_list(include.get("prefixes"))):
                if isinstance(prefix, str):
                    problem = prefix_problem(system, prefix)
                    if problem:
                        self.out.add(doc, (*path, "prefixes", j), problem, "code")

    # -- facts ----------------------------------------------------------------------------------------
    def check_facts_file(self, doc: LocatedDocument) -> None:
        data = _mapping(doc.data)
        for rtype, shape in _mapping(data.get("shapes")).items():
            for key in ("code", "date", "end", "value"):
                value = _mapping(shape).get(key)
                if value is not None and value != "medication":
                    self.jsonpaths(doc, ("shapes", rtype, key), value)
        for name, spec in _mapping(data.get("filters")).items():
            for i, check in enumerate(_list(_mapping(spec).get("checks"))):
                self.jsonpath(doc, ("filters", name, "checks", i, "path"), _mapping(check).get("path"))
        self.check_fact_defs(doc, ("facts",), _mapping(data.get("facts")), self.shared_facts)

    def shapes(self) -> set[str]:
        return set(_mapping(_mapping(self.m.facts.data if self.m.facts else {}).get("shapes")))

    def filters(self) -> set[str]:
        return set(_mapping(_mapping(self.m.facts.data if self.m.facts else {}).get("filters")))

    def check_fact_defs(self, doc: LocatedDocument, base: Path, defs: Mapping[str, Any], known: set[str]) -> None:
        shapes, filters = self.shapes(), self.filters()
        for name, spec in defs.items():
            path = (*base, name)
            spec = _mapping(spec)
            if doc is not self.m.facts and name in self.shared_facts:
                self.out.add(doc, path, f"fact {name!r} is already defined in facts.yaml", "reference", key=True)
            if "derive" in spec:
                self.check_derive(doc, path, spec, known)
                continue
            rtype = spec.get("resource")
            if isinstance(rtype, str) and rtype not in shapes:
                self.out.add(
                    doc,
                    (*path, "resource"),
                    f"resource {rtype!r} has no shape in facts.yaml{_hint(rtype, shapes)}",
                    "reference",
                )
            valuesets = spec.get("valueset")
            for i, vs in enumerate(valuesets if isinstance(valuesets, list) else [valuesets]):
                self.known_valueset(
                    doc, (*path, "valueset", i) if isinstance(valuesets, list) else (*path, "valueset"), vs
                )
            for i, vs in enumerate(_list(spec.get("answers"))):
                self.known_valueset(doc, (*path, "answers", i), vs)
            panel = spec.get("panel")
            for i, vs in enumerate(panel if isinstance(panel, list) else [panel] if panel else []):
                self.known_valueset(doc, (*path, "panel", i) if isinstance(panel, list) else (*path, "panel"), vs)
            polarity = _mapping(spec.get("polarity"))
            for key in ("positive", "negative"):
                sets = polarity.get(key)
                for i, vs in enumerate(sets if isinstance(sets, list) else [sets] if sets else []):
                    where = (*path, "polarity", key, i) if isinstance(sets, list) else (*path, "polarity", key)
                    self.known_valueset(doc, where, vs)
            status_filter = spec.get("filter")
            if isinstance(status_filter, str) and status_filter not in filters:
                self.out.add(
                    doc,
                    (*path, "filter"),
                    f"unknown filter {status_filter!r}{_hint(status_filter, filters)}",
                    "reference",
                )
            for key in ("code", "date", "end", "value"):
                if key in spec:
                    self.jsonpaths(doc, (*path, key), spec[key])
            for field_name, value in _mapping(spec.get("fields")).items():
                self.jsonpaths(doc, (*path, "fields", field_name), value)

    def check_derive(self, doc: LocatedDocument, path: Path, spec: Mapping[str, Any], known: set[str]) -> None:
        derivation = DERIVATIONS.get(spec.get("derive"))  # type: ignore[arg-type]
        if derivation is None:
            return  # the schema names the unknown derive function
        for key, value in _mapping(spec.get("params")).items():
            kind = derivation.params.get(key)
            where = (*path, "params", key)
            if kind in ("valueset", "fact"):
                self._param_ref(doc, where, value, kind, known)
            elif kind in ("valuesets", "facts"):
                items = value.items() if isinstance(value, Mapping) else enumerate(_list(value))
                for sub, item in items:
                    self._param_ref(doc, (*where, sub), item, kind[:-1], known)
            elif kind == "map" and isinstance(value, Mapping):
                for sub, item in value.items():
                    if isinstance(item, str) and item not in self.valuesets and item not in known:
                        self.out.add(
                            doc, (*where, sub), f"unknown value set {item!r}{_hint(item, self.valuesets)}", "reference"
                        )

    def _param_ref(self, doc: LocatedDocument, path: Path, value: Any, kind: str, known: set[str]) -> None:
        if not isinstance(value, str):
            return
        if kind == "valueset":
            self.known_valueset(doc, path, value)
        elif value not in known:
            self.out.add(doc, path, f"unknown fact {value!r}{_hint(value, known)}", "reference")

    # -- policies -------------------------------------------------------------------------------------
    def check_policy(self, doc: LocatedDocument) -> None:
        data = _mapping(doc.data)
        policy_id = _mapping(data.get("policy")).get("id")
        if isinstance(policy_id, str):
            if policy_id in self.policy_ids:
                other = self.policy_ids[policy_id]
                self.out.add(
                    doc, ("policy", "id"), f"policy id {policy_id!r} is already used by {other.file}", "reference"
                )
            else:
                self.policy_ids[policy_id] = doc
        local = _mapping(data.get("facts"))
        known = self.shared_facts | set(local)
        self.check_fact_defs(doc, ("facts",), local, known)
        raw_thresholds = _mapping(data.get("thresholds"))
        thresholds = {
            k: (v if isinstance(v, int | float) and not isinstance(v, bool) else 0) for k, v in raw_thresholds.items()
        }
        ctx = CompileContext(
            known_facts=frozenset(known), thresholds=thresholds, known_valuesets=frozenset(self.valuesets), where="§"
        )
        for i, item in enumerate(_list(data.get("scope"))):
            self.check_rules(doc, ("scope", i), _mapping(item), ctx)
            self.check_item_texts(doc, ("scope", i), _mapping(item), raw_thresholds)
        phase_ids: set[str] = set()
        defaults = 0
        for i, item in enumerate(_list(data.get("phases"))):
            item = _mapping(item)
            self.check_rules(doc, ("phases", i), item, ctx)
            if isinstance(item.get("id"), str):
                phase_ids.add(item["id"])
            defaults += "when" not in item
        if data.get("phases") is None:
            phase_ids, defaults = {"initial"}, 1
        if isinstance(data.get("phases"), list) and defaults != 1:
            self.out.add(
                doc,
                ("phases",),
                f"exactly one phase must have no 'when' (the default); {defaults} have none",
                "reference",
                key=True,
            )
        seen: dict[str, int] = {}
        for i, item in enumerate(_list(data.get("criteria"))):
            item = _mapping(item)
            path = ("criteria", i)
            cid = item.get("id")
            if isinstance(cid, str):
                if cid in seen:
                    self.out.add(
                        doc, (*path, "id"), f"duplicate criterion id {cid!r} (also criteria[{seen[cid]}])", "reference"
                    )
                seen.setdefault(cid, i)
            for j, phase in enumerate(_list(item.get("phases"))):
                if isinstance(phase, str) and phase not in phase_ids:
                    self.out.add(
                        doc, (*path, "phases", j), f"unknown phase {phase!r}{_hint(phase, phase_ids)}", "reference"
                    )
            self.check_rules(doc, path, item, ctx)
            self.check_item_texts(doc, path, item, raw_thresholds)
            suggestion = _mapping(_mapping(item.get("suggestion")).get("code"))
            if isinstance(suggestion.get("system"), str) and isinstance(suggestion.get("code"), str):
                problem = code_problem(canonical_system(suggestion["system"]), suggestion["code"])
                if problem:
                    self.out.add(doc, (*path, "suggestion", "code", "code"), problem, "code")
        for i, name in enumerate(_list(data.get("notes"))):
            if isinstance(name, str) and name not in known:
                self.out.add(doc, ("notes", i), f"unknown fact {name!r}{_hint(name, known)}", "reference")

    def check_rules(self, doc: LocatedDocument, path: Path, item: Mapping[str, Any], ctx: CompileContext) -> None:
        for key in RULE_KEYS:
            node = item.get(key)
            if not isinstance(node, Mapping):
                continue
            try:
                compile_rule(node, ctx, "§")
            except RuleError as exc:
                where, _, reason = str(exc).partition(": ")
                self.out.add(doc, (*path, key, *_rule_path(where)), reason, "reference")

    def check_item_texts(
        self, doc: LocatedDocument, path: Path, item: Mapping[str, Any], thresholds: Mapping[str, Any]
    ) -> None:
        for key in TEXT_KEYS:
            text = item.get(key)
            if not isinstance(text, str):
                continue
            for m in PLACEHOLDER.finditer(text):
                if m.group("literal"):
                    continue
                name, unit = m.group("name"), m.group("unit") or ""
                if name not in thresholds:
                    reason = f"{key}: unknown threshold {{{name}}}{_hint(name, thresholds)}"
                elif unit not in UNITS:
                    reason = f"{key}: unknown unit {unit!r} in {m.group(0)} (known: {', '.join(u for u in UNITS if u)})"
                else:
                    continue
                self.out.at(doc.file, doc.find((*path, key), m.group(0)), reason, "text", (*path, key))
        for key, words, reason in check_texts(item, thresholds):
            self.out.at(doc.file, doc.find((*path, key), words), reason, "text", (*path, key))

    # -- queries --------------------------------------------------------------------------------------
    def check_queries(self, doc: LocatedDocument) -> None:
        data = _mapping(doc.data)
        for key, query in _mapping(data.get("queries")).items():
            for i, vs in enumerate(_list(_mapping(query).get("code_valuesets"))):
                self.known_valueset(doc, ("queries", key, "code_valuesets", i), vs)
        for i, rule in enumerate(_list(data.get("resolve_references"))):
            for j, text in enumerate(_list(_mapping(rule).get("paths"))):
                self.jsonpath(doc, ("resolve_references", i, "paths", j), text)

    # -- routing ---------------------------------------------------------------------------------------
    def check_routing(self, doc: LocatedDocument) -> None:
        policies = set(self.policy_ids)
        seen: set[str] = set()
        for i, payer in enumerate(_list(_mapping(doc.data).get("payers"))):
            payer = _mapping(payer)
            if isinstance(payer.get("id"), str):
                if payer["id"] in seen:
                    self.out.add(doc, ("payers", i, "id"), f"duplicate payer id {payer['id']!r}", "reference")
                seen.add(payer["id"])
            for j, plan in enumerate(_list(payer.get("plans"))):
                plan = _mapping(plan)
                path = ("payers", i, "plans", j)
                self._plan_condition(doc, (*path, "when"), plan.get("when"))
                refs = [("policy",), ("variation", "fallback"), ("variation", "of_policy")]
                for ref in refs:
                    value = plan.get(ref[0]) if len(ref) == 1 else _mapping(plan.get(ref[0])).get(ref[1])
                    if isinstance(value, str) and value not in policies:
                        self.out.add(
                            doc, (*path, *ref), f"unknown policy {value!r}{_hint(value, policies)}", "reference"
                        )

    def _plan_condition(self, doc: LocatedDocument, path: Path, node: Any) -> None:
        node = _mapping(node)
        for key in ("any", "all"):
            for i, part in enumerate(_list(node.get(key))):
                self._plan_condition(doc, (*path, key, i), part)
        if "type_in" in node:
            self.known_valueset(doc, (*path, "type_in"), node["type_in"])

    # -- site configuration ----------------------------------------------------------------------------
    def check_site(self, doc: LocatedDocument) -> None:
        data = _mapping(doc.data)
        for vs_id, codes in _mapping(data.get("valuesets")).items():
            if vs_id not in self.valuesets:
                self.out.add(
                    doc,
                    ("valuesets", vs_id),
                    f"unknown value set {vs_id!r}{_hint(vs_id, self.valuesets)}",
                    "reference",
                    key=True,
                )
            for i, coding in enumerate(_list(codes)):
                coding = _mapping(coding)
                if isinstance(coding.get("system"), str) and isinstance(coding.get("code"), str):
                    problem = code_problem(canonical_system(coding["system"]), coding["code"])
                    if problem:
                        self.out.add(doc, ("valuesets", vs_id, i, "code"), problem, "code")
        payer_ids = {
            p.get("id")
            for p in _list(_mapping(self.m.routing.data if self.m.routing else {}).get("payers"))
            if isinstance(p, Mapping)
        }
        for payer in _mapping(data.get("payers")):
            if payer not in payer_ids:
                self.out.add(
                    doc,
                    ("payers", payer),
                    f"unknown payer id {payer!r}{_hint(payer, map(str, payer_ids))}",
                    "reference",
                    key=True,
                )


def _rule_path(where: str) -> Path:
    """`§.all[0].where` (a RuleError location) as a path relative to the rule."""
    rest = where.removeprefix("§")
    out: list[str | int] = []
    for m in _RULE_PATH.finditer(rest):
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
    return tuple(out)
