"""Free text read with its context: is a mention affirmed, negated, uncertain, hypothetical, historical or
about a family member?

"Not a candidate for IV ketamine", "pregnancy ruled out", "denies ketamine use", "possible psychosis",
"if she becomes pregnant", "family history of schizophrenia" all contain the words a value set looks for;
none of them is the positive finding. The field's standard answer is the ConText algorithm (Harkema et al.,
J Biomed Inform 2009; NegEx before it), implemented by medspacy (`medspacy_context`, with its default rule
set). This module finds a value set's text patterns in a text (the same whole-word, case- and
punctuation-insensitive patterns the value-set files declare) and lets ConText decide each mention's
assertion, with the project's extra trigger terms from `text_context.yaml` (data an informaticist can tune).

Texts and their findings are cached (per process, bounded): notes repeat across calls and a finding never
changes for the same text. Nothing here logs text.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

RULES_FILE = Path(__file__).resolve().parent.parent / "text_context.yaml"
_CACHE_SIZE = 8192


class Assertion(StrEnum):
    """What a text says about a mention, strongest first (a negated family mention is negated)."""

    NEGATED = "negated"
    FAMILY = "family"
    HYPOTHETICAL = "hypothetical"
    UNCERTAIN = "uncertain"
    HISTORICAL = "historical"  # affirmed, but in the past ("history of …")
    AFFIRMED = "affirmed"

    @property
    def positive(self) -> bool:
        """Affirmed about the patient (now or in the past): the only assertions that count as a finding."""
        return self in (Assertion.AFFIRMED, Assertion.HISTORICAL)


@dataclass(frozen=True)
class TextFinding:
    """One mention of a value set's pattern, with its assertion and the sentence it sits in (for quoting)."""

    phrase: str
    assertion: Assertion
    sentence: str


def normalise(text: str) -> str:
    """Lower-case, accent-free, punctuation-free words padded with spaces (the value-set pattern form)."""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(ch for ch in t if not unicodedata.combining(ch)).lower()
    t = re.sub(r"[^0-9a-z]+", " ", t).strip()
    return f" {t} " if t else ""


def pattern_regex(pattern: str) -> re.Pattern[str] | None:
    """A regex finding `pattern` in original text: its words in order, separated by anything but letters and
    digits, not inside a longer word (so the pattern "HAM-D" finds "Ham-D" and "HAM D")."""
    words = normalise(pattern).split()
    if not words:
        return None
    body = r"[^0-9a-z]+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![0-9a-z]){body}(?![0-9a-z])", re.IGNORECASE)


class ContextReader:
    """Pattern search + medspacy ConText over one process. Thread-safe; construct once (see `shared_reader`)."""

    def __init__(self, rules: Sequence[Mapping[str, Any]] = ()) -> None:
        import spacy  # heavy imports: paid once per process, at start-up
        from medspacy.context import ConText, ConTextRule

        # PyRuSH (medspacy's default sentence splitter) logs token text at DEBUG through loguru: never used here.
        logging.getLogger("PyRuSH").setLevel(logging.WARNING)
        self._nlp = spacy.blank("en")
        self._sentencizer = self._nlp.add_pipe("sentencizer")
        self._context: ConText = self._nlp.add_pipe("medspacy_context")
        extra = [
            ConTextRule(
                literal=str(r["literal"]),
                category=str(r["category"]),
                direction=str(r.get("direction", "FORWARD")),
                pattern=r.get("pattern"),
                max_scope=r.get("max_scope"),
            )
            for r in rules
        ]
        if extra:
            self._context.add(extra)
        self._lock = threading.Lock()
        self._find = functools.lru_cache(maxsize=_CACHE_SIZE)(self._find_uncached)

    def find(self, text: str, patterns: tuple[re.Pattern[str], ...]) -> tuple[TextFinding, ...]:
        """Every mention of any of `patterns` in `text`, each with its ConText assertion."""
        if not text or not patterns:
            return ()
        return self._find(text, patterns)

    def _find_uncached(self, text: str, patterns: tuple[re.Pattern[str], ...]) -> tuple[TextFinding, ...]:
        spans = sorted({(m.start(), m.end()) for p in patterns for m in p.finditer(text)})
        if not spans:
            return ()
        with self._lock:
            doc = self._sentencizer(self._nlp.make_doc(text))
            ents = []
            taken = -1
            for start, end in spans:
                if start < taken:
                    continue  # overlapping mentions: keep the first
                span = doc.char_span(start, end, label="MENTION", alignment_mode="expand")
                if span is not None and span.start >= (ents[-1].end if ents else 0):
                    ents.append(span)
                    taken = end
            doc.ents = ents
            doc = self._context(doc)
            return tuple(
                TextFinding(phrase=ent.text, assertion=_assertion_of(ent), sentence=ent.sent.text.strip()[:300])
                for ent in doc.ents
            )


def _assertion_of(ent: Any) -> Assertion:
    ext = ent._
    if ext.is_negated:
        return Assertion.NEGATED
    if ext.is_family:
        return Assertion.FAMILY
    if ext.is_hypothetical:
        return Assertion.HYPOTHETICAL
    if ext.is_uncertain:
        return Assertion.UNCERTAIN
    if ext.is_historical:
        return Assertion.HISTORICAL
    return Assertion.AFFIRMED


def strongest(findings: Iterable[TextFinding]) -> TextFinding | None:
    """The finding that decides for a text: any affirmed mention wins (a text may both rule out and state
    a thing in different sentences: the statement stands); else the strongest non-positive one."""
    found = list(findings)
    positive = [f for f in found if f.assertion is Assertion.AFFIRMED] or [
        f for f in found if f.assertion is Assertion.HISTORICAL
    ]
    if positive:
        return positive[0]
    order = list(Assertion)
    return min(found, key=lambda f: order.index(f.assertion)) if found else None


_shared: ContextReader | None = None
_shared_lock = threading.Lock()


def shared_reader() -> ContextReader:
    """The process-wide reader with the shipped extra rules (loaded once; the spaCy pipeline is immutable).

    Built under a lock: a serving worker loads it in a background thread at start-up (cds_service.runtime), and a
    call that needs it meanwhile waits here for that one pipeline instead of building a second one. A failed
    build is not remembered: the next caller tries again and sees the same error.
    """
    global _shared
    reader = _shared
    if reader is not None:
        return reader
    with _shared_lock:
        if _shared is None:
            _shared = ContextReader(load_rules(RULES_FILE))
        return _shared


def reader_loaded() -> bool:
    """Whether `shared_reader()` would answer without loading spaCy and medspacy."""
    return _shared is not None


def load_rules(path: Path) -> list[dict[str, Any]]:
    """The extra ConText trigger terms: `rules: [{literal, category, direction}]` (see the file's header)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    rules = doc.get("rules") if isinstance(doc, Mapping) else None
    if not isinstance(rules, list):
        raise ValueError(f"{path.name}: needs a 'rules' list")
    categories = {"NEGATED_EXISTENCE", "POSSIBLE_EXISTENCE", "HYPOTHETICAL", "HISTORICAL", "FAMILY", "TERMINATE"}
    directions = {"FORWARD", "BACKWARD", "BIDIRECTIONAL", "TERMINATE", "PSEUDO"}
    for i, rule in enumerate(rules):
        if not isinstance(rule, Mapping) or not isinstance(rule.get("literal"), str):
            raise ValueError(f"{path.name}: rules[{i}] needs a 'literal' string")
        if rule.get("category") not in categories:
            raise ValueError(f"{path.name}: rules[{i}].category must be one of {sorted(categories)}")
        if rule.get("direction", "FORWARD") not in directions:
            raise ValueError(f"{path.name}: rules[{i}].direction must be one of {sorted(directions)}")
    return [dict(r) for r in rules]
