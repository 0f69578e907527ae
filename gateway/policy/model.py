"""The policy model: what a bundle declares, as immutable pydantic models.

Unknown keys are errors (``extra="forbid"``) so that a misspelt setting never silently fails to
apply. Budget amounts are ``Decimal`` as written and become exact ``Fraction`` rho; never floats.
Numbers are limited in digits before anything converts them (``Fraction(Decimal("1e-999999999"))``
alone would build a billion-digit integer), and counts are strict integers (``true`` or ``"3"`` is
a mistake, not 1 or 3). A rule that spans several keys raises :class:`DeclarationError` naming the
key where an author should look, so the loader can point at it.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.errors import SourcePosition

NAME_PATTERN = r"^[a-z][a-z0-9_\-]*$"
IDENTIFIER_PATTERN = r"^[a-z][a-z0-9_]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN, max_length=64)]
# At most 30 digits, 20 of them after the point: enough for any epsilon, delta or bound, and small
# enough that exact arithmetic on them stays cheap.
Number = Annotated[Decimal, Field(max_digits=30, decimal_places=20)]
Amount = Annotated[Decimal, Field(gt=0, max_digits=30, decimal_places=20)]
Count = Annotated[int, Field(strict=True, ge=1, le=10_000)]
Period = Literal["lifetime", "day", "month", "quarter", "year"]
ColumnType = Literal["category", "int", "decimal", "bool", "date"]
MeasureName = Literal["count", "count_persons", "sum", "mean", "histogram"]


class DeclarationError(ValueError):
    """A declaration breaks a rule that spans several keys; ``at`` is the key to point at."""

    def __init__(self, message: str, *, at: str | None = None) -> None:
        super().__init__(message)
        self.at = at


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetSpec(_Strict):
    """A privacy budget written as epsilon (pure DP) or rho (zCDP), with a delta and a period."""

    epsilon: Amount | None = None
    rho: Amount | None = None
    delta: Annotated[Decimal, Field(ge=0, lt=1, max_digits=30, decimal_places=20)] = Decimal(0)
    # The delta that data-dependent group keys may spend in this scope and period, in total
    # (each thresholded release spends its rule's ``key_delta``). 0: none may be released here.
    key_delta: Annotated[Decimal, Field(ge=0, lt=1, max_digits=30, decimal_places=20)] = Decimal(0)
    period: Period = "lifetime"

    @model_validator(mode="after")
    def _one_amount(self) -> BudgetSpec:
        if self.epsilon is not None and self.rho is not None:
            raise DeclarationError("give exactly one of 'epsilon' or 'rho', not both", at="rho")
        if self.epsilon is None and self.rho is None:
            raise DeclarationError("give exactly one of 'epsilon' or 'rho'")
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
        if self.values is not None and self.file is not None:
            raise DeclarationError("give exactly one of 'values' or 'file', not both", at="file")
        if self.values is None and self.file is None:
            raise DeclarationError("give exactly one of 'values' or 'file'")
        return self


class Column(_Strict):
    """A typed column of a dataset."""

    type: ColumnType
    key_set: Name | None = None
    bounds: tuple[Number, Number] | None = None
    resolution: Amount | None = None
    # Default histogram bin edges (strictly increasing; k+1 edges make k bins, the last closed).
    bins: Annotated[list[Number], Field(min_length=2, max_length=1001)] | None = None

    @property
    def open_keys(self) -> bool:
        """A category column without a public key set: its keys exist only in the data, so a
        group-by on it releases keys above a DP threshold (rules must allow it)."""
        return self.type == "category" and self.key_set is None

    @model_validator(mode="after")
    def _typed(self) -> Column:
        if self.type != "category" and self.key_set is not None:
            raise DeclarationError(
                f"only category columns take a 'key_set' (this column is {self.type})",
                at="key_set",
            )
        for numeric_only in ("bounds", "resolution", "bins"):
            if self.type not in ("int", "decimal") and getattr(self, numeric_only) is not None:
                raise DeclarationError(
                    f"only int and decimal columns take '{numeric_only}' "
                    f"(this column is {self.type})",
                    at=numeric_only,
                )
        if self.bins is not None and any(a >= b for a, b in itertools.pairwise(self.bins)):
            raise DeclarationError("bins must be strictly increasing", at="bins")
        if self.bounds is not None and self.bounds[0] > self.bounds[1]:
            lower, upper = self.bounds
            raise DeclarationError(
                f"bounds must be [lower, upper] with lower <= upper, got [{lower}, {upper}]",
                at="bounds",
            )
        return self


class Dataset(_Strict):
    """A table in a silo, with its privacy unit and contribution bounds."""

    description: str = ""
    silo: Name
    table: Identifier
    population: Name
    privacy_unit: Identifier = "person_key"
    max_rows_per_person: Count = 1
    max_groups_per_person: Count | None = None
    columns: dict[Identifier, Column]
    # The silo's own cap on what may be released from this dataset, over all consumers. The silo
    # enforces it with its own ledger; the gateway mirrors it as a budget scope, so a query the
    # silo would refuse is refused before any silo runs.
    silo_budget: BudgetSpec | None = None


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
    # Numeric columns that SUM, MEAN and HISTOGRAM may aggregate (a permit grants none unless
    # listed; a forbid lists the ones it forbids).
    measurable: list[str] = Field(default_factory=list)
    purposes: list[Name] = Field(default_factory=list)
    max_epsilon_per_query: Amount | None = None
    budget: BudgetSpec | None = None
    min_group_size: Annotated[int, Field(strict=True, ge=0, le=1_000_000)] = 0
    # Answer a repeated identical query (same consumer, policy version and budget windows) from
    # the earlier release at no cost. Off only when callers need fresh noise each time.
    cache_answers: Annotated[bool, Field(strict=True)] = True
    # Whether group keys may come from the data (released only above a DP threshold, which needs
    # a delta > 0) instead of a public key set. Off by default: keys reveal who is in the data.
    allow_data_dependent_keys: Annotated[bool, Field(strict=True)] = False
    # The delta each such release spends (the chance a key held by one person is released).
    key_delta: Annotated[Decimal, Field(gt=0, lt=1, max_digits=30, decimal_places=20)] | None = None

    @model_validator(mode="after")
    def _permit_has_budget(self) -> Rule:
        if self.effect == "permit" and self.budget is None:
            raise DeclarationError("a permit rule needs a 'budget'", at="effect")
        if self.effect == "permit" and not self.measures:
            raise DeclarationError("a permit rule needs 'measures'", at="effect")
        if self.allow_data_dependent_keys and self.key_delta is None:
            raise DeclarationError(
                "'allow_data_dependent_keys' needs a 'key_delta' (the delta each release spends)",
                at="allow_data_dependent_keys",
            )
        if self.key_delta is not None and not self.allow_data_dependent_keys:
            raise DeclarationError(
                "'key_delta' is only used with 'allow_data_dependent_keys: true'", at="key_delta"
            )
        if (
            self.key_delta is not None
            and self.budget is not None
            and self.budget.key_delta < self.key_delta
        ):
            raise DeclarationError(
                f"the rule's budget allows key_delta {self.budget.key_delta} in total, less than "
                f"one release's key_delta {self.key_delta}",
                at="key_delta",
            )
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
