"""YAML (and JSON) loading that remembers where every value came from: file:line:column for any path.

The shipped loaders read plain Python data; informaticists need to be told *where* a mistake is. This
loader composes the document with libyaml (fast, same YAML 1.1 rules as the loaders), builds the data
itself and records the position of every key and value by its path (`("criteria", 3, "met_when")`), and
reports duplicate keys — which PyYAML silently resolves by keeping the last one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]
_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, order=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class LocatedDocument:
    """Data of one file plus the position of each path's value (and of each mapping key)."""

    file: str
    data: Any
    values: dict[Path, Position] = field(default_factory=dict)
    keys: dict[Path, Position] = field(default_factory=dict)
    duplicates: list[tuple[Path, Position, Position]] = field(default_factory=list)  # path, here, first
    text: str = ""  # the source, to point at a word inside a long (folded) text

    def find(self, path: Iterable[str | int], needle: str) -> Position:
        """Where `needle` first appears in the text value at `path` (words may wrap across lines)."""
        start = self.position(path)
        lines = self.text.splitlines()
        words = needle.split()
        if not words or start.line > len(lines):
            return start
        pattern = re.compile(r"\s+".join(re.escape(w) for w in words))
        offset = sum(len(line) + 1 for line in lines[: start.line - 1]) + start.column - 1
        m = pattern.search(self.text, offset)
        if m is None:
            return start
        before = self.text[: m.start()]
        line = before.count("\n") + 1
        return Position(line, m.start() - (before.rfind("\n") + 1) + 1)

    def position(self, path: Iterable[str | int], *, key: bool = False) -> Position:
        """Where `path` is (its key when `key`); the nearest ancestor that exists when it does not."""
        path = tuple(path)
        while path:
            table = self.keys if key and path in self.keys else self.values
            if path in table:
                return table[path]
            path = path[:-1]
            key = True  # a missing child is best shown at its parent's key
        return self.values.get((), Position(1, 1))


class LocatedYAMLError(ValueError):
    """The file is not valid YAML/JSON; carries the position of the problem."""

    def __init__(self, message: str, position: Position) -> None:
        super().__init__(message)
        self.position = position


def _position(mark: Any) -> Position:
    return Position(mark.line + 1, mark.column + 1) if mark is not None else Position(1, 1)


class _Builder:
    def __init__(self, doc: LocatedDocument) -> None:
        self.doc = doc
        self.constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.doc.values.setdefault(path, _position(node.start_mark))
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            first_seen: dict[Any, Position] = {}
            for key_node, value_node in self._pairs(node):
                key = self.build_scalar(key_node)
                if isinstance(key, list | dict):
                    key = str(key)
                here = _position(key_node.start_mark)
                child = (*path, key)
                if key in first_seen:
                    self.doc.duplicates.append((child, here, first_seen[key]))
                    continue
                first_seen[key] = here
                self.doc.keys[child] = here
                result[key] = self.build(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.build_scalar(node)

    def _pairs(self, node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
        """Key/value node pairs with `<<` merge keys expanded (explicit keys win, as in PyYAML)."""
        pairs: list[tuple[yaml.Node, yaml.Node]] = []
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    if isinstance(source, yaml.MappingNode):
                        merged.extend(self._pairs(source))
            else:
                pairs.append((key_node, value_node))
        explicit = {self.build_scalar(k) for k, _ in pairs if isinstance(k, yaml.ScalarNode)}
        return [*pairs, *((k, v) for k, v in merged if self.build_scalar(k) not in explicit)]

    def build_scalar(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return self.constructor.construct_object(node, deep=True)
        return self.constructor.construct_object(node, deep=True)


def load_located(text: str, file: str) -> LocatedDocument:
    """Parse YAML (JSON is YAML) with positions; raises LocatedYAMLError on a syntax error."""
    doc = LocatedDocument(file=file, data=None, text=text)
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise LocatedYAMLError(f"not valid YAML: {exc.problem or exc}", _position(mark)) from None
    except yaml.YAMLError as exc:
        raise LocatedYAMLError(f"not valid YAML: {exc}", Position(1, 1)) from None
    if node is None:
        doc.values[()] = Position(1, 1)
        return doc
    try:
        doc.data = _Builder(doc).build(node, ())
    except yaml.MarkedYAMLError as exc:
        raise LocatedYAMLError(f"not valid YAML: {exc.problem or exc}", _position(exc.problem_mark)) from None
    return doc


def load_located_json(text: str, file: str) -> LocatedDocument:
    """JSON through the YAML composer (positions for free), with JSON's own syntax check first."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise LocatedYAMLError(f"not valid JSON: {exc.msg}", Position(exc.lineno, exc.colno)) from None
    return load_located(text, file)
