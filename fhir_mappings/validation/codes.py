"""Is this a real code? ICD-10-CM against the code system itself; LOINC, SNOMED CT, RxNorm, CPT, HCPCS, NUCC and
NDC by shape and check digit.

ICD-10-CM comes from the `simple-icd-10-cm` package (the CMS April 2026 tabular list): its code list is read
directly when the package ships one (a few milliseconds), else through the package's API (a few seconds, as it
parses the whole classification). A code that is well-formed but not in the classification is "not an ICD-10-CM
code"; a prefix must start at least one real code.
"""

from __future__ import annotations

import bisect
import importlib.util
import re
from functools import cache
from pathlib import Path as FsPath

from fhir_mappings.valuesets import CPT, HCPCS, ICD10CM, LOINC, NDC, NUCC, RXNORM, SNOMED, normalize_ndc

_ICD_SHAPE = re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$")
_LOINC = re.compile(r"^(\d{1,7})-(\d)$")
_LOINC_PART = re.compile(r"^L[APG]\d{1,8}-\d$")  # answer (LA), part (LP) and group (LG) codes
_SNOMED = re.compile(r"^[1-9]\d{5,17}$")
_RXNORM = re.compile(r"^[1-9]\d{0,8}$")
_CPT = re.compile(r"^\d{4}[0-9FTU]$")
_HCPCS = re.compile(r"^[A-V]\d{4}$")
_NUCC = re.compile(r"^\d{3}[0-9A-Z]{6}X$")


@cache
def icd10cm_codes() -> tuple[str, ...]:
    """Every ICD-10-CM category and code, without dots, sorted (for lookups and prefix checks)."""
    codes: list[str] = []
    spec = importlib.util.find_spec("simple_icd_10_cm")  # locates the package without importing (and parsing) it
    if spec is not None and spec.origin:
        listing = sorted((FsPath(spec.origin).parent / "data").glob("code-list*.txt"))
        if listing:
            codes = listing[-1].read_text(encoding="utf-8").split()
    if not codes:
        import simple_icd_10_cm  # parses the classification: slow, hence only as a fallback

        codes = list(simple_icd_10_cm.get_all_codes(with_dots=False))
    return tuple(sorted(c.upper() for c in codes if "-" not in c and not c.isdigit()))


def _known_icd(code: str) -> bool:
    codes = icd10cm_codes()
    i = bisect.bisect_left(codes, code)
    return i < len(codes) and codes[i] == code


def _icd_prefix_exists(prefix: str) -> bool:
    codes = icd10cm_codes()
    i = bisect.bisect_left(codes, prefix)
    return i < len(codes) and codes[i].startswith(prefix)


def luhn_ok(digits: str) -> bool:
    """LOINC's mod-10 check digit (the last digit) over the digits before it."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return total % 10 == 0


_VERHOEFF_D = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]
_VERHOEFF_P = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
    [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
    [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
]


def verhoeff_ok(digits: str) -> bool:
    """SNOMED CT identifiers end in a Verhoeff check digit."""
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _VERHOEFF_D[c][_VERHOEFF_P[i % 8][int(ch)]]
    return c == 0


def code_problem(system: str, code: str) -> str | None:
    """Why `code` is not a valid code of `system` (canonical URI), or None when it is (or cannot be checked)."""
    c = code.strip()
    if system == ICD10CM:
        key = c.upper().replace(".", "")
        if not _ICD_SHAPE.match(c.upper()):
            return f"{code!r} is not a well-formed ICD-10-CM code (letter, digit, digit or letter, then up to 4)"
        if not _known_icd(key):
            return f"{code!r} is not an ICD-10-CM code (not in the April 2026 ICD-10-CM tabular list)"
        return None
    if system == LOINC:
        if _LOINC_PART.match(c):
            return None
        m = _LOINC.match(c)
        if not m:
            return f"{code!r} is not a well-formed LOINC code (digits, '-', check digit, e.g. 44261-6)"
        if not luhn_ok(m.group(1) + m.group(2)):
            return f"{code!r} is not a LOINC code: its check digit should be {_loinc_check_digit(m.group(1))}"
        return None
    if system == SNOMED:
        if not _SNOMED.match(c):
            return f"{code!r} is not a well-formed SNOMED CT identifier (6 to 18 digits)"
        if not verhoeff_ok(c):
            return f"{code!r} is not a SNOMED CT identifier: its Verhoeff check digit is wrong"
        if c[-3:-1] not in ("00", "10"):  # partition identifier: 00 / 10 concepts; 01, 02, 11, 12 other components
            return f"{code!r} is not a SNOMED CT concept id (its partition identifier says description or relationship)"
        return None
    if system == RXNORM:
        return None if _RXNORM.match(c) else f"{code!r} is not a well-formed RxNorm RxCUI (digits only)"
    if system == CPT:
        return None if _CPT.match(c.upper()) else f"{code!r} is not a well-formed CPT code (5 characters, e.g. 90791)"
    if system == HCPCS:
        if _HCPCS.match(c.upper()) or _CPT.match(c.upper()):
            return None
        return f"{code!r} is not a well-formed HCPCS code (a letter and 4 digits, e.g. J3490)"
    if system == NUCC:
        return None if _NUCC.match(c.upper()) else f"{code!r} is not a well-formed NUCC taxonomy code (e.g. 2084P0800X)"
    if system == NDC:
        return None if len(normalize_ndc(c)) >= 1 else f"{code!r} is not a well-formed NDC (e.g. 42023-0113-10)"
    return None


def prefix_problem(system: str, prefix: str) -> str | None:
    """Why a `match: prefix` entry can match nothing real, or None."""
    if system == ICD10CM:
        key = prefix.strip().upper().replace(".", "")
        if not re.match(r"^[A-Z][0-9A-Z]*$", key):
            return f"prefix {prefix!r} is not the start of an ICD-10-CM code"
        if not _icd_prefix_exists(key):
            return f"prefix {prefix!r} starts no ICD-10-CM code"
    return None


def _loinc_check_digit(number: str) -> int:
    for d in range(10):
        if luhn_ok(number + str(d)):
            return d
    return 0  # pragma: no cover - one digit always fits
