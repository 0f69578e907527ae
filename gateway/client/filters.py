"""Filters written as text on the command line: ``birth_year<=1966``, ``sex in F,M``.

Literals are typed by their spelling: ``true``/``false`` are booleans, ``YYYY-MM-DD`` a date,
digits an integer, a decimal number a decimal, anything else a string.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal, InvalidOperation

from gateway.api.v1 import query_pb2
from gateway.client.client import where

_PATTERN = re.compile(
    r"^\s*(?P<column>[a-z][a-z0-9_]*)\s*"
    r"(?P<op><=|>=|!=|=|<|>|\s+in\s+|\s+between\s+|\s+is\s+null)\s*(?P<rest>.*?)\s*$",
    re.IGNORECASE,
)


def typed_literal(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return dt.date.fromisoformat(text)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d+", text):
        try:
            return Decimal(text)
        except InvalidOperation:
            pass
    return text


def parse_where(text: str) -> query_pb2.Filter:
    match = _PATTERN.match(text)
    if match is None:
        raise ValueError(
            f"cannot read filter {text!r}; write e.g. 'birth_year<=1966' or 'sex in F,M'"
        )
    column, op, rest = match["column"], " ".join(match["op"].lower().split()), match["rest"]
    if op == "is null":
        return where(column, op)
    if op in ("in", "between"):
        return where(column, op, *(typed_literal(v.strip()) for v in rest.split(",")))
    return where(column, op, typed_literal(rest))
