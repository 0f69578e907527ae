"""RFC 8785 canonical JSON: the RFC's own examples, and properties of the encoder and checker."""

from __future__ import annotations

import json
import math
import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import jcs
from gateway.audit import log as log_module

# RFC 8785 Appendix B: IEEE 754 doubles (hex) and their canonical text.
NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "text"), NUMBERS)
def test_numbers_are_written_as_ecmascript_writes_them(bits: str, text: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert jcs.format_number(value) == text
    assert jcs.canonicalize([value]) == f"[{text}]".encode()
    assert jcs.is_canonical(f"[{text}]".encode())


def test_the_rfc_example_document() -> None:
    # RFC 8785 section 3.2.2, input and output as printed there.
    document = r"""{
      "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }"""
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    ).encode()
    assert jcs.canonicalize(jcs.parse(document)) == expected
    assert jcs.is_canonical(expected)
    assert not jcs.is_canonical(document.encode())


def test_members_are_sorted_by_utf16_code_units() -> None:
    # RFC 8785 section 3.2.3: an emoji (a surrogate pair) sorts before U+FB33.
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    order = [key for key in jcs.parse(jcs.canonicalize(value))]
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert jcs.is_canonical(jcs.canonicalize(value))


@pytest.mark.parametrize(
    "document",
    [
        b'{"a":1.0}',  # 1 is written without a fraction
        b'{"a":1e-07}',  # Python's exponent, not ECMAScript's
        # Python writes these doubles so: each re-encodes to itself with json.dumps.
        b'{"a":1e-05}',
        b'{"a":[1,-0.0]}',
        b'{"a":1e+16}',
        b'{"a":{"b":1e+20}}',  # ECMAScript: 100000000000000000000
        b'{"a":9007199254740993}',  # not a double
        b'{"a":-12345678901234567890}',  # the double is written -12345678901234567000
        b'{"a":-0}',
        # orjson writes these doubles so (the fast check must not take its own word for them):
        b'{"a":5e-6}',  # ECMAScript: 0.000005
        b'{"a":[2.0]}',
        b'{"a":{"b":-0.0}}',
        b'{"a":1.5e+20}',
        b'{"b":1,"a":2}',  # unsorted
        b'{"a":1,"a":1}',  # duplicate member
        b'{"a": 1}',  # whitespace
        b'{"a":"\\u0041"}',  # an escape where the character itself is required
        b'{"a":"\\/"}',
        b'{"a":NaN}',
        b'{"a":"\xff"}',  # not UTF-8
        b'\xef\xbb\xbf{"a":1}',  # a byte order mark
        b'{"a":"\\ud800"}',  # a lone surrogate
    ],
)
def test_non_canonical_documents_are_refused(document: bytes) -> None:
    assert not jcs.is_canonical(document)


@pytest.mark.parametrize(
    "document",
    [
        b'{"a":0.00001}',  # ECMAScript's form, Python's repr differs (1e-05)
        b'{"a":1e+21}',
        b'{"a":10000000000000000}',  # 1e16
        b'{"a":-12345678901234567000}',
        b'{"a":[9007199254740992,-9007199254740992,1.5,-0.25]}',
    ],
)
def test_canonical_numbers_python_writes_otherwise_are_accepted(document: bytes) -> None:
    assert jcs.canonical_value(document) == jcs.parse(document)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 2**53 + 1, b"bytes", {1: "a"}])
def test_values_without_an_exact_json_form_are_refused(value: object) -> None:
    with pytest.raises(jcs.NotCanonicalizable):
        jcs.canonicalize({"v": value})


def test_the_limit_stops_a_huge_value_before_it_is_built() -> None:
    chunk = "x" * (1 << 20)
    gigabyte = [chunk] * 1024  # 1 GiB of text, 1 MiB of memory
    with pytest.raises(jcs.TooLarge):
        jcs.canonicalize({"values": gigabyte}, limit=1 << 20)
    with pytest.raises(jcs.TooLarge):
        jcs.canonicalize({"one": "y" * (2 << 20)}, limit=1 << 20)
    assert len(jcs.canonicalize({"v": chunk}, limit=2 << 20)) == len(chunk) + 8


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=20,
)


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_form_is_a_fixed_point_and_the_fast_check_agrees(value: object) -> None:
    try:
        encoded = jcs.canonicalize(value)
    except jcs.NotCanonicalizable:
        # Only lone surrogates (st.text draws them) have no UTF-8 form.
        assert _has_lone_surrogate(value)
        return
    assert jcs.is_canonical(encoded)
    assert jcs.canonicalize(jcs.parse(encoded)) == encoded
    # Re-encoding by the exact path gives the same bytes the fast path accepted.
    assert jcs.canonical_value(encoded) == jcs.parse(encoded)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_double_round_trips_through_its_canonical_text(number: float) -> None:
    text = jcs.format_number(number)
    assert float(text) == number or (number == 0 and float(text) == 0)
    assert jcs.is_canonical(f"[{text}]".encode())


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers())
def test_a_plain_number_is_written_as_python_writes_it(number: float) -> None:
    if jcs.plain_number(number):
        assert repr(number) == jcs.format_number(number)


record_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 1e16, 1e21, 1e-7, 123.0, 0.1, 1e-4, 9.999e15, 2.0**53])
    # Where orjson and ECMAScript write doubles differently: 1e-6 up to 1e-5, 1e16 up to 1e21.
    | st.sampled_from([1e-6, 5e-6, 9.99e-6, 1e-5, 1.5e20, 9.9e20, 2**53, -(2**53), 2**53 - 1])
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.text() | st.sampled_from(["\ue000", "\U0001f600", "a\uffff", "\u00e9"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(record_values)
def test_the_writer_walk_admits_only_values_the_fast_encoder_writes_exactly(
    value: object,
) -> None:
    walk = log_module._Walk()
    walked = log_module._jsonable({"v": value}, walk)
    try:
        exact = jcs.canonicalize(walked)
    except jcs.NotCanonicalizable:
        # A lone surrogate, or an integer that is no double (the writer takes the exact path).
        assert _has_lone_surrogate(walked) or not walk.plain
        return
    if walk.plain:
        assert jcs.canonicalize_plain(walked) == exact


def test_a_query_record_takes_the_writer_fast_path() -> None:
    walk = log_module._Walk()
    fields = {"scales": {"aged": 100.00000000000003}, "values": [[[], "aged", 1796, False]]}
    walked = log_module._jsonable({**fields, "cost": {"é": {"epsilon": 0.01}}}, walk)
    assert walk.plain
    assert jcs.canonicalize_plain(walked) == jcs.canonicalize(walked)
    for odd in (1e21, 2.0, 2**60, {"\ue000": 1}):
        walk = log_module._Walk()
        log_module._jsonable({"v": odd}, walk)
        assert not walk.plain, odd


def _written_otherwise(value: object, style: int) -> bytes:
    """``value`` as other JSON writers put it: some of these are canonical, most are not."""
    if style == 0:
        return orjson.dumps(value)  # members in insertion order, floats as orjson writes them
    if style == 1:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    if style == 2:
        return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()  # \\u escapes
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode(
        "utf-8", "surrogatepass"
    )


@settings(max_examples=1000, deadline=None)
@given(record_values, st.integers(min_value=0, max_value=3))
def test_the_check_accepts_exactly_the_documents_the_exact_encoder_reproduces(
    value: object, style: int
) -> None:
    try:
        document = _written_otherwise({"v": value}, style)
    except (TypeError, ValueError):
        return  # no form in this writer (an integer beyond 64 bits, a lone surrogate)
    try:
        reproduced = jcs.canonicalize(jcs.parse(document)) == document
    except (jcs.NotCanonicalizable, ValueError):
        reproduced = False
    assert jcs.is_canonical(document) == reproduced
