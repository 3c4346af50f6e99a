"""Where a loader error is: the shipped loaders name locations in their messages — "mgbhp-031.yaml criterion
initial-age.met_when.all[0]: …", "query 'observations': …", "routing.yaml payers[0] plan sco.variation: …",
"…/diagnoses.yaml: value set 'dx_mdd': include[0].concepts[3]: …" — this turns those into a file and a path."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fhir_mappings.validation.yamlpos import LocatedDocument, Path

_SEGMENT = re.compile(r"\s*(?:(criterion|plan) ([^\s.\[:]+)|\.?([^\s.\[\]:']+)|\[(\d+)\]|'([^']*)')")


def _resolve(doc: LocatedDocument, text: str, start: Path = ()) -> Path:
    """Walk `text` ("criteria[3].met_when", "criterion x.ask", "payers[0] plan y.when") through the data."""
    path: list[str | int] = list(start)
    node: Any = _get(doc.data, path)
    pos = 0
    while pos < len(text):
        m = _SEGMENT.match(text, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        if m.group(1):
            container = "criteria" if m.group(1) == "criterion" else "plans"
            items = node.get(container) if isinstance(node, Mapping) else None
            index = next(
                (i for i, it in enumerate(items or []) if isinstance(it, Mapping) and str(it.get("id")) == m.group(2)),
                None,
            )
            if index is None:
                break
            path += [container, index]
        elif m.group(4) is not None:
            path.append(int(m.group(4)))
        else:
            key = m.group(3) if m.group(3) is not None else m.group(5)
            if key in ("value", "set") and m.group(5) is None:
                continue  # "value set 'x'"
            path.append(key)
        node = _get(doc.data, path)
        if node is None:
            break
    return tuple(path)


def _get(data: Any, path: list[str | int]) -> Any:
    node = data
    for part in path:
        if (isinstance(node, Mapping) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            node = node[part]
        else:
            return None
    return node


def locate(message: str, docs: Mapping[str, LocatedDocument]) -> tuple[LocatedDocument | None, Path, str]:
    """(document, path, reason) for a loader message; `docs` maps file names (basename) to documents."""
    where, sep, reason = message.partition(": ")
    if not sep:
        return None, (), message
    # "<file>: value set 'x': include[0]...: reason" — the location runs over several ': ' parts
    if " value set '" in message or message.startswith("site config: value set"):
        parts = message.split(": ")
        where, reason = ": ".join(parts[:-1]), parts[-1]
    head, _, rest = where.partition(" ")
    name = head.rsplit("/", 1)[-1].rstrip(":")
    if name in docs:
        doc = docs[name]
        if "value set '" in where:
            m = re.search(r"value set '([^']+)'(?:: (.*))?", where)
            vs = m.group(1) if m else ""
            return doc, _resolve(doc, (m.group(2) or "") if m else "", ("valuesets", vs)), reason
        return doc, _resolve(doc, rest), reason
    if where.startswith("query '") and "queries.yaml" in docs:
        key = where.split("'")[1]
        return docs["queries.yaml"], ("queries", key), reason
    if re.match(r"(resolve_references|limits|queries)\b", where) and "queries.yaml" in docs:
        doc = docs["queries.yaml"]
        return doc, _resolve(doc, where), reason
    if where.startswith("site config") and "<site>" in docs:
        doc = docs["<site>"]
        rest = re.sub(r"^site config(?:uration)?:?\s*", "", where)
        m = re.match(r"value set '([^']+)'(?:: addition\[(\d+)\])?", rest)
        if m:
            return doc, ("valuesets", m.group(1), *((int(m.group(2)),) if m.group(2) else ())), reason
        return doc, _resolve(doc, rest), reason
    if where.startswith("facts read resource types") and "queries.yaml" in docs:
        return docs["queries.yaml"], ("queries",), message
    return None, (), message
