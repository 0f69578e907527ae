"""The policy model: what a bundle declares, as immutable pydantic models.

Unknown keys are errors (``extra="forbid"``) so that a misspelt setting never silently fails to
apply. Budget amounts are ``Decimal`` as written and become exact ``Fraction`` rho; never floats.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.errors import SourcePosition

Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_\-]*$", max_length=64)]
Period = Literal["lifetime", "day", "month", "quarter", "year"]
ColumnType = Literal["category", "int", "decimal", "bool", "date"]
MeasureName = Literal["count", "count_persons", "sum", "mean", "histogram"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetSpec(_Strict):
    """A privacy budget written as epsilon (pure DP) or rho (zCDP), with a delta and a period."""

    epsilon: Annotated[Decimal, Field(gt=0)] | None = None
    rho: Annotated[Decimal, Field(gt=0)] | None = None
    delta: Annotated[Decimal, Field(ge=0, lt=1)] = Decimal(0)
    period: Period = "lifetime"

    @model_validator(mode="after")
    def _one_amount(self) -> BudgetSpec:
        if (self.epsilon is None) == (self.rho is None):
            raise ValueError("give exactly one of 'epsilon' or 'rho'")
        return self

    @property
    def rho_total(self) -> Fraction:
        """The budget in rho, exactly: epsilon-DP implies (epsilon^2 / 2)-zCDP."""
        if self.rho is not None:
            return Fraction(self.rho)
        assert self.epsilon is not None
        return Fraction(self.epsilon) ** 2 / 2


class Population(_Strict):
    """A set of persons (the privacy unit) shared by datasets across silos."""

    description: str = ""
    budget: BudgetSpec


class KeySet(_Strict):
    """Public group keys, inline or from a CSV file (column ``key``) relative to the bundle."""

    description: str = ""
    values: list[str] | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> KeySet:
        if (self.values is None) == (self.file is None):
            raise ValueError("give exactly one of 'values' or 'file'")
        return self


class Column(_Strict):
    """A typed column of a dataset."""

    type: ColumnType
    key_set: Name | None = None
    bounds: tuple[Decimal, Decimal] | None = None
    resolution: Annotated[Decimal, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _typed(self) -> Column:
        if self.type == "category" and self.key_set is None:
            raise ValueError("a category column needs a 'key_set'")
        if self.type != "category" and self.key_set is not None:
            raise ValueError("only category columns take a 'key_set'")
        if self.bounds is not None and self.bounds[0] > self.bounds[1]:
            raise ValueError("bounds must be [lower, upper] with lower <= upper")
        return self


class Dataset(_Strict):
    """A table in a silo, with its privacy unit and contribution bounds."""

    description: str = ""
    silo: Name
    table: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    population: Name
    privacy_unit: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")] = "person_key"
    max_rows_per_person: Annotated[int, Field(ge=1, le=10_000)] = 1
    max_groups_per_person: Annotated[int, Field(ge=1, le=10_000)] | None = None
    columns: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], Column]


class Consumer(_Strict):
    """A department system, identified by its certificate identity (URI SAN)."""

    description: str = ""
    identity: str
    purposes: list[Name] = Field(min_length=1)


class Rule(_Strict):
    """A permit or forbid rule. Lists of names accept shell-style patterns (``civil.*``)."""

    description: str = ""
    effect: Literal["permit", "forbid"]
    consumers: list[str] = Field(min_length=1)
    datasets: list[str] = Field(min_length=1)
    measures: list[MeasureName] = Field(default_factory=list)
    group_by: list[str] = Field(default_factory=list)
    filterable: list[str] = Field(default_factory=list)
    purposes: list[Name] = Field(default_factory=list)
    max_epsilon_per_query: Annotated[Decimal, Field(gt=0)] | None = None
    budget: BudgetSpec | None = None
    min_group_size: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _permit_has_budget(self) -> Rule:
        if self.effect == "permit" and self.budget is None:
            raise ValueError("a permit rule needs a 'budget'")
        if self.effect == "permit" and not self.measures:
            raise ValueError("a permit rule needs 'measures'")
        return self

    def applies_to_consumer(self, consumer: str) -> bool:
        return any(fnmatch.fnmatchcase(consumer, p) for p in self.consumers)

    def applies_to_dataset(self, dataset: str) -> bool:
        return any(fnmatch.fnmatchcase(dataset, p) for p in self.datasets)


@dataclass(frozen=True)
class Bundle:
    """A loaded, validated policy bundle. ``version`` is the SHA-256 of its manifest."""

    version: str
    populations: dict[str, Population]
    key_sets: dict[str, tuple[str, ...]]
    datasets: dict[str, Dataset]
    consumers: dict[str, Consumer]
    rules: dict[str, Rule]
    # Where each declaration is written, keyed "<section>/<name>" (e.g. "rules/grid-casework"),
    # for warnings and explanations that point into the files.
    sources: dict[str, SourcePosition] = field(default_factory=dict)

    def consumer_for_identity(self, identities: tuple[str, ...]) -> str | None:
        """The consumer whose certificate identity is among the peer's identities."""
        for name, consumer in self.consumers.items():
            if consumer.identity in identities:
                return name
        return None

    def datasets_of_silo(self, silo: str) -> dict[str, Dataset]:
        return {name: d for name, d in self.datasets.items() if d.silo == silo}
