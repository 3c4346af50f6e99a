"""One validation problem: file:line:column and a one-line reason, plus the located files being checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from fhir_mappings.validation.yamlpos import LocatedDocument, Path, Position


@dataclass(frozen=True, order=True)
class Problem:
    file: str  # as shown to the user: relative to the mapping directory, or the site-config path given
    line: int
    column: int
    message: str
    path: Path = field(default=(), compare=False)  # where in the document, for de-duplication
    check: str = field(default="", compare=False)  # schema | reference | code | text | loader | yaml

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "message": self.message,
            "check": self.check,
        }


@dataclass
class Collector:
    """Problems found so far, one per location and reason (several checks may see the same mistake)."""

    problems: list[Problem] = field(default_factory=list)

    def add(self, doc: LocatedDocument, path: Path, message: str, check: str, *, key: bool = False) -> None:
        self.at(doc.file, doc.position(path, key=key), message, check, path)

    def at(self, file: str, position: Position, message: str, check: str, path: Path = ()) -> None:
        message = " ".join(message.split())
        for p in self.problems:
            if p.file == file and p.line == position.line and (p.message == message or _same_spot(p, check, path)):
                return
        self.problems.append(Problem(file, position.line, position.column, message, path, check))

    def sorted(self) -> list[Problem]:
        return sorted(self.problems)


def _same_spot(existing: Problem, check: str, path: Path) -> bool:
    """Loader errors repeat what a precise check already said on the same line: keep the precise one."""
    return check == "loader" and existing.check != "loader"


def display_name(path: FsPath, base: FsPath) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
