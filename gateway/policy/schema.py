"""JSON Schemas of the bundle file format and of policy test files, from the pydantic models.

Editors with a YAML language server complete and check keys with them, e.g. with a first line
``# yaml-language-server: $schema=bundle.schema.json``. The schemas are generated from the same
models the loader validates with, so they cannot drift from what ``policy check`` accepts; cross
references (a rule naming an undeclared dataset) are still only checked by ``policy check``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.policy.cases import CaseFile
from gateway.policy.model import Consumer, Dataset, KeySet, Name, Population, Rule

_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class BundleFile(BaseModel):
    """One YAML file of a policy bundle: any of the sections, each a mapping of named entries."""

    model_config = ConfigDict(extra="forbid", title="Silogate policy bundle file")

    populations: dict[Name, Population] = Field(
        default_factory=dict, description="Sets of persons and their total budgets."
    )
    key_sets: dict[Name, KeySet] = Field(
        default_factory=dict, description="Public group keys, inline or from a CSV file."
    )
    datasets: dict[str, Dataset] = Field(
        default_factory=dict, description="Tables named '<silo>.<table>' with typed columns."
    )
    consumers: dict[Name, Consumer] = Field(
        default_factory=dict, description="Department systems by certificate identity."
    )
    rules: dict[Name, Rule] = Field(
        default_factory=dict, description="permit / forbid rules; default deny."
    )


def _with_dialect(schema: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": _SCHEMA_DIALECT, **schema}


def bundle_schema() -> dict[str, Any]:
    """The JSON Schema of one bundle file."""
    return _with_dialect(BundleFile.model_json_schema())


def tests_schema() -> dict[str, Any]:
    """The JSON Schema of one policy test file (``tests/*.yaml``)."""
    return _with_dialect(CaseFile.model_json_schema())
