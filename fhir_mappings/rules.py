"""The rule language of the policy files, with three-valued (Kleene) logic.

A rule is a small YAML/JSON structure an informaticist can read next to the policy text:

    all / any: [rule, ...]            not: rule
    exists: FACT  [where: COND] [absent: unknown] [after: {fact: FACT, where: COND} or a list of them]
    count: FACT   [where: COND]  ">=": 4          (also >, <=, <, ==)
    distinct: FACT field: NAME [where: COND] ">=": 2
    latest: FACT  [where: COND]  then: COND [absent: unknown]
    value: FACT   ">=": 18                         (a fact with a single value)

and COND, a condition on one item of a fact (one diagnosis, one score, one treatment trial):

    all / any: [cond, ...]            not: cond
    field: NAME  (">=" | ">" | "<=" | "<" | "==" | "!=" | in | is | present | contains): VALUE
    within_days: N   older_than_days: N   [of: FIELD]   (item date — or a date field — vs the evaluation date)
    code_in: VALUESET

Values may name a policy threshold as "@name". Every rule evaluates to True, False or None
(unknown) *with the evidence* behind the answer. Unknown is never silently turned into True:
`exists` is False only when the fact's data was read completely; counts give an answer only when
every possible completion of the unknown items agrees (e.g. "≥ 4 trials" is False only if even
counting every trial of unknown adequacy there are fewer than 4).

Rules are compiled once at load time (`compile_rule`), which checks fact names, fields, operators
and thresholds and reports the path of any mistake; evaluation does no parsing.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

from fhir_mappings.model import Bounds, Evidence, Fact, FactState

Truth = bool | None
MAX_EVIDENCE = 16

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


class RuleError(ValueError):
    """A rule in a policy file is malformed; the message carries its location."""


@dataclass(frozen=True)
class Item:
    """One element of a fact: a diagnosis, a score, a treatment trial, a practitioner role, ...

    `date` is the earliest day the item can be dated to; `span` (when the source date was partial, or the
    item covers several days) is every day it can stand for, and time windows are decided over all of it.
    `support` is further evidence that shows a decision taken on this item (e.g. the sessions already on
    record behind "a fourth session"); rules cite it with the item.
    """

    evidence: Evidence
    date: date | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    codes: frozenset[str] = frozenset()  # value-set ids the item's code belongs to (for code_in)
    span: tuple[date, date] | None = None  # (earliest, latest) day the item's date can stand for
    support: tuple[Evidence, ...] = ()
    certain: bool = True  # False: provisional, preliminary, out of range …: can make a rule unknown, never true
    text_only: bool = False  # recognised from its text alone (no code): never meets a requirement on its own

    def get(self, name: str) -> Any:
        return self.fields.get(name)

    @property
    def latest_date(self) -> date | None:
        return self.span[1] if self.span else self.date


@dataclass(frozen=True)
class Verdict:
    value: Truth
    evidence: tuple[Evidence, ...] = ()

    @staticmethod
    def of(value: Truth, items: list[Item] | tuple[Item, ...] = ()) -> Verdict:
        """The verdict with its evidence: every item's own evidence first, then what supports them, up to
        MAX_EVIDENCE (so that the supporting records of one item never crowd out another item)."""
        seen: dict[str, Evidence] = {}
        for evidence in [i.evidence for i in items] + [s for i in items for s in i.support]:
            if len(seen) >= MAX_EVIDENCE:
                break
            seen.setdefault(evidence.reference + (evidence.date or ""), evidence)
        return Verdict(value, tuple(seen.values()))


def compare(op: str, actual: Any, expected: Any) -> Truth:
    """`actual op expected`, three-valued: Bounds decide only when both ends agree; a type mismatch is unknown."""
    if isinstance(actual, Bounds):
        low, high = compare(op, actual.low, expected), compare(op, actual.high, expected)
        return low if low == high else None
    try:
        return bool(_OPS[op](actual, expected))
    except TypeError:
        return None


class FactSource(Protocol):
    """Where rules get facts from during one evaluation (cached per order group and policy).

    `strict` is set while a conclusion that moves toward authorization is evaluated (a requirement met, an
    exclusion lifted): then an item recognised only from text (`Item.text_only`) counts as unknown, not true.
    """

    today: date
    strict: bool

    def fact(self, name: str) -> Fact: ...


# --- conditions on items ----------------------------------------------------------------------------
class Cond:
    def test(self, item: Item, today: date) -> Truth:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class _AllCond(Cond):
    parts: tuple[Cond, ...]

    def test(self, item: Item, today: date) -> Truth:
        results = [p.test(item, today) for p in self.parts]
        if any(r is False for r in results):
            return False
        return None if any(r is None for r in results) else True


@dataclass(frozen=True)
class _AnyCond(Cond):
    parts: tuple[Cond, ...]

    def test(self, item: Item, today: date) -> Truth:
        results = [p.test(item, today) for p in self.parts]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False


@dataclass(frozen=True)
class _NotCond(Cond):
    part: Cond

    def test(self, item: Item, today: date) -> Truth:
        r = self.part.test(item, today)
        return None if r is None else not r


@dataclass(frozen=True)
class _FieldCond(Cond):
    field: str
    op: str
    value: Any

    def test(self, item: Item, today: date) -> Truth:
        actual = item.get(self.field)
        if self.op == "present":
            return (actual is not None) is bool(self.value)
        if actual is None:
            return None
        if self.op == "is":
            return actual is self.value if isinstance(self.value, bool) else actual == self.value
        if self.op == "in":
            return actual in self.value
        if self.op == "contains":
            return self.value in actual if isinstance(actual, set | frozenset | tuple | list) else None
        return compare(self.op, actual, self.value)


@dataclass(frozen=True)
class _WithinDays(Cond):
    days: int
    older: bool  # True: older_than_days
    of: str | None = None  # a date field of the item (e.g. "end") instead of the item's date

    def test(self, item: Item, today: date) -> Truth:
        if self.of:
            when = item.get(self.of)
            span = when if isinstance(when, tuple) else ((when, when) if isinstance(when, date) else None)
        else:
            span = item.span or ((item.date, item.date) if isinstance(item.date, date) else None)
        if span is None or not all(isinstance(d, date) for d in span):
            return None
        # Negative ages (future dates) count as recent. A partial date decides only when every day it can
        # stand for gives the same answer.
        oldest, newest = (today - span[0]).days, (today - span[1]).days
        answers = {age > self.days if self.older else age <= self.days for age in (oldest, newest)}
        return answers.pop() if len(answers) == 1 else None


@dataclass(frozen=True)
class _CodeIn(Cond):
    valueset: str

    def test(self, item: Item, today: date) -> Truth:
        return self.valueset in item.codes


@dataclass(frozen=True)
class _TrueCond(Cond):
    def test(self, item: Item, today: date) -> Truth:
        return True


# --- rules --------------------------------------------------------------------------------------------
class Rule:
    facts: frozenset[str] = frozenset()

    def evaluate(self, src: FactSource) -> Verdict:  # pragma: no cover - interface
        raise NotImplementedError


def _items(fact: Fact) -> tuple[Item, ...]:
    value = fact.value
    return value if isinstance(value, tuple) else ()


def _partition(fact: Fact, where: Cond, src: FactSource) -> tuple[list[Item], list[Item]]:
    """Items for which `where` holds, and items for which it may hold (unknown, or held by uncertain evidence)."""
    true_items: list[Item] = []
    unknown_items: list[Item] = []
    strict = getattr(src, "strict", False)
    for item in _items(fact):
        r = where.test(item, src.today)
        if r is True and item.certain and not (strict and item.text_only):
            true_items.append(item)
        elif r is not False:
            unknown_items.append(item)
    return true_items, unknown_items


def _complete(fact: Fact) -> bool:
    return fact.state is not FactState.UNAVAILABLE and fact.complete


@dataclass(frozen=True)
class _All(Rule):
    parts: tuple[Rule, ...]
    facts: frozenset[str] = frozenset()

    def evaluate(self, src: FactSource) -> Verdict:
        verdicts = [p.evaluate(src) for p in self.parts]
        if any(v.value is False for v in verdicts):
            return Verdict(False, sum((v.evidence for v in verdicts if v.value is False), ()))
        value = None if any(v.value is None for v in verdicts) else True
        return Verdict(value, sum((v.evidence for v in verdicts), ()))


@dataclass(frozen=True)
class _Any(Rule):
    parts: tuple[Rule, ...]
    facts: frozenset[str] = frozenset()

    def evaluate(self, src: FactSource) -> Verdict:
        verdicts = [p.evaluate(src) for p in self.parts]
        if any(v.value is True for v in verdicts):
            return Verdict(True, sum((v.evidence for v in verdicts if v.value is True), ()))
        value = None if any(v.value is None for v in verdicts) else False
        return Verdict(value, sum((v.evidence for v in verdicts if v.value is None), ()))


@dataclass(frozen=True)
class _Not(Rule):
    part: Rule
    facts: frozenset[str] = frozenset()

    def evaluate(self, src: FactSource) -> Verdict:
        v = self.part.evaluate(src)
        return Verdict(None if v.value is None else not v.value, v.evidence)


@dataclass(frozen=True)
class _After:
    """Items must be dated on or after the latest dated item of another fact (e.g. a clearance given after
    the diagnosis it clears). Without such an item the constraint does not apply."""

    fact_name: str
    where: Cond

    def bound(self, src: FactSource) -> tuple[date, date] | None:
        """(earliest, latest) day the latest item that matches — or may match — can be dated to; None without a
        dated one. A clearance must postdate every possible trigger, not only the certain ones."""
        fact = src.fact(self.fact_name)
        items, maybe = _partition(fact, self.where, src)
        doubtful = [i for i in _items(fact) if not i.certain]  # its values may be wrong: it may be a trigger
        dated = [i for i in (*items, *maybe, *doubtful) if i.date is not None]
        if not dated:
            return None
        return max(i.date for i in dated if i.date), max(i.latest_date for i in dated if i.latest_date)


@dataclass(frozen=True)
class _Exists(Rule):
    fact_name: str
    where: Cond
    absent_unknown: bool
    facts: frozenset[str] = frozenset()
    after: tuple[_After, ...] = ()

    def evaluate(self, src: FactSource) -> Verdict:
        fact = src.fact(self.fact_name)
        true_items, unknown_items = _partition(fact, self.where, src)
        bounds = [b for b in (a.bound(src) for a in self.after) if b is not None]
        if bounds:
            bound = (max(b[0] for b in bounds), max(b[1] for b in bounds))  # after the latest of them all
            if bound is not None:
                earliest, latest = bound
                # Surely after: the item's earliest day is on/after every day the bound can be. Possibly after:
                # its latest day reaches the bound's earliest day — that one is undecided, not dropped.
                surely = [i for i in true_items if i.date is not None and i.date >= latest]
                maybe = [i for i in true_items if i not in surely and (i.latest_date or date.max) >= earliest]
                unknown_items = [i for i in unknown_items if (i.latest_date or date.max) >= earliest] + maybe
                true_items = surely
        if true_items:
            return Verdict.of(True, true_items)
        if unknown_items or not _complete(fact) or self.absent_unknown:
            return Verdict.of(None, unknown_items)
        return Verdict(False)


@dataclass(frozen=True)
class _Count(Rule):
    fact_name: str
    where: Cond
    op: str
    threshold: int
    distinct_field: str | None = None
    facts: frozenset[str] = frozenset()

    def evaluate(self, src: FactSource) -> Verdict:
        fact = src.fact(self.fact_name)
        true_items, unknown_items = _partition(fact, self.where, src)
        if self.distinct_field:
            name = self.distinct_field
            definite = {v for v in (i.get(name) for i in true_items) if v is not None}
            # Values that might still add to the count: those of items that may qualify, and every item whose
            # value is unknown (each could be a class not seen yet).
            maybe = [i.get(name) for i in unknown_items] + [None for i in true_items if i.get(name) is None]
            low = len(definite)
            high = low + len({v for v in maybe if v is not None} - definite) + sum(v is None for v in maybe)
        else:
            low, high = len(true_items), len(true_items) + len(unknown_items)
        if not _complete(fact):
            high = 10**9
        compare = _OPS[self.op]
        outcomes = {compare(n, self.threshold) for n in _sample_range(low, high, self.threshold)}
        if outcomes == {True}:
            return Verdict.of(True, true_items)
        if outcomes == {False}:
            return Verdict.of(False, true_items)
        return Verdict.of(None, [*true_items, *unknown_items])


def _sample_range(low: int, high: int, threshold: int) -> set[int]:
    """Values of [low, high] that decide a comparison with `threshold` (no need to enumerate all)."""
    candidates = {low, high, threshold - 1, threshold, threshold + 1}
    return {n for n in candidates if low <= n <= high}


@dataclass(frozen=True)
class _Latest(Rule):
    fact_name: str
    where: Cond
    then: Cond
    absent_unknown: bool
    facts: frozenset[str] = frozenset()

    def evaluate(self, src: FactSource) -> Verdict:
        fact = src.fact(self.fact_name)
        true_items, unknown_items = _partition(fact, self.where, src)
        dated = [i for i in true_items if i.date is not None]
        if not dated:
            if (
                unknown_items
                and not true_items
                and _complete(fact)
                and not self.absent_unknown
                and all(i.certain and self.then.test(i, src.today) is False for i in unknown_items)
            ):
                # Items that may or may not match `where` (a partial date at a window's edge), each saying "no":
                # whether they match or not, the answer is no.
                return Verdict.of(False, unknown_items)
            if not _complete(fact) or self.absent_unknown or true_items or unknown_items:
                return Verdict.of(None, [*true_items, *unknown_items])
            return Verdict(False)
        latest = max(dated, key=lambda i: (i.latest_date or date.min, i.date or date.min))
        # Any item that could be the real latest — a certain one whose date may fall later, or one that may match
        # `where` (uncertain evidence, a partial date at the window's edge) dated on or after it — must give the
        # same answer; an item that may match is never taken to give it.
        contenders = [i for i in dated if (i.latest_date or date.min) >= (latest.date or date.min)]
        doubtful = [
            i for i in unknown_items if i.date is None or (i.latest_date or date.min) >= (latest.date or date.min)
        ]
        answers = [self.then.test(i, src.today) for i in contenders]
        value = answers[0] if all(a == answers[0] for a in answers) else None
        if doubtful and value is not None and not all(self.then.test(i, src.today) == value for i in doubtful):
            value = None
        return Verdict.of(value, [*contenders, *doubtful])


@dataclass(frozen=True)
class _Value(Rule):
    fact_name: str
    op: str
    threshold: Any
    facts: frozenset[str] = frozenset()

    def evaluate(self, src: FactSource) -> Verdict:
        fact = src.fact(self.fact_name)
        if fact.state is not FactState.PRESENT or fact.value is None:
            return Verdict(None, fact.evidence)
        result = compare(self.op, fact.value, self.threshold) if self.op != "is" else fact.value == self.threshold
        return Verdict(result, fact.evidence)


# --- compilation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileContext:
    known_facts: frozenset[str]
    thresholds: Mapping[str, Any]
    known_valuesets: frozenset[str]
    where: str  # location prefix for error messages, e.g. "mgbhp-031.yaml criteria[3].met_when"


def _resolve(value: Any, ctx: CompileContext, path: str) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        name = value[1:]
        if name not in ctx.thresholds:
            raise RuleError(f"{path}: unknown threshold {value!r} (defined: {', '.join(sorted(ctx.thresholds))})")
        return ctx.thresholds[name]
    if isinstance(value, list):
        return tuple(_resolve(v, ctx, path) for v in value)
    return value


def _only_keys(node: Mapping[str, Any], allowed: set[str], path: str) -> None:
    extra = set(node) - allowed
    if extra:
        raise RuleError(f"{path}: unexpected key(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")


def _op_of(node: Mapping[str, Any], path: str, allowed: tuple[str, ...] = tuple(_OPS)) -> tuple[str, Any]:
    ops = [k for k in node if k in allowed]
    if len(ops) != 1:
        raise RuleError(f"{path}: expected exactly one comparison among {', '.join(allowed)}")
    return ops[0], node[ops[0]]


def compile_cond(node: Any, ctx: CompileContext, path: str) -> Cond:
    if not isinstance(node, Mapping) or not node:
        raise RuleError(f"{path}: a condition must be a non-empty mapping")
    if "all" in node or "any" in node:
        key = "all" if "all" in node else "any"
        _only_keys(node, {key}, path)
        parts = node[key]
        if not isinstance(parts, list) or not parts:
            raise RuleError(f"{path}.{key}: must be a non-empty list")
        compiled = tuple(compile_cond(p, ctx, f"{path}.{key}[{i}]") for i, p in enumerate(parts))
        return _AllCond(compiled) if key == "all" else _AnyCond(compiled)
    if "not" in node:
        _only_keys(node, {"not"}, path)
        return _NotCond(compile_cond(node["not"], ctx, f"{path}.not"))
    if "field" in node:
        allowed_ops = (*_OPS, "in", "is", "present", "contains")
        _only_keys(node, {"field", *allowed_ops}, path)
        op, value = _op_of(node, path, allowed_ops)
        value = _resolve(value, ctx, path)
        if op == "in" and not isinstance(value, tuple):
            raise RuleError(f"{path}: 'in' needs a list")
        return _FieldCond(str(node["field"]), op, value)
    if "within_days" in node or "older_than_days" in node:
        key = "within_days" if "within_days" in node else "older_than_days"
        _only_keys(node, {key, "of"}, path)
        days = _resolve(node[key], ctx, path)
        if not isinstance(days, int) or days < 0:
            raise RuleError(f"{path}.{key}: must be a non-negative integer")
        return _WithinDays(days, older=key == "older_than_days", of=node.get("of"))
    if "code_in" in node:
        _only_keys(node, {"code_in"}, path)
        if node["code_in"] not in ctx.known_valuesets:
            raise RuleError(f"{path}: unknown value set {node['code_in']!r}")
        return _CodeIn(node["code_in"])
    raise RuleError(f"{path}: unknown condition {sorted(node)}")


def _fact_name(node: Mapping[str, Any], key: str, ctx: CompileContext, path: str) -> str:
    name = node[key]
    if name not in ctx.known_facts:
        raise RuleError(f"{path}: unknown fact {name!r}")
    return str(name)


def compile_rule(node: Any, ctx: CompileContext, path: str | None = None) -> Rule:
    """Compile a rule mapping; raises RuleError naming the exact location of a mistake."""
    path = path or ctx.where
    if not isinstance(node, Mapping) or not node:
        raise RuleError(f"{path}: a rule must be a non-empty mapping")
    where = compile_cond(node["where"], ctx, f"{path}.where") if "where" in node else _TrueCond()
    absent = node.get("absent", "false")
    if absent not in ("false", "unknown", False):
        raise RuleError(f"{path}.absent: must be 'unknown' or false")
    absent_unknown = absent == "unknown"
    if "all" in node or "any" in node:
        key = "all" if "all" in node else "any"
        _only_keys(node, {key}, path)
        if not isinstance(node[key], list) or not node[key]:
            raise RuleError(f"{path}.{key}: must be a non-empty list")
        parts = tuple(compile_rule(p, ctx, f"{path}.{key}[{i}]") for i, p in enumerate(node[key]))
        facts = frozenset().union(*(p.facts for p in parts))
        return _All(parts, facts) if key == "all" else _Any(parts, facts)
    if "not" in node:
        _only_keys(node, {"not"}, path)
        part = compile_rule(node["not"], ctx, f"{path}.not")
        return _Not(part, part.facts)
    if "exists" in node:
        _only_keys(node, {"exists", "where", "absent", "after"}, path)
        name = _fact_name(node, "exists", ctx, path)
        afters: list[_After] = []
        specs = node.get("after", [])
        for i, spec in enumerate(specs if isinstance(specs, list) else [specs]):
            where_at = f"{path}.after" + (f"[{i}]" if isinstance(specs, list) else "")
            if not isinstance(spec, Mapping) or "fact" not in spec or set(spec) - {"fact", "where"}:
                raise RuleError(f"{where_at}: needs 'fact' (and optionally 'where')")
            after_fact = _fact_name(spec, "fact", ctx, where_at)
            after_where = compile_cond(spec["where"], ctx, f"{where_at}.where") if "where" in spec else _TrueCond()
            afters.append(_After(after_fact, after_where))
        after = tuple(afters)
        facts = frozenset({name} | {a.fact_name for a in after})
        return _Exists(name, where, absent_unknown, facts, after)
    if "count" in node or "distinct" in node:
        key = "count" if "count" in node else "distinct"
        allowed = {key, "where", *_OPS} | ({"field"} if key == "distinct" else set())
        _only_keys(node, allowed, path)
        name = _fact_name(node, key, ctx, path)
        op, threshold = _op_of(node, path)
        threshold = _resolve(threshold, ctx, path)
        if not isinstance(threshold, int):
            raise RuleError(f"{path}: a count threshold must be an integer")
        if key == "distinct" and "field" not in node:
            raise RuleError(f"{path}: 'distinct' needs 'field'")
        return _Count(name, where, op, threshold, node.get("field"), frozenset({name}))
    if "latest" in node:
        _only_keys(node, {"latest", "where", "then", "absent"}, path)
        name = _fact_name(node, "latest", ctx, path)
        if "then" not in node:
            raise RuleError(f"{path}: 'latest' needs 'then'")
        then = compile_cond(node["then"], ctx, f"{path}.then")
        return _Latest(name, where, then, absent_unknown, frozenset({name}))
    if "value" in node:
        _only_keys(node, {"value", *_OPS, "is"}, path)
        name = _fact_name(node, "value", ctx, path)
        op, threshold = _op_of(node, path, (*_OPS, "is"))
        return _Value(name, op, _resolve(threshold, ctx, path), frozenset({name}))
    raise RuleError(f"{path}: unknown rule {sorted(node)}")


# --- explanation (explain tools only: evaluation never calls this) -------------------------------------
@dataclass(frozen=True)
class RuleTrace:
    """A rule's verdict with the verdicts of its parts, for `ketamine-cds evaluate --explain`."""

    text: str  # the rule in words, thresholds resolved: "exists phq9_scores where (within 30 days and value >= 15)"
    value: Truth
    evidence: tuple[Evidence, ...]
    parts: tuple[RuleTrace, ...] = ()


def explain_rule(rule: Rule, src: FactSource) -> RuleTrace:
    """Evaluate `rule` again, part by part. Rules are pure functions of the (cached) facts, so this gives the
    verdicts the engine saw, at no cost to the request path."""
    verdict = rule.evaluate(src)
    parts: tuple[Rule, ...] = ()
    if isinstance(rule, _All | _Any):
        parts = rule.parts
    elif isinstance(rule, _Not):
        parts = (rule.part,)
    return RuleTrace(describe_rule(rule), verdict.value, verdict.evidence, tuple(explain_rule(p, src) for p in parts))


def _said(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_said(v) for v in value) + "]"
    return str(value)


def describe_cond(cond: Cond) -> str:
    """A condition in words (thresholds resolved)."""
    if isinstance(cond, _AllCond | _AnyCond):
        joiner = " and " if isinstance(cond, _AllCond) else " or "
        return "(" + joiner.join(describe_cond(p) for p in cond.parts) + ")"
    if isinstance(cond, _NotCond):
        inner = describe_cond(cond.part)
        return "not " + (inner if inner.startswith("(") else f"({inner})")
    if isinstance(cond, _FieldCond):
        return f"{cond.field} {cond.op} {_said(cond.value)}"
    if isinstance(cond, _WithinDays):
        what = f"{cond.of} " if cond.of else ""
        return f"{what}{'older than' if cond.older else 'within'} {cond.days} days"
    if isinstance(cond, _CodeIn):
        return f"code in {cond.valueset}"
    return "any item"


def describe_rule(rule: Rule) -> str:
    """A rule in words (thresholds resolved); composite rules name only their connective."""
    if isinstance(rule, _All):
        return "all of"
    if isinstance(rule, _Any):
        return "any of"
    if isinstance(rule, _Not):
        return "not"

    def where(cond: Cond) -> str:
        return "" if isinstance(cond, _TrueCond) else f" where {describe_cond(cond)}"

    if isinstance(rule, _Exists):
        text = f"exists {rule.fact_name}{where(rule.where)}"
        for after in rule.after if isinstance(rule.after, tuple) else (rule.after,) if rule.after else ():
            text += f", dated on or after the latest {after.fact_name}{where(after.where)}"
        return text + (" (none on record: unknown)" if rule.absent_unknown else "")
    if isinstance(rule, _Count):
        counted = f"distinct {rule.distinct_field} of {rule.fact_name}" if rule.distinct_field else rule.fact_name
        return f"count {counted}{where(rule.where)} {rule.op} {rule.threshold}"
    if isinstance(rule, _Latest):
        text = f"latest {rule.fact_name}{where(rule.where)} has {describe_cond(rule.then)}"
        return text + (" (none on record: unknown)" if rule.absent_unknown else "")
    if isinstance(rule, _Value):
        return f"{rule.fact_name} {rule.op} {_said(rule.threshold)}"
    return type(rule).__name__
