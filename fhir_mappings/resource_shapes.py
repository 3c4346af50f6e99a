"""The JSON shape of FHIR R4 resources, checked before any fact reads them.

Facts read elements by path: `code.coding[*].system`, `effectiveDateTime`, `valueQuantity.value`, ... A
resource whose elements have the wrong JSON type (a `code` that is a string, a `coding` that is an object,
a date that is a number, a 0..* element sent as a single value) would make a reader raise, or read nothing
and let "nothing found" count as "absent". This pass looks at every element present, against the R4 element
definitions (taken from the `fhir.resources` R4B models, identical to R4 for every type read here), and says
what is wrong, so the gatherer can leave such a resource out as *unreadable* — its query then counts as
partly read and the criteria that depend on it are unknown, never met or "not present".

Only shapes are checked (object / array / string / number / boolean, and which elements are arrays), not
values (code systems, date formats): readers already treat an unparsable value as no value. Unknown
elements are ignored (CRD: "SHALL ignore unexpected elements"), and so are primitive extensions (`_x`).
Messages name the element path and the expected shape, never a value (values may be PHI).
"""

from __future__ import annotations

import datetime as _dt
import decimal
import functools
import importlib
import threading
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["shape_problems", "warm_up"]

MAX_PROBLEMS = 3  # per resource: enough to tell an EHR developer what to fix, bounded output

_STRING, _INTEGER, _DECIMAL, _BOOLEAN, _RESOURCE = "string", "integer", "decimal", "boolean", "resource"
_EXPECTED = {
    _STRING: "a string",
    _INTEGER: "an integer",
    _DECIMAL: "a number",
    _BOOLEAN: "true or false",
    _RESOURCE: "a resource object",
}


@dataclass(frozen=True)
class _Element:
    """One element of a FHIR type: whether R4 makes it an array, and the shape of each value."""

    is_list: bool
    kind: str  # one of the primitive kinds above, _RESOURCE, or "complex"
    model: Any = None  # the fhir.resources class of a complex type, resolved lazily


_lock = threading.Lock()


def _unwrap(annotation: Any) -> tuple[bool, Any]:
    """(is_list, item type) of a model field annotation: Optional[...] / List[...] / Annotated[...] removed."""
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is typing.Union or (origin is not None and type(annotation).__name__ == "UnionType"):
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                return is_list, None  # e.g. fhir_comments: str | List[str]
            annotation = rest[0]
        elif origin in (list, typing.List):  # noqa: UP006 - fhir.resources annotates with typing.List
            is_list = True
            annotation = args[0]
        elif origin is typing.Annotated:
            annotation = args[0]
        elif type(annotation).__name__ == "UnionType":
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return is_list, None
            annotation = rest[0]
        else:
            return is_list, annotation


def _element_of(annotation: Any) -> _Element | None:
    is_list, item = _unwrap(annotation)
    if item is None:
        return None
    if item is bool:
        return _Element(is_list, _BOOLEAN)
    if item is int:
        return _Element(is_list, _INTEGER)
    if item in (float, decimal.Decimal):
        return _Element(is_list, _DECIMAL)
    if item in (str, bytes, _dt.datetime, _dt.date, _dt.time):
        return _Element(is_list, _STRING)
    name = getattr(item, "__name__", "")
    if name in ("ResourceType", "FHIRPrimitiveExtensionType"):
        return _Element(is_list, _RESOURCE) if name == "ResourceType" else None
    get_model = getattr(item, "get_model_klass", None)
    if callable(get_model):
        return _Element(is_list, "complex", item)
    return None


@functools.cache
def _elements(model: Any) -> dict[str, _Element]:
    """JSON name -> element definition of one fhir.resources model class (computed once per class)."""
    elements: dict[str, _Element] = {}
    for name, info in model.model_fields.items():
        alias = info.alias or name
        if alias.startswith("_") or name == "fhir_comments":
            continue  # primitive extensions and comments: not read
        element = _element_of(info.annotation)
        if element is not None:
            elements[alias] = element
    return elements


@functools.cache
def _model_of_complex(type_holder: Any) -> Any:
    return type_holder.get_model_klass()


@functools.cache
def _resource_model(resource_type: str) -> Any:
    """The model class of a resource type, or None when fhir.resources has none (unknown type)."""
    if not resource_type.isalpha() or not resource_type[:1].isupper():
        return None
    try:
        module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    except ImportError:
        return None
    model = getattr(module, resource_type, None)
    return model if hasattr(model, "model_fields") else None


def _shape_ok(value: Any, kind: str) -> bool:
    if kind == _STRING:
        return isinstance(value, str)
    if kind == _BOOLEAN:
        return isinstance(value, bool)
    if kind == _INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _DECIMAL:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, dict)  # complex types and resources


def shape_problems(resource: Any, *, limit: int = MAX_PROBLEMS) -> list[str]:
    """What is wrong with the JSON shape of a resource (at most `limit` problems); [] when it can be read.

    A resource must be an object with a string `resourceType` (of a type R4 defines) and, when present, a
    string `id`; every element present must have the R4 shape.
    """
    if not isinstance(resource, dict):
        return ["not a JSON object"]
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        return ["resourceType: expected a string"]
    model = _resource_model(resource_type)
    if model is None:
        return ["resourceType: not an R4 resource type"]
    if "id" in resource and not isinstance(resource["id"], str):
        return [f"{resource_type}.id: expected a string"]
    if _object_ok(resource, model):  # the common case, without building a path string per element
        return []
    problems: list[str] = []
    _check_object(resource, model, resource_type, problems, limit)
    return problems


_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    _STRING: (str,),
    _BOOLEAN: (bool,),
    _INTEGER: (int,),
    _DECIMAL: (int, float),
}


@functools.cache
def _plan(model: Any) -> dict[str, tuple[bool, tuple[type, ...] | None, Any]]:
    """Per JSON name: (is a list, the Python types a primitive must have or None, the model of a complex element or
    `_RESOURCE` or None) — `_elements` resolved once, so the yes/no walk does no attribute or cache lookups."""
    plan: dict[str, tuple[bool, tuple[type, ...] | None, Any]] = {}
    for key, element in _elements(model).items():
        if element.kind == "complex":
            plan[key] = (element.is_list, None, _model_of_complex(element.model))
        elif element.kind == _RESOURCE:
            plan[key] = (element.is_list, None, _RESOURCE)
        else:
            plan[key] = (element.is_list, _SCALAR_TYPES[element.kind], None)
    return plan


def _object_ok(value: dict[str, Any], model: Any) -> bool:
    """True exactly when `_check_object` would find no problem (the same walk, answering only yes or no)."""
    plan = _plan(model)
    for key, item in value.items():
        step = plan.get(key)
        if step is None:
            continue
        is_list, scalar, inner = step
        if is_list:
            if not isinstance(item, list):
                return False
            for entry in item:
                if entry is None and scalar is not None:
                    continue  # null in a primitive array: its value is in `_key` (FHIR JSON)
                if not _item_ok(entry, scalar, inner):
                    return False
        elif not _item_ok(item, scalar, inner):
            return False
    return True


def _item_ok(item: Any, scalar: tuple[type, ...] | None, inner: Any) -> bool:
    if scalar is not None:  # `_shape_ok` for primitives: bool is no integer or decimal
        return isinstance(item, scalar) and (scalar[0] is bool or not isinstance(item, bool))
    if not isinstance(item, dict):
        return False
    if inner is _RESOURCE:
        return not shape_problems(item)
    return _object_ok(item, inner)


def _check_object(value: dict[str, Any], model: Any, path: str, problems: list[str], limit: int) -> None:
    """Check an object against a model's elements; iterative over arrays, recursive over nested objects
    (nesting is bounded by the JSON depth limit of the input boundary)."""
    elements = _elements(model)
    for key, item in value.items():
        element = elements.get(key)
        if element is None:
            continue
        where = f"{path}.{key}"
        if element.is_list:
            if not isinstance(item, list):
                problems.append(f"{where}: expected an array")
            else:
                for index, entry in enumerate(item):
                    if entry is None and element.kind not in ("complex", _RESOURCE):
                        continue  # null in a primitive array: its value is in `_key` (FHIR JSON)
                    _check_value(entry, element, f"{where}[{index}]", problems, limit)
                    if len(problems) >= limit:
                        return
        else:
            _check_value(item, element, where, problems, limit)
        if len(problems) >= limit:
            return


def _check_value(item: Any, element: _Element, where: str, problems: list[str], limit: int) -> None:
    if not _shape_ok(item, element.kind):
        expected = "an object" if element.kind == "complex" else _EXPECTED[element.kind]
        problems.append(f"{where}: expected {expected}" + (" (a single value, not an array)" * isinstance(item, list)))
        return
    if element.kind == "complex":
        _check_object(item, _model_of_complex(element.model), where, problems, limit)
    elif element.kind == _RESOURCE:
        inner = shape_problems(item, limit=limit - len(problems))
        problems.extend(f"{where}: {p}" for p in inner)


def warm_up(resource_types: typing.Iterable[str]) -> None:
    """Load the element definitions of these resource types and the data types they use, at start-up, so
    the first request does not pay for importing models."""
    with _lock:
        pending = [m for m in (_resource_model(t) for t in resource_types) if m is not None]
        seen: set[Any] = set()
        while pending:
            model = pending.pop()
            if model in seen:
                continue
            seen.add(model)
            for element in _elements(model).values():
                if element.kind == "complex":
                    pending.append(_model_of_complex(element.model))
