"""The internal query form: parsed from the API, validated, canonicalised.

- :mod:`gateway.query.form`: immutable dataclasses, parsing from protobuf, the canonical hash.
- :mod:`gateway.query.validate`: checks a query against the datasets a policy bundle declares.
"""

from gateway.query.form import (
    FilterForm,
    MeasureForm,
    QueryForm,
    Spend,
    parse_query,
)

__all__ = ["FilterForm", "MeasureForm", "QueryForm", "Spend", "parse_query"]
