"""Turns pydantic's validation errors into messages that a policy author can act on.

pydantic says "Input should be a valid integer, unable to parse string as an integer"; an author
needs "expected an integer, got 'many'". Every message says what was expected and what was
written, a misspelt key comes with the closest known key (or the list of known keys), and no
message shows a Python type name. Each explanation also says where to point: at the value, or at
a key (unknown keys, missing keys, declarations that are wrong as a whole).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from gateway.policy.model import IDENTIFIER_PATTERN, NAME_PATTERN, DeclarationError

Loc = tuple[int | str, ...]

_PATTERNS = {
    NAME_PATTERN: "use lowercase letters, digits, '-' and '_', starting with a letter",
    IDENTIFIER_PATTERN: "use lowercase letters, digits and '_', starting with a letter",
}


@dataclass(frozen=True)
class Explanation:
    """One problem of a declaration: the message and where it is best shown."""

    message: str
    loc: Loc
    at_key: bool = False


def shown(value: Any) -> str:
    """A written value as an author would recognise it in the file."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        simple = all(v is None or isinstance(v, str | int | float | Decimal) for v in value)
        if simple and len(value) <= 5:
            return f"[{', '.join(str(v) for v in value)}]"
        return "a list"
    if isinstance(value, str):
        return f"'{value}'" if len(value) <= 40 else f"'{value[:37]}...'"
    return str(value)


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known word, or nothing."""
    known = sorted(known)
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    # A shortened name ('max_rows' for 'max_rows_per_person') is too short for difflib.
    close += [k for k in known if len(word) >= 3 and (k.startswith(word) or word.startswith(k))]
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(word: str, known: Iterable[str]) -> str:
    """A suggestion for a misspelt name, else the list of names it could be."""
    known = list(known)
    return did_you_mean(word, known) or f" (expected one of: {', '.join(known)})"


def path_text(loc: Loc) -> str:
    """``.columns.hours.bounds``, ``.purposes[0]``: the place inside a declaration."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def _unwrap(annotation: Any) -> Any:
    """The type inside ``Annotated[...]`` and ``X | None``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            present = [a for a in get_args(annotation) if a is not type(None)]
            if len(present) != 1:
                return annotation
            annotation = present[0]
        else:
            return annotation


def keys_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys that the mapping at ``loc`` inside a ``model`` declaration may have."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif get_origin(annotation) in (list, tuple):
            annotation = get_args(annotation)[0]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _is_number_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return Decimal(value).is_finite()
    except InvalidOperation:
        return False


def _expected_integer(given: Any) -> str:
    if _is_number_text(given) and Decimal(given) == Decimal(given).to_integral_value():
        return f"expected an integer, got the text {shown(given)}; remove the quotes"
    return f"expected an integer, got {shown(given)}"


def _expected_text(given: Any) -> str:
    if isinstance(given, bool | int | float | Decimal):
        return f"expected text, got {shown(given)}; quote it: '{shown(given)}'"
    return f"expected text, got {shown(given)}"


def _limit(kind: str, ctx: dict[str, Any], given: Any) -> str | None:
    """Messages for out-of-range values, or None if ``kind`` is not a range error."""
    texts = {
        "greater_than": ("gt", "must be greater than {}"),
        "greater_than_equal": ("ge", "must be at least {}"),
        "less_than": ("lt", "must be less than {}"),
        "less_than_equal": ("le", "must be at most {}"),
        "decimal_max_digits": ("max_digits", "has too many digits (at most {})"),
        "decimal_max_places": (
            "decimal_places",
            "has too many digits after the point (at most {})",
        ),
        "decimal_whole_digits": (
            "whole_digits",
            "is too large (at most {} digits before the point)",
        ),
        "string_too_long": ("max_length", "is longer than {} characters"),
    }
    if kind not in texts:
        return None
    key, text = texts[kind]
    return f"{text.format(ctx[key])}, got {shown(given)}"


def _text(error: ErrorDetails, model: type[BaseModel]) -> str:
    """What is wrong, without the declaration's name or path."""
    kind, given, loc = error["type"], error["input"], error["loc"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    limit = _limit(kind, ctx, given)
    if limit is not None:
        return limit
    if kind == "extra_forbidden":
        return f"unknown key '{loc[-1]}'{unknown(str(loc[-1]), keys_at(model, loc[:-1]))}"
    # Bounds are the only fixed-length list of the model.
    if (kind == "missing" and isinstance(loc[-1], int)) or kind == "tuple_type":
        return f"expected two numbers [lower, upper], got {shown(given)}"
    if kind == "too_long" and ctx.get("field_type") == "Tuple":
        return f"expected two numbers [lower, upper], got {ctx['actual_length']} items"
    if kind == "missing":
        return f"missing required key '{loc[-1]}'"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return _expected_integer(given)
    if kind in ("decimal_type", "decimal_parsing", "float_type", "float_parsing"):
        return f"expected a number, got {shown(given)}"
    if kind == "finite_number":
        return f"expected a finite number, got {shown(given)}"
    if kind == "string_type":
        return _expected_text(given)
    if kind == "string_pattern_mismatch":
        rule = _PATTERNS.get(ctx["pattern"], f"it must match {ctx['pattern']}")
        return f"{shown(given)} is not a valid name: {rule}"
    if kind == "list_type":
        return f"expected a list such as [a, b], got {shown(given)}"
    if kind == "too_short":
        if ctx["min_length"] == 1:
            return "must not be empty"
        return f"needs at least {ctx['min_length']} items, got {ctx['actual_length']}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping (key: value), got {shown(given)}"
    if kind == "literal_error":
        return f"expected {ctx['expected']}, got {shown(given)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {shown(given)}"
    if kind == "value_error":
        return str(ctx["error"])
    return error["msg"]


def explain(error: ErrorDetails, model: type[BaseModel], subject: str) -> Explanation:
    """The message for one pydantic error in the declaration ``subject`` (e.g. "rule 'x'")."""
    kind, loc = error["type"], tuple(error["loc"])
    text = _text(error, model)
    if kind == "extra_forbidden":
        return Explanation(f"{subject}{path_text(loc[:-1])}: {text}", loc, at_key=True)
    if kind == "missing" and isinstance(loc[-1], str):
        return Explanation(f"{subject}{path_text(loc[:-1])}: {text}", loc[:-1], at_key=True)
    if kind == "missing":  # an item of a fixed-length list
        return Explanation(f"{subject}{path_text(loc[:-1])}: {text}", loc[:-1])
    if "[key]" in loc:  # a mapping key itself is wrong; its place is the mapping's
        inside = loc[: loc.index("[key]") - 1]
        return Explanation(f"{subject}{path_text(inside)}: {text}", loc)
    if kind == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        at = cause.at if isinstance(cause, DeclarationError) and cause.at else None
        return Explanation(
            f"{subject}{path_text(loc)}: {text}", (*loc, at) if at else loc, at_key=True
        )
    return Explanation(f"{subject}{path_text(loc)}: {text}", loc)
