"""The minimum-adequate-dose table (fhir_mappings/dosing/*.yaml), loaded and checked once.

Policy 031 asks for trials "at generally accepted doses"; TRD research instruments (MGH ATRQ, ATHF-SF) define
those per ingredient. The table is data with a source per row; this module only validates and looks it up.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DOSING_DIR = Path(__file__).resolve().parent / "dosing"
_ROLES = frozenset({"antidepressant", "augmentation"})


class DoseTableError(ValueError):
    """The dose table is malformed; the message names the file and the row."""


@dataclass(frozen=True)
class MinimumDose:
    rxcui: str
    name: str
    role: str  # "antidepressant" | "augmentation"
    min_daily_mg: float | None
    source: str
    note: str = ""


@dataclass(frozen=True)
class DoseTable:
    rows: Mapping[tuple[str, str], MinimumDose]  # (rxcui, role) -> row
    by_name: Mapping[tuple[str, str], MinimumDose]  # (ingredient name, role) -> row
    file: str

    def minimum(self, rxcui: str | None, name: str | None, role: str) -> MinimumDose | None:
        """The row for an ingredient in a role, by RxCUI, else by name (a salt such as "lithium carbonate" finds
        "lithium"); None when the table has no row (adequacy then stays unknown)."""
        if rxcui and (rxcui, role) in self.rows:
            return self.rows[(rxcui, role)]
        words = (name or "").lower().split()
        for n in range(len(words), 0, -1):
            row = self.by_name.get((" ".join(words[:n]), role))
            if row is not None:
                return row
        return None


@functools.cache
def load_dose_table(name: str) -> DoseTable:
    """Load `dosing/<name>.yaml` (cached per process: the file is immutable while the service runs)."""
    path = DOSING_DIR / f"{name}.yaml"
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DoseTableError(f"{path.name}: cannot read dose table: {exc}") from None
    ingredients = doc.get("ingredients") if isinstance(doc, dict) else None
    if not isinstance(ingredients, list):
        raise DoseTableError(f"{path.name}: needs an 'ingredients' list")
    rows: dict[tuple[str, str], MinimumDose] = {}
    by_name: dict[tuple[str, str], MinimumDose] = {}
    for i, raw in enumerate(ingredients):
        row = _row(raw, f"{path.name} ingredients[{i}]")
        if row is None:
            continue
        if (row.rxcui, row.role) in rows:
            raise DoseTableError(f"{path.name} ingredients[{i}]: duplicate row for {row.rxcui} as {row.role}")
        rows[(row.rxcui, row.role)] = row
        by_name[(row.name.lower(), row.role)] = row
    return DoseTable(rows, by_name, path.name)


def _row(raw: Any, where: str) -> MinimumDose | None:
    if not isinstance(raw, dict):
        raise DoseTableError(f"{where}: must be a mapping")
    rxcui, name, role = raw.get("rxcui"), raw.get("name"), raw.get("role", "antidepressant")
    if not isinstance(rxcui, str) or not rxcui.strip() or not isinstance(name, str) or not name.strip():
        raise DoseTableError(f"{where}: needs 'rxcui' (a quoted string) and 'name'")
    if role not in _ROLES:
        raise DoseTableError(f"{where}: role must be one of {sorted(_ROLES)}")
    dose = raw.get("min_daily_mg")
    if dose is not None and (not isinstance(dose, int | float) or isinstance(dose, bool) or dose <= 0):
        raise DoseTableError(f"{where}: min_daily_mg must be a positive number (or absent)")
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise DoseTableError(f"{where}: needs a 'source'")
    note = raw.get("note", "")
    return MinimumDose(rxcui.strip(), name.strip(), role, float(dose) if dose is not None else None, source, str(note))
