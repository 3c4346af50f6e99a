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

__all__ = ["is_readable", "shape_problems", "warm_up"]

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
def _r4b_modules() -> frozenset[str]:
    """The module names of fhir.resources.R4B (one per resource and data type, lower case), listed once."""
    import pkgutil

    import fhir.resources.R4B as r4b

    return frozenset(info.name for info in pkgutil.iter_modules(r4b.__path__))


@functools.lru_cache(maxsize=512)
def _resource_model(resource_type: str) -> Any:
    """The model class of a resource type, or None when fhir.resources has none (unknown type).

    Bounded: the type comes from the client, so a name that is no R4B module is refused before any import is tried,
    and the cache keeps at most 512 names (every real type fits; random spellings cannot grow it)."""
    if not resource_type.isalpha() or not resource_type[:1].isupper():
        return None
    if resource_type.lower() not in _r4b_modules():
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
    if is_readable(resource):  # the common case: a compiled yes/no walk, no path string built per element
        return []
    return _problems(resource, limit)


def _problems(resource: Any, limit: int) -> list[str]:
    """The detailed walk: every problem with its path, up to `limit` (the reference `is_readable` answers)."""
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
    problems: list[str] = []
    _check_object(resource, model, resource_type, problems, limit)
    return problems


def is_readable(resource: Any) -> bool:
    """`shape_problems(resource) == []`, answered yes or no: what the gatherer asks of every resource."""
    if not isinstance(resource, dict):
        return False
    resource_type = resource.get("resourceType")
    check = _resource_checks.get(resource_type) if type(resource_type) is str else None
    if check is None:
        if not isinstance(resource_type, str):
            return False
        model = _resource_model(resource_type)
        if model is None:
            return False
        check = _checker(model)
        _resource_checks[resource_type] = check
    if "id" in resource and not isinstance(resource["id"], str):
        return False
    return check(resource)


# -- the compiled yes/no walk ---------------------------------------------------------------------------
# One closure per model, built once (at `warm_up`, else on first use), over tables that sort the model's
# elements by the JSON type they accept. The walk dispatches on the type of each value first: a string (most
# values) costs one set lookup. It answers exactly what `_check_object` finds (`tests/mappings/test_shape_fast.py`
# pins it); values of other Python types than the JSON parser makes (subclasses) go to `_check_object` itself.

_Check = typing.Callable[[dict[str, Any]], bool]
_checkers: dict[Any, _Check] = {}  # model -> its walk; only complete ones (built under `_lock`)
_resource_checks: dict[str, _Check] = {}  # resourceType -> the walk of its model


def _checker(model: Any) -> _Check:
    """The yes/no walk of a model: built with every model it reaches, published only when all are complete
    (a half-built walk would judge wrongly in another thread)."""
    check = _checkers.get(model)
    if check is not None:
        return check
    with _lock:
        building: dict[Any, _Check] = {}
        check = _build_checker(model, building)
        _checkers.update(building)
    return check


def _build_checker(model: Any, building: dict[Any, _Check]) -> _Check:
    check = _checkers.get(model) or building.get(model)
    if check is not None:
        return check
    elements = _elements(model)
    known = frozenset(elements)
    # Known elements a value of that JSON type does not fit (an unknown element fits anything).
    not_str = set(known)
    not_bool = set(known)
    not_int = set(known)
    not_float = set(known)
    objects: dict[str, _Check] = {}  # 0..1 complex or resource element -> the walk of its value
    object_lists: dict[str, _Check] = {}  # 0..* complex or resource element -> the walk of each item
    primitive_lists: dict[str, typing.Callable[[list[Any]], bool]] = {}

    def check(value: dict[str, Any]) -> bool:
        for key, item in value.items():
            kind = type(item)
            if kind is str:
                if key in not_str:
                    return False
            elif kind is dict:
                walk = objects.get(key)
                if walk is None:
                    if key in known:
                        return False
                elif not walk(item):
                    return False
            elif kind is list:
                walk = object_lists.get(key)
                if walk is not None:
                    for entry in item:
                        if not isinstance(entry, dict) or not walk(entry):
                            return False
                else:
                    primitives_ok = primitive_lists.get(key)
                    if primitives_ok is None:
                        if key in known:
                            return False
                    elif not primitives_ok(item):
                        return False
            elif kind is bool:
                if key in not_bool:
                    return False
            elif kind is int:
                if key in not_int:
                    return False
            elif kind is float:
                if key in not_float:
                    return False
            elif item is None:
                if key in known:
                    return False
            elif key in known:  # not a type the JSON parser makes: the detailed walk decides
                problems: list[str] = []
                _check_object({key: item}, model, "", problems, 1)
                if problems:
                    return False
        return True

    building[model] = check  # before the elements: models reach themselves (Extension.extension, ...)
    for key, element in elements.items():
        if element.kind in ("complex", _RESOURCE):
            if element.kind == _RESOURCE:
                walk = is_readable
            else:
                walk = _build_checker(_model_of_complex(element.model), building)
            (object_lists if element.is_list else objects)[key] = walk
        elif element.is_list:
            primitive_lists[key] = _PRIMITIVE_LISTS[element.kind]
        else:
            {_STRING: not_str, _BOOLEAN: not_bool, _INTEGER: not_int}.get(element.kind, not_float).discard(key)
            if element.kind == _DECIMAL:
                not_int.discard(key)
    return check


def _strings_ok(items: list[Any]) -> bool:
    """An array of a string type: null entries stand for values given only in `_key` (FHIR JSON)."""
    return all(entry is None or isinstance(entry, str) for entry in items)


def _booleans_ok(items: list[Any]) -> bool:
    return all(entry is None or isinstance(entry, bool) for entry in items)


def _integers_ok(items: list[Any]) -> bool:
    return all(entry is None or (isinstance(entry, int) and not isinstance(entry, bool)) for entry in items)


def _decimals_ok(items: list[Any]) -> bool:
    return all(entry is None or (isinstance(entry, int | float) and not isinstance(entry, bool)) for entry in items)


_PRIMITIVE_LISTS = {_STRING: _strings_ok, _BOOLEAN: _booleans_ok, _INTEGER: _integers_ok, _DECIMAL: _decimals_ok}


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
        inner = _problems(item, limit - len(problems))
        problems.extend(f"{where}: {p}" for p in inner)


def warm_up(resource_types: typing.Iterable[str]) -> None:
    """Load the element definitions of these resource types and of every data type they reach, and compile
    their shape walks, at start-up, so the first request pays for neither importing models nor compiling."""
    for resource_type in resource_types:
        model = _resource_model(resource_type)
        if model is not None:
            _resource_checks[resource_type] = _checker(model)
