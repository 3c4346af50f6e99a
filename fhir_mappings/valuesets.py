"""Value sets and the code matcher every policy criterion uses.

Why this exists: criteria name value sets ("dx_mdd", "med_ssri"), never codes. The codes live in hand-edited YAML
files (``fhir_mappings/valuesets/*.yaml``) so informaticists can review and tune them with their sources beside
them. This module validates those files once at start-up and then answers "does this Coding / CodeableConcept
belong to value set X, and how?" in constant time per coding, returning the evidence (code, display, match kind)
that decisions and cards quote.

Matching rules (see the header of any value-set file for the file format):

* systems are compared after alias normalisation (``SYSTEM_ALIASES``: OIDs, older FHIR URIs, http/https variants);
* ICD-10-CM, CPT, HCPCS and NUCC codes are compared case-insensitively, ICD-10-CM also dot-insensitively;
* NDCs are normalised to 11 digits (5-4-2) from 4-4-2 / 5-3-2 / 5-4-1 hyphenated, 11-digit and 10-digit forms;
* ``match: prefix`` includes match any code starting with a listed prefix (a set lookup per prefix length);
* ``match: ingredient`` includes (RxNorm only) map product codes (SCD/SBD/BN/GPCK/PIN/MIN...) to ingredient RxCUIs
  with ``valuesets/rxnorm_ingredients.json`` and match when any ingredient is listed;
* ``text_patterns`` (case-insensitive, whole words, punctuation-insensitive) are tried on ``CodeableConcept.text``
  and ``coding.display`` only when no coding matched.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fhir_mappings.reading.text import TextFinding, pattern_regex, shared_reader, strongest

__all__ = [
    "CPT",
    "HCPCS",
    "ICD10CM",
    "LOCAL",
    "LOINC",
    "NDC",
    "NUCC",
    "RXNORM",
    "SNOMED",
    "SOPT",
    "SYSTEM_ALIASES",
    "CodeMatch",
    "ValueSet",
    "ValueSetError",
    "ValueSetRegistry",
    "canonical_system",
    "normalize_ndc",
]

# --- code systems ---------------------------------------------------------------------------------------------

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
NUCC = "http://nucc.org/provider-taxonomy"
SOPT = "https://nahdo.org/sopt"
NDC = "http://hl7.org/fhir/sid/ndc"
V3_ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_ROLECODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
V3_OBS_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_POLICY = "http://terminology.hl7.org/CodeSystem/consentpolicycodes"
LOCAL = "http://ketamine-cds.example.org/CodeSystem/local"

#: Alternate system URIs seen in real feeds -> the canonical URI the value-set files use. Sources: SOPT OID from
#: VSAC Payer Type 2.16.840.1.114222.4.11.3591 (older expansions); SNOMED/RxNorm/LOINC OIDs from the FHIR R4
#: "terminologies-systems" page; ICD-10-CM and CPT OIDs as used by C-CDA-on-FHIR mappings; STU3 v3 URIs from the
#: FHIR STU3 value-set pages; the https HCPCS URI is a common variant of the US Core URI.
SYSTEM_ALIASES: dict[str, str] = {
    "urn:oid:2.16.840.1.113883.3.221.5": SOPT,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    "urn:oid:2.16.840.1.113883.6.12": CPT,
    "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": HCPCS,
    "http://hl7.org/fhir/v3/ActCode": V3_ACTCODE,
    "http://hl7.org/fhir/v3/RoleCode": V3_ROLECODE,
}

_SHORT_NAMES: dict[str, str] = {
    ICD10CM: "ICD-10-CM",
    SNOMED: "SNOMED CT",
    RXNORM: "RxNorm",
    LOINC: "LOINC",
    CPT: "CPT",
    HCPCS: "HCPCS",
    NUCC: "NUCC",
    SOPT: "SOPT",
    NDC: "NDC",
    V3_ACTCODE: "ActCode",
    V3_ROLECODE: "RoleCode",
    V3_OBS_INTERPRETATION: "ObservationInterpretation",
    CONSENT_SCOPE: "ConsentScope",
    CONSENT_POLICY: "ConsentPolicy",
    LOCAL: "Local",
}

# Codes in these systems are upper-case by definition; data sometimes is not.
_CASE_INSENSITIVE = frozenset({ICD10CM, CPT, HCPCS, NUCC})

_DEFAULT_DIR = Path(__file__).resolve().parent / "valuesets"
_RXNORM_FILE = "rxnorm_ingredients.json"

_VERIFICATION = frozenset({"verified", "secondary", "unverified", "local-default", "gap"})
_MATCH_KINDS = frozenset({"exact", "prefix", "ingredient"})
_SET_KEYS = frozenset(
    {"title", "policy_refs", "verification", "source", "notes", "include", "text_patterns", "site_configurable"}
)
_REQUIRED_SET_KEYS = ("title", "verification", "source", "include")
_INCLUDE_KEYS = frozenset({"system", "match", "prefixes", "concepts"})
_CONCEPT_KEYS = frozenset({"code", "display", "verification", "note"})
_EXTEND_KEYS = frozenset({"system", "code", "display"})
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class ValueSetError(ValueError):
    """A value-set file (or a site-config addition) is invalid; the message names the file and the value set."""


# --- normalisation ----------------------------------------------------------------------------------------------


def canonical_system(system: object) -> str:
    """Return the canonical URI for a coding system (aliases resolved, whitespace and a trailing slash dropped)."""
    if not isinstance(system, str):
        return ""
    s = system.strip()
    if s.endswith("/") and not s.startswith("urn:"):
        s = s.rstrip("/")
    if s.startswith(SNOMED + "/") and s[len(SNOMED) + 1 :].isdigit():
        return SNOMED  # an edition/module URI put into Coding.system instead of Coding.version
    return SYSTEM_ALIASES.get(s, s)


def normalize_ndc(code: str) -> tuple[str, ...]:
    """Return the 11-digit (5-4-2) form(s) an NDC can stand for; more than one only for ambiguous 10-digit input.

    Hyphenated 4-4-2, 5-3-2 and 5-4-1 codes are padded in the short segment; 11 digits pass through. A bare 10-digit
    code does not say which segment is short, so all three readings are returned and the caller tries each.
    """
    s = code.strip().replace(" ", "")
    if "-" in s:
        parts = s.split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return ()
        lens = tuple(len(p) for p in parts)
        if lens == (5, 4, 2):
            return ("".join(parts),)
        if lens == (4, 4, 2):
            return ("0" + "".join(parts),)
        if lens == (5, 3, 2):
            return (parts[0] + "0" + parts[1] + parts[2],)
        if lens == (5, 4, 1):
            return (parts[0] + parts[1] + "0" + parts[2],)
        return ()
    if not s.isdigit():
        return ()
    if len(s) == 11:
        return (s,)
    if len(s) == 10:
        return ("0" + s, s[:5] + "0" + s[5:], s[:9] + "0" + s[9:])
    return ()


def _norm_keys(system: str, code: str) -> tuple[str, ...]:
    """Comparison key(s) for a code in a (canonical) system."""
    if system == NDC:
        return normalize_ndc(code)
    c = code.strip()
    if system in _CASE_INSENSITIVE:
        c = c.upper()
        if system == ICD10CM:
            c = c.replace(".", "")
    return (c,) if c else ()


def _norm_text(text: str) -> str:
    """Lower-case, accent-free, punctuation-free text padded with spaces, for whole-word containment tests."""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(ch for ch in t if not unicodedata.combining(ch)).lower()
    t = re.sub(r"[^0-9a-z]+", " ", t).strip()
    return f" {t} " if t else ""


# --- results ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeMatch:
    """Evidence that a coding (or a text) belongs to a value set; ``via`` says how, for audit and cards."""

    valueset: str
    system: str
    code: str  # as found in the data
    display: str | None  # from the data's coding, else from the value set
    via: str  # "exact" | "prefix" | "ingredient:<rxcui>" | "text"
    assertion: str = "coded"  # "coded", or the ConText assertion of a text match ("affirmed", "historical")

    def label(self) -> str:
        """Short human label for cards, e.g. ``ICD-10-CM F33.2`` or ``text "ketamine troche"``."""
        if self.via == "text":
            return f'text "{self.display or ""}"'
        name = _SHORT_NAMES.get(self.system) or self.system.rstrip("/").rsplit("/", 1)[-1] or "code"
        return f"{name} {self.code}"


# --- RxNorm product -> ingredient index ----------------------------------------------------------------------------


class _RxNormIndex:
    """Offline RxNorm product -> ingredient map (copied from the reference, with provenance in the JSON file)."""

    def __init__(self, products: dict[str, frozenset[str]], names: dict[str, str], known: set[str]) -> None:
        self.products = products
        self.names = names
        self.known_ingredients = known

    @classmethod
    def from_file(cls, path: Path) -> _RxNormIndex:
        """Load and validate ``rxnorm_ingredients.json``; null ingredient RxCUIs are kept out of the sets."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueSetError(f"{path}: cannot read RxNorm ingredient map: {exc}") from exc
        products_raw = raw.get("products") if isinstance(raw, dict) else None
        if not isinstance(products_raw, list):
            raise ValueSetError(f"{path}: RxNorm ingredient map needs a 'products' list")
        products: dict[str, frozenset[str]] = {}
        names: dict[str, str] = {}
        known: set[str] = set()
        for i, p in enumerate(products_raw):
            if not isinstance(p, dict) or not isinstance(p.get("rxcui"), str) or not p["rxcui"].strip():
                raise ValueSetError(f"{path}: products[{i}] needs a string 'rxcui'")
            ings = p.get("ingredients")
            if not isinstance(ings, list):
                raise ValueSetError(f"{path}: products[{i}] ({p['rxcui']}) needs an 'ingredients' list")
            rx: set[str] = set()
            for ing in ings:
                if not isinstance(ing, dict):
                    raise ValueSetError(f"{path}: products[{i}] ({p['rxcui']}) has a malformed ingredient")
                val = ing.get("rxcui")
                if isinstance(val, str) and val.strip():
                    rx.add(val.strip())
                elif val is not None:
                    raise ValueSetError(f"{path}: products[{i}] ({p['rxcui']}) ingredient rxcui must be string/null")
            code = p["rxcui"].strip()
            products[code] = products.get(code, frozenset()) | frozenset(rx)
            if isinstance(p.get("name"), str):
                names[code] = p["name"]
            known |= rx
        return cls(products, names, known)

    def ingredients(self, code: str) -> frozenset[str]:
        """Ingredient RxCUIs of a product code; an ingredient maps to itself; unknown codes map to nothing."""
        hit = self.products.get(code)
        if hit is not None:
            return hit
        if code in self.known_ingredients:
            return frozenset((code,))
        return frozenset()


# --- value sets ---------------------------------------------------------------------------------------------------


class ValueSet:
    """One named value set, compiled into hash tables so that matching a coding costs a few dict lookups."""

    def __init__(
        self,
        *,
        vs_id: str,
        title: str,
        source: str,
        verification: str,
        site_configurable: bool,
        policy_refs: tuple[str, ...],
        notes: str,
        text_patterns: tuple[str, ...],
        file: str,
        rxnorm: _RxNormIndex,
    ) -> None:
        self.id = vs_id
        self.title = title
        self.source = source
        self.verification = verification
        self.site_configurable = site_configurable
        self.policy_refs = policy_refs
        self.notes = notes
        self.text_patterns = text_patterns
        self.file = file
        self._rx = rxnorm
        # system -> normalised key -> (code as listed, display); every listed concept matches itself.
        self._listed: dict[str, dict[str, tuple[str, str | None]]] = {}
        # (system, code) of codes in `match: exact` includes and site additions: valid FHIR search tokens.
        self._search: dict[tuple[str, str], None] = {}
        # system -> (prefixes, distinct prefix lengths longest first)
        self._prefixes: dict[str, tuple[frozenset[str], tuple[int, ...]]] = {}
        # RxNorm ingredient RxCUI -> display, for `match: ingredient` includes
        self._ingredients: dict[str, str | None] = {}
        self._patterns: tuple[str, ...] = tuple(p for p in (_norm_text(t) for t in text_patterns) if p)
        self._regexes: tuple[re.Pattern[str], ...] = tuple(r for r in map(pattern_regex, text_patterns) if r)

    # -- building (loader only) --

    def _add_concept(self, system: str, code: str, display: str | None, *, searchable: bool) -> None:
        keys = _norm_keys(system, code)
        if len(keys) != 1:
            raise ValueError(f"code {code!r} is not a valid {_SHORT_NAMES.get(system, system)} code")
        self._listed.setdefault(system, {})[keys[0]] = (code.strip(), display)
        if searchable:
            self._search[(system, code.strip())] = None

    def _add_prefixes(self, system: str, prefixes: Iterable[str]) -> None:
        old, _ = self._prefixes.get(system, (frozenset(), ()))
        new = set(old)
        for p in prefixes:
            keys = _norm_keys(system, p) if system != NDC else (p.strip(),)
            if len(keys) != 1:
                raise ValueError(f"prefix {p!r} is empty")
            new.add(keys[0])
        lengths = tuple(sorted({len(p) for p in new}, reverse=True))
        self._prefixes[system] = (frozenset(new), lengths)

    def _add_ingredient(self, code: str, display: str | None) -> None:
        self._ingredients[code.strip()] = display

    # -- matching --

    def match_coding(self, coding: Mapping[str, Any] | None) -> CodeMatch | None:
        """Match one FHIR Coding dict: listed code, then prefix, then RxNorm ingredient."""
        if not isinstance(coding, dict):
            return None
        code = coding.get("code")
        if not isinstance(code, str) or not code.strip():
            return None
        system = canonical_system(coding.get("system"))
        if not system:
            return None
        data_display = coding.get("display") if isinstance(coding.get("display"), str) else None
        keys = _norm_keys(system, code)
        listed = self._listed.get(system)
        if listed:
            for key in keys:
                hit = listed.get(key)
                if hit is not None:
                    return CodeMatch(self.id, system, code, data_display or hit[1], "exact")
        pre = self._prefixes.get(system)
        if pre:
            prefixes, lengths = pre
            for key in keys:
                for n in lengths:
                    if n <= len(key) and key[:n] in prefixes:
                        return CodeMatch(self.id, system, code, data_display, "prefix")
        if self._ingredients and system == RXNORM:
            for rxcui in sorted(self._rx.ingredients(code.strip())):
                if rxcui in self._ingredients:
                    display = data_display or self._rx.names.get(code.strip()) or self._ingredients[rxcui]
                    return CodeMatch(self.id, system, code, display, f"ingredient:{rxcui}")
        return None

    def match_concept(self, concept: Mapping[str, Any] | None) -> CodeMatch | None:
        """Match a CodeableConcept: its codings first, then (only if none matched) the text patterns."""
        if not isinstance(concept, dict):
            return None
        codings = concept.get("coding")
        codings = [c for c in codings if isinstance(c, dict)] if isinstance(codings, list) else []
        for coding in codings:
            hit = self.match_coding(coding)
            if hit is not None:
                return hit
        if not self._patterns:
            return None
        text = concept.get("text")
        if isinstance(text, str):
            finding = self.find_in_text(text)
            if finding is not None and finding.assertion.positive:
                return CodeMatch(self.id, "", "", text, "text", finding.assertion.value)
        for coding in codings:
            display = coding.get("display")
            if isinstance(display, str):
                finding = self.find_in_text(display)
                if finding is not None and finding.assertion.positive:
                    code = coding.get("code")
                    return CodeMatch(
                        self.id,
                        canonical_system(coding.get("system")),
                        code if isinstance(code, str) else "",
                        display,
                        "text",
                        finding.assertion.value,
                    )
        return None

    def match_text(self, text: str | None) -> CodeMatch | None:
        """Match free text alone against the text patterns (for resources that carry only narrative): only a
        mention the text affirms (now or in the past) matches — not "no …", "possible …", "if …", "mother …"."""
        finding = self.find_in_text(text) if isinstance(text, str) else None
        if finding is None or not finding.assertion.positive:
            return None
        return CodeMatch(self.id, "", "", text, "text", finding.assertion.value)

    def normalised_patterns(self) -> tuple[str, ...]:
        """The text patterns in normalised form (" positive ", " not detected "), for exact answer-word tests."""
        return self._patterns

    def find_in_text(self, text: str) -> TextFinding | None:
        """The deciding mention of this value set's text patterns in `text`, with its ConText assertion
        (affirmed, negated, uncertain, hypothetical, historical, family); None when none is mentioned."""
        if not self._patterns or not self._text_hit(text):
            return None  # a cheap whole-word test first: most texts mention nothing
        return strongest(shared_reader().find(text, self._regexes))

    def _text_hit(self, text: str) -> bool:
        norm = _norm_text(text)
        return bool(norm) and any(p in norm for p in self._patterns)

    # -- introspection --

    def search_codes(self) -> list[tuple[str, str]]:
        """(system, code) of the exactly-listed codes, usable as FHIR ``code=`` search tokens.

        Prefix and ingredient includes cannot be expressed as a token list, so their concepts are left out.
        """
        return list(self._search)

    def concepts(self) -> list[tuple[str, str, str | None]]:
        """Every listed (system, code, display), for documentation and site review."""
        listed = [(system, code, disp) for system, table in self._listed.items() for code, disp in table.values()]
        return listed + [(RXNORM, code, disp) for code, disp in self._ingredients.items()]

    def __len__(self) -> int:
        """Number of listed codes (concepts of every include); prefixes and text patterns are not counted."""
        return sum(len(t) for t in self._listed.values()) + len(self._ingredients)

    def __repr__(self) -> str:
        return f"ValueSet({self.id!r}, {len(self)} codes, {self.verification})"


# --- strict YAML loading ------------------------------------------------------------------------------------------

_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: Any, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in result
        except TypeError as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable mapping key {key!r}", key_node.start_mark
            ) from exc
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _fail(file: str, vs_id: str, problem: str) -> ValueSetError:
    return ValueSetError(f"{file}: value set '{vs_id}': {problem}")


def _str_list(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        return None
    return tuple(v.strip() for v in value)


def _build_set(file: str, vs_id: str, spec: Any, rx: _RxNormIndex) -> ValueSet:
    """Validate one value-set entry and compile it; every problem names the file and the value set."""
    if not isinstance(vs_id, str) or not _ID_RE.match(vs_id):
        raise _fail(file, str(vs_id), "id must be lower_snake_case (letters, digits, underscores)")
    if not isinstance(spec, dict):
        raise _fail(file, vs_id, "must be a mapping")
    unknown = sorted(set(spec) - _SET_KEYS, key=str)
    if unknown:
        raise _fail(file, vs_id, f"unknown key(s) {unknown}; allowed: {sorted(_SET_KEYS)}")
    for key in _REQUIRED_SET_KEYS:
        if key not in spec:
            raise _fail(file, vs_id, f"missing '{key}'")
    for key in ("title", "source"):
        if not isinstance(spec[key], str) or not spec[key].strip():
            raise _fail(file, vs_id, f"'{key}' must be a non-empty string")
    verification = spec["verification"]
    if verification not in _VERIFICATION:
        raise _fail(file, vs_id, f"verification {verification!r} not one of {sorted(_VERIFICATION)}")
    notes = spec.get("notes", "")
    if not isinstance(notes, str):
        raise _fail(file, vs_id, "'notes' must be a string")
    policy_refs = _str_list(spec.get("policy_refs", []))
    if policy_refs is None:
        raise _fail(file, vs_id, "'policy_refs' must be a list of strings")
    patterns = _str_list(spec.get("text_patterns", []))
    if patterns is None:
        raise _fail(file, vs_id, "'text_patterns' must be a list of non-empty strings")
    if any(not _norm_text(p) for p in patterns):
        raise _fail(file, vs_id, "a text pattern has no letters or digits")
    site_configurable = spec.get("site_configurable", False)
    if not isinstance(site_configurable, bool):
        raise _fail(file, vs_id, "'site_configurable' must be true or false")
    includes = spec["include"]
    if not isinstance(includes, list):
        raise _fail(file, vs_id, "'include' must be a list (use [] for a gap)")

    vs = ValueSet(
        vs_id=vs_id,
        title=spec["title"].strip(),
        source=spec["source"].strip(),
        verification=verification,
        site_configurable=site_configurable,
        policy_refs=policy_refs,
        notes=notes.strip(),
        text_patterns=patterns,
        file=file,
        rxnorm=rx,
    )
    for n, inc in enumerate(includes):
        where = f"include[{n}]"
        if not isinstance(inc, dict):
            raise _fail(file, vs_id, f"{where} must be a mapping")
        unknown = sorted(set(inc) - _INCLUDE_KEYS, key=str)
        if unknown:
            raise _fail(file, vs_id, f"{where}: unknown key(s) {unknown}; allowed: {sorted(_INCLUDE_KEYS)}")
        raw_system = inc.get("system")
        if not isinstance(raw_system, str) or not raw_system.strip():
            raise _fail(file, vs_id, f"{where}: 'system' must be a non-empty URI")
        system = canonical_system(raw_system)
        match = inc.get("match", "exact")
        if match not in _MATCH_KINDS:
            raise _fail(file, vs_id, f"{where}: match {match!r} not one of {sorted(_MATCH_KINDS)}")
        if "prefixes" in inc and match != "prefix":
            raise _fail(file, vs_id, f"{where}: 'prefixes' given without 'match: prefix'")
        if match == "ingredient" and system != RXNORM:
            raise _fail(file, vs_id, f"{where}: 'match: ingredient' only works for RxNorm ({RXNORM})")
        concepts = inc.get("concepts", [])
        if not isinstance(concepts, list):
            raise _fail(file, vs_id, f"{where}: 'concepts' must be a list")
        if match == "prefix":
            prefixes = _str_list(inc.get("prefixes"))
            if not prefixes:
                raise _fail(file, vs_id, f"{where}: 'match: prefix' needs a non-empty 'prefixes' list of strings")
            try:
                vs._add_prefixes(system, prefixes)
            except ValueError as exc:
                raise _fail(file, vs_id, f"{where}: {exc}") from exc
        elif not concepts:
            raise _fail(file, vs_id, f"{where}: no concepts (remove the include, or use 'include: []' for a gap)")
        for m, concept in enumerate(concepts):
            cwhere = f"{where}.concepts[{m}]"
            if not isinstance(concept, dict):
                raise _fail(file, vs_id, f"{cwhere} must be a mapping with 'code'")
            unknown = sorted(set(concept) - _CONCEPT_KEYS, key=str)
            if unknown:
                raise _fail(file, vs_id, f"{cwhere}: unknown key(s) {unknown}; allowed: {sorted(_CONCEPT_KEYS)}")
            if "code" not in concept:
                raise _fail(file, vs_id, f"{cwhere}: concept without 'code'")
            code = concept["code"]
            if not isinstance(code, str) or not code.strip():
                raise _fail(file, vs_id, f"{cwhere}: code {code!r} must be a non-empty quoted string")
            display = concept.get("display")
            if display is not None and not isinstance(display, str):
                raise _fail(file, vs_id, f"{cwhere}: display must be a string")
            cver = concept.get("verification")
            if cver is not None and cver not in _VERIFICATION:
                raise _fail(file, vs_id, f"{cwhere}: verification {cver!r} not one of {sorted(_VERIFICATION)}")
            if concept.get("note") is not None and not isinstance(concept.get("note"), str):
                raise _fail(file, vs_id, f"{cwhere}: note must be a string")
            try:
                if match == "ingredient":
                    vs._add_ingredient(code, display)
                else:
                    vs._add_concept(system, code, display, searchable=match == "exact")
            except ValueError as exc:
                raise _fail(file, vs_id, f"{cwhere}: {exc}") from exc
    if len(vs) == 0 and not vs._prefixes and not patterns and verification != "gap":
        raise _fail(file, vs_id, "has no codes, prefixes or text patterns; mark it 'verification: gap'")
    return vs


# --- registry -----------------------------------------------------------------------------------------------------


class ValueSetRegistry:
    """All value sets of one deployment, loaded and validated once; the engine asks it by value-set id."""

    def __init__(self, sets: dict[str, ValueSet], rxnorm: _RxNormIndex, digest: bytes) -> None:
        self._sets = sets
        self._rx = rxnorm
        self._digest = digest
        self._extensions: list[tuple[str, str, str, str | None]] = []
        self._fingerprint: str | None = None
        # (value-set id, concept content key) -> CodeMatch | None, shared by the requests of this registry: a
        # match depends only on the concept's content and the value set, so it is computed once per process.
        # `extend` (site configuration) empties it; FactContext bounds its size.
        self.match_cache: dict[tuple[str, tuple[Any, ...]], Any] = {}

    @classmethod
    def load(cls, directory: str | Path | None = None) -> ValueSetRegistry:
        """Load every ``*.yaml`` in ``directory`` (default: the packaged ``valuesets/``) plus the RxNorm map.

        The RxNorm map is ``rxnorm_ingredients.json`` in the same directory, else the packaged one. Any invalid
        file, unknown key, duplicate id (within or across files) raises ``ValueSetError`` naming file and id.
        """
        base = Path(directory) if directory is not None else _DEFAULT_DIR
        if not base.is_dir():
            raise ValueSetError(f"{base}: value-set directory not found")
        files = sorted(base.glob("*.yaml"))
        if not files:
            raise ValueSetError(f"{base}: no *.yaml value-set files")
        rx_path = base / _RXNORM_FILE
        if not rx_path.is_file():
            rx_path = _DEFAULT_DIR / _RXNORM_FILE
        rx = _RxNormIndex.from_file(rx_path)
        hasher = hashlib.sha256()
        hasher.update(rx_path.read_bytes())
        sets: dict[str, ValueSet] = {}
        for path in files:
            data = path.read_bytes()
            hasher.update(path.name.encode() + b"\0" + data)
            try:
                doc = yaml.load(data, Loader=_StrictLoader)  # _StrictLoader derives from (C)SafeLoader
            except yaml.YAMLError as exc:
                raise ValueSetError(f"{path}: YAML error: {exc}") from exc
            if not isinstance(doc, dict) or set(doc) != {"valuesets"} or not isinstance(doc["valuesets"], dict):
                raise ValueSetError(f"{path}: the file must hold exactly one top-level key 'valuesets:' (a mapping)")
            for vs_id, spec in doc["valuesets"].items():
                if vs_id in sets:
                    raise _fail(str(path), str(vs_id), f"duplicate id, already defined in {sets[vs_id].file}")
                sets[vs_id] = _build_set(str(path), vs_id, spec, rx)
        for vs in sets.values():
            rx.known_ingredients.update(vs._ingredients)
        return cls(sets, rx, hasher.digest())

    def get(self, vs_id: str) -> ValueSet:
        """Return a value set; a KeyError names close ids so a typo in a policy file is obvious."""
        try:
            return self._sets[vs_id]
        except KeyError:
            close = difflib.get_close_matches(str(vs_id), list(self._sets), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown value set {vs_id!r}{hint}") from None

    def __contains__(self, vs_id: object) -> bool:
        return vs_id in self._sets

    def __iter__(self) -> Iterator[ValueSet]:
        return iter(self._sets[k] for k in sorted(self._sets))

    def __len__(self) -> int:
        return len(self._sets)

    def ids(self) -> list[str]:
        """All value-set ids, sorted."""
        return sorted(self._sets)

    def extend(self, vs_id: str, concepts: list[dict[str, Any]]) -> None:
        """Add site-configured codes (exact match) to a value set; call at start-up, before serving requests."""
        vs = self.get(vs_id)
        if not isinstance(concepts, list):
            raise ValueSetError(f"site config: value set '{vs_id}': additions must be a list of codings")
        checked: list[tuple[str, str, str | None]] = []
        for n, c in enumerate(concepts):
            where = f"site config: value set '{vs_id}': addition[{n}]"
            if not isinstance(c, dict):
                raise ValueSetError(f"{where} must be a mapping with 'system' and 'code'")
            unknown = sorted(set(c) - _EXTEND_KEYS, key=str)
            if unknown:
                raise ValueSetError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_EXTEND_KEYS)}")
            system, code, display = c.get("system"), c.get("code"), c.get("display")
            if not isinstance(system, str) or not system.strip():
                raise ValueSetError(f"{where}: 'system' must be a non-empty URI")
            if not isinstance(code, str) or not code.strip():
                raise ValueSetError(f"{where}: 'code' must be a non-empty string")
            if display is not None and not isinstance(display, str):
                raise ValueSetError(f"{where}: 'display' must be a string")
            canon = canonical_system(system)
            if len(_norm_keys(canon, code)) != 1:
                raise ValueSetError(f"{where}: {code!r} is not a valid code for {canon}")
            checked.append((canon, code.strip(), display))
        for canon, code, display in checked:
            vs._add_concept(canon, code, display, searchable=True)
            self._extensions.append((vs_id, canon, code, display))
        self._fingerprint = None
        self.match_cache.clear()

    def ingredients(self, system: str, code: str) -> frozenset[str]:
        """RxNorm ingredient RxCUIs of a product or ingredient code; empty for other systems or unknown codes."""
        if canonical_system(system) != RXNORM or not isinstance(code, str):
            return frozenset()
        return self._rx.ingredients(code.strip())

    def rxnorm_name(self, code: str) -> str | None:
        """The RxNorm name of a product code in the offline map (carries the strength: "… 50 MG Oral Tablet")."""
        return self._rx.names.get(code.strip()) if isinstance(code, str) else None

    def search_codes(self, vs_ids: Iterable[str]) -> list[tuple[str, str]]:
        """Union of ``ValueSet.search_codes`` over several sets, first occurrence order, no duplicates."""
        seen: dict[tuple[str, str], None] = {}
        for vs_id in vs_ids:
            for token in self.get(vs_id).search_codes():
                seen.setdefault(token, None)
        return list(seen)

    @property
    def fingerprint(self) -> str:
        """sha256 over the loaded files and the site additions: part of the "mapping-set version" in audits."""
        if self._fingerprint is None:
            h = hashlib.sha256(self._digest)
            h.update(json.dumps(self._extensions, sort_keys=True).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint
