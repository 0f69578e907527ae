"""RFC 8785 JSON Canonicalization Scheme (JCS) for the JSON values audit records hold.

A record's bytes are hashed into the Merkle tree, so one value must have exactly one encoding:
object members sorted by their UTF-16 code units, no whitespace, strings escaped minimally (only
``"``, ``\\`` and control characters, with the short forms ``\\b \\t \\n \\f \\r``), numbers written as
ECMAScript writes an IEEE 754 double (shortest round-trip digits; exponent form below 1e-6 and
from 1e21 on), UTF-8 output.

This module never writes a value it cannot represent exactly: NaN and infinities, integers that
are not exact doubles, lone surrogates and non-string keys raise :class:`NotCanonicalizable`
instead of being approximated. It never accepts a document as canonical unless re-encoding it
gives back the very same bytes (:func:`is_canonical`).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson

# Integers beyond 2**53 are not all exact doubles; JSON numbers in JCS are doubles.
_EXACT_INT = 2**53
_SHORT_ESCAPES = {
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
    0x22: '\\"',
    0x5C: "\\\\",
}
_ESCAPES = {
    **{code: f"\\u{code:04x}" for code in range(0x20)},
    **_SHORT_ESCAPES,
}
_TRANSLATION = str.maketrans({chr(code): escape for code, escape in _ESCAPES.items()})


class NotCanonicalizable(ValueError):
    """The value has no exact JSON encoding under RFC 8785."""


class TooLarge(ValueError):
    """The encoding would be longer than the limit; it was abandoned part way."""


class _Parts(list[str]):
    """The output so far, with a running length so a huge value is refused early."""

    def __init__(self, limit: int | None) -> None:
        super().__init__()
        self.limit = limit
        self.length = 0

    def add(self, text: str) -> None:
        self.length += len(text)
        if self.limit is not None and self.length > self.limit:
            raise TooLarge(f"more than {self.limit} bytes")
        self.append(text)


def canonicalize(value: object, *, limit: int | None = None) -> bytes:
    """The RFC 8785 encoding of ``value`` (dict, list/tuple, str, int, float, bool, None).

    With ``limit``, raise :class:`TooLarge` as soon as the output would exceed ``limit`` bytes,
    without building it (a string is measured before it is escaped).
    """
    parts = _Parts(limit)
    _write(value, parts)
    try:
        encoded = "".join(parts).encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate has no UTF-8 form
        raise NotCanonicalizable(f"string with a lone surrogate at {err.start}") from None
    if limit is not None and len(encoded) > limit:
        raise TooLarge(f"{len(encoded)} bytes, more than {limit}")
    return encoded


def canonicalize_record(value: object) -> bytes:
    """:func:`canonicalize` for values whose object keys are all strings (as the audit log
    builds records): the C encoder writes, :func:`canonical_value` confirms the result, and
    whatever it cannot confirm (floats outside Python's and ECMAScript's shared notation, keys
    at or above U+E000, integers beyond 2**53) takes the exact path. About five times faster.
    """
    try:
        encoded = _FAST_ENCODER.encode(value).encode("utf-8")
        canonical_value(encoded)
    except (ValueError, TypeError, RecursionError):
        return canonicalize(value)
    return encoded


def plain_number(number: int | float) -> bool:
    """Whether Python's ``repr`` of ``number`` is already its RFC 8785 form: an integer within
    2**53, or a finite non-integral double between 1e-4 and 1e16 (shortest round-trip digits,
    no exponent: Python and ECMAScript write those alike)."""
    if type(number) is int:
        return -_EXACT_INT <= number <= _EXACT_INT
    if type(number) is not float:
        return False
    text = repr(number)
    return "e" not in text and not text.endswith(".0") and text not in ("nan", "inf", "-inf")


def plain_key(key: str) -> bool:
    """Whether sorting ``key`` by code points agrees with RFC 8785's UTF-16 order: true unless it
    holds a character at or above U+E000 (surrogates included, which have no UTF-8 form)."""
    return key.isascii() or max(key) < "\ue000"


def canonicalize_plain(value: object) -> bytes:
    """:func:`canonicalize` for a value the caller walked: dicts with :func:`plain_key` string
    keys, lists, strings, booleans, None and :func:`plain_number` numbers only. For those orjson
    (keys sorted by code point, only ``"``, ``\\`` and control characters escaped, short forms
    first, plain numbers in the digits Python's ``repr`` and ECMAScript both write) gives exactly
    the RFC 8785 bytes, so no check by parsing is needed; ``tests/audit/test_jcs.py`` holds it to
    :func:`canonicalize`. A lone surrogate raises :class:`NotCanonicalizable`, as in
    :func:`canonicalize`.
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as err:
        raise NotCanonicalizable(f"not encodable: {err}") from None


def format_number(number: float | int) -> str:
    """An IEEE 754 double as ECMAScript's ``Number.prototype.toString`` writes it (RFC 8785 3.2.2.3)."""
    if isinstance(number, bool):
        raise NotCanonicalizable("a boolean is not a number")
    if isinstance(number, int):
        if -_EXACT_INT <= number <= _EXACT_INT:
            return str(number)
        as_float = float(number) if abs(number) < 2**1024 else math.inf
        if as_float != number:
            raise NotCanonicalizable(f"integer {number} is not exactly representable as a double")
        number = as_float
    if not math.isfinite(number):
        raise NotCanonicalizable(f"{number} has no JSON form")
    text = repr(number)
    # Fast path: between 1e-4 and 1e16 Python and ECMAScript write non-integral doubles alike.
    if "e" not in text and not text.endswith(".0"):
        return text
    if number == 0:
        return "0"  # also for -0.0, as ECMAScript does
    sign = "-" if number < 0 else ""
    # repr() gives the shortest digit string that round-trips, the same digits ECMAScript picks.
    _, digits_tuple, exponent = Decimal(repr(abs(number))).as_tuple()
    digits = "".join(map(str, digits_tuple)).rstrip("0")
    assert isinstance(exponent, int)
    # value = 0.d1d2...dk x 10^point: `point` is ECMAScript's n, len(digits) its k.
    point = exponent + len(digits_tuple)
    k = len(digits)
    if k <= point <= 21:
        text = digits + "0" * (point - k)
    elif 0 < point <= 21:
        text = f"{digits[:point]}.{digits[point:]}"
    elif -6 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        exp = point - 1
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if exp >= 0 else '-'}{abs(exp)}"
    return sign + text


def _write(value: object, parts: _Parts) -> None:
    if value is None:
        parts.add("null")
    elif value is True:
        parts.add("true")
    elif value is False:
        parts.add("false")
    elif isinstance(value, str):
        if parts.limit is not None and len(value) > parts.limit:
            raise TooLarge(f"a string of {len(value)} characters, more than {parts.limit} bytes")
        parts.add(_string(value))
    elif isinstance(value, int | float):
        parts.add(format_number(value))
    elif isinstance(value, Mapping):
        parts.add("{")
        keys = list(value)
        for key in keys:
            if not isinstance(key, str):
                raise NotCanonicalizable(f"object key {key!r} is not a string")
        # RFC 8785 3.2.3: members sorted by the UTF-16 code units of their names.
        for index, key in enumerate(sorted(keys, key=_utf16_units)):
            if index:
                parts.add(",")
            parts.add(_string(key))
            parts.add(":")
            _write(value[key], parts)
        parts.add("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        parts.add("[")
        for index, item in enumerate(value):
            if index:
                parts.add(",")
            _write(item, parts)
        parts.add("]")
    else:
        raise NotCanonicalizable(f"a {type(value).__name__} is not a JSON value")


def _utf16_units(key: str) -> bytes:
    # Big-endian UTF-16 bytes compare in the order of the code units they encode. surrogatepass
    # keeps the sort total even for a lone surrogate (rejected later, when encoding to UTF-8).
    return key.encode("utf-16-be", "surrogatepass")


def _string(text: str) -> str:
    return '"' + text.translate(_TRANSLATION) + '"'


def _reject_constant(name: str) -> Any:
    raise NotCanonicalizable(f"{name} has no JSON form")


def _parse_int(text: str) -> int | float:
    # Canonical integers beyond 2**53 are decimal renderings of doubles (e.g. 1e+21's neighbours
    # print as 295147905179352830000): read them back as the double they stand for.
    number = int(text)
    return number if -_EXACT_INT <= number <= _EXACT_INT else float(text)


def parse(document: bytes | str) -> Any:
    """Parse JSON the way canonical documents are read back (NaN and Infinity refused)."""
    return json.loads(document, parse_constant=_reject_constant, parse_int=_parse_int)


# UTF-8 lead bytes of U+E000 and above: only there do UTF-16 and code point order differ.
_HIGH_CHARACTERS = re.compile(rb"[\xee-\xf4]")


def is_canonical(document: bytes) -> bool:
    """Whether ``document`` parses and re-encodes to exactly the same bytes."""
    try:
        canonical_value(document)
    except ValueError:
        return False
    return True


class _Reading(threading.local):
    """Per-thread flag of the shared decoder: whether the fast check can be trusted."""

    exact = False


_reading = _Reading()


def _read_float(token: str) -> float:
    number = float(token)
    text = repr(number)
    if text == token and "e" not in text and not text.endswith(".0"):
        return number  # plain (see plain_number): Python and ECMAScript write it alike
    written = format_number(number)
    if written != token:
        raise NotCanonicalizable(f"{token} is written {written}")
    if written != repr(number):
        _reading.exact = True  # json.dumps would write this double differently
    return number


def _read_int(token: str) -> int | float:
    number = _parse_int(token)
    if isinstance(number, float):
        _reading.exact = True
    return number


# Built once: the verifier checks every record, and building a decoder per call costs more
# than the hooks.
_CHECKING_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_read_float, parse_int=_read_int
)
_FAST_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
)


# orjson writes every JSON value as RFC 8785 does but for three kinds of double (found by
# comparing the two writers on millions of doubles; ``tests/audit/test_jcs.py`` holds the check
# below to the exact encoder): an integral double below 1e16 keeps ".0" (5.0, -0.0; ECMAScript
# writes 5 and 0), doubles from 1e16 to 1e21 take an exponent (1e+16; ECMAScript writes the
# digits), and those from 1e-6 to 1e-5 too (5e-6; ECMAScript writes 0.000005). Documents with
# these byte patterns anywhere (inside a string too) go to the checking reading. A regex with a
# literal start scans a record in under a microsecond.
_ORJSON_INTEGRAL_DOUBLE = re.compile(rb"\.0[,\]}]")
_ORJSON_EXPONENT = re.compile(rb"e(?:\+|-6)")
_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER


def canonical_value(document: bytes) -> Any:
    """The value of ``document``, or :class:`NotCanonicalizable` unless re-encoding it gives
    exactly the same bytes.

    The verifier calls this for every record, so a JSON object takes a fast path first: orjson
    reads it and writes it back (keys sorted by code point, integers within 53 bits); when that
    gives the very same bytes, no character at or above U+E000 occurs (only there do code point
    and UTF-16 order differ) and none of the double forms orjson writes otherwise than RFC 8785
    does occurs, the document is canonical. Anything else (and every other document) is read
    with hooks that check each number token to be in ECMAScript form, and written back by
    ``json.dumps`` or, where a number or character needs it, by :func:`canonicalize`; that
    reading gives the verdict and its message.
    """
    if document[:1] == b"{" and (document.isascii() or not _HIGH_CHARACTERS.search(document)):
        try:
            value = orjson.loads(document)
            if (
                orjson.dumps(value, option=_ORJSON_OPTIONS) == document
                and _ORJSON_INTEGRAL_DOUBLE.search(document) is None
                and _ORJSON_EXPONENT.search(document) is None
            ):
                return value
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            pass  # not canonical or not plain: the checking reading below tells which
    return _checked_value(document)


def _checked_value(document: bytes) -> Any:
    _reading.exact = not document.isascii() and bool(_HIGH_CHARACTERS.search(document))
    try:
        value = _CHECKING_DECODER.decode(document.decode("utf-8"))
        if _reading.exact:
            same = canonicalize(value) == document
        else:
            same = _FAST_ENCODER.encode(value).encode("utf-8") == document
    except NotCanonicalizable:
        raise
    except (ValueError, RecursionError, TypeError) as err:
        raise NotCanonicalizable(f"not JSON: {err}") from None
    if not same:
        raise NotCanonicalizable("not in canonical form (RFC 8785)")
    return value
