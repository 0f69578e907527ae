"""The people of the synthetic city: who lives where, how old they are, and how they live.

The city-wide profile (how big each community is, how old, how poor) is drawn once per seed; people
are drawn chunk by chunk from that profile so that ten million of them fit in memory. Every
department builder (``gateway.demo.departments``) starts from the same :class:`Population` chunk,
which is what makes the silos agree about a person: the same ``person_key`` with the same community,
age and sex everywhere. Nothing here may draw from an unseeded source; determinism for a seed is
part of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from gateway.demo.geography import COMMUNITIES, COMMUNITIES_PER_STREET, STREETS_PER_DISTRICT

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

REFERENCE_YEAR = 2026
MAX_AGE = 100
# From this age a resident in a one-person household is flagged as living alone.
ELDERLY_AGE = 60
# Dated records (activities, payments, visits, cases) fall in this window; extracted 2026-11-01.
PERIOD_START = np.datetime64("2025-01-01", "D")
PERIOD_END = np.datetime64("2026-10-31", "D")
EPOCH_DAY_START = int(PERIOD_START.astype(np.int64))
EPOCH_DAY_END = int(PERIOD_END.astype(np.int64))

COMMUNITY_STREET: Ints = np.arange(len(COMMUNITIES), dtype=np.int64) // COMMUNITIES_PER_STREET
COMMUNITY_DISTRICT: Ints = COMMUNITY_STREET // STREETS_PER_DISTRICT

# Relative population of each 5-year age band (0-4 ... 95-99) of an ageing city: a baby-boom bulge
# in the fifties and sixties, small recent birth cohorts, about a quarter of people aged 60 or more.
_BAND_WEIGHTS = np.array(
    [
        [3.6, 4.6, 5.2, 4.9, 5.4, 6.4, 8.4, 8.6, 7.4, 7.6],  # ages 0-49
        [8.4, 8.2, 6.8, 6.4, 5.2, 3.4, 2.2, 1.2, 0.45, 0.1],  # ages 50-99
    ]
).ravel()
_AGES = np.arange(MAX_AGE + 1, dtype=np.float64)
# Interpolating between band midpoints avoids a step at every fifth birthday; nobody is over 100.
BASE_AGE_WEIGHTS: Floats = np.interp(
    _AGES,
    np.append(np.arange(2.0, 100.0, 5.0), float(MAX_AGE)),
    np.append(_BAND_WEIGHTS, 0.01),
)

# Household size (1..8) by age class; single-person households are common among the oldest, which is
# what gives 10-15% of people aged 60+ the lives-alone flag.
_AGE_CLASS_LIMITS = np.array([18, 60, 70, 80])
_HOUSEHOLD_SIZE_WEIGHTS = np.array(
    [
        [0.00, 0.16, 0.52, 0.21, 0.07, 0.030, 0.007, 0.003],  # under 18
        [0.22, 0.35, 0.23, 0.11, 0.055, 0.025, 0.007, 0.003],  # 18-59
        [0.09, 0.62, 0.13, 0.08, 0.05, 0.020, 0.007, 0.003],  # 60-69
        [0.14, 0.57, 0.12, 0.07, 0.05, 0.030, 0.015, 0.005],  # 70-79
        [0.22, 0.45, 0.12, 0.09, 0.06, 0.040, 0.015, 0.005],  # 80+
    ]
)


def cumulative(weights: Floats) -> Floats:
    """Row-wise CDFs of unnormalised weights, the last entry exactly 1 (for inverse sampling)."""
    cdf = np.cumsum(weights, axis=-1)
    cdf /= cdf[..., -1:]
    cdf[..., -1] = 1.0
    return cdf


def categorical_by_group(groups: Ints, cdfs: Floats, uniforms: Floats) -> Ints:
    """Inverse-CDF draws where draw ``i`` follows row ``groups[i]`` of ``cdfs``.

    One ``searchsorted`` per group keeps memory linear in the number of draws; gathering a CDF row
    per draw would need draws x categories floats.
    """
    drawn = np.empty(len(groups), dtype=np.int64)
    order = np.argsort(groups, kind="stable")
    stops = np.cumsum(np.bincount(groups, minlength=len(cdfs)))
    start = 0
    for group, stop in enumerate(stops.tolist()):
        members = order[start:stop]
        drawn[members] = np.searchsorted(cdfs[group], uniforms[members], side="right")
        start = stop
    return drawn


def categorical(rng: np.random.Generator, weights: Floats, size: int) -> Ints:
    """``size`` draws of category indices with probabilities proportional to ``weights``."""
    return np.searchsorted(cumulative(weights), rng.random(size), side="right")


def uniform_days(rng: np.random.Generator, size: int) -> Ints:
    """Days since 1970-01-01, uniform over the record period."""
    return rng.integers(EPOCH_DAY_START, EPOCH_DAY_END, size=size, endpoint=True)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _splitmix64(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The splitmix64 finaliser: a bijection on 64-bit integers with good avalanche."""
    mixed = values ^ (values >> np.uint64(30))
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    mixed ^= mixed >> np.uint64(27)
    mixed *= np.uint64(0x94D049BB133111EB)
    mixed ^= mixed >> np.uint64(31)
    return mixed


def person_keys(seed: int, first: int, count: int) -> Any:
    """The ``person_key`` (16 lowercase hex digits) of people ``first`` to ``first + count - 1``.

    A keyed bijection of the person index: an odd multiplier plus a seed-derived salt, then
    splitmix64. Being a bijection, it never gives two people of one city the same key, so no
    collision check is needed. It is a stand-in for the keyed hash of a national ID that real silos
    would share. Returns a pyarrow ``string`` array.
    """
    salt = _splitmix64(np.array([seed], dtype=np.uint64))
    indices = np.arange(first, first + count, dtype=np.uint64)
    mixed = _splitmix64(indices * _GOLDEN + salt)
    octets = mixed.astype(">u8").view(np.uint8).reshape(count, 8)
    text = np.empty((count, 16), dtype=np.uint8)
    text[:, 0::2] = _HEX_DIGITS[octets >> 4]
    text[:, 1::2] = _HEX_DIGITS[octets & 0x0F]
    # 32-bit offsets limit one call to 134 million keys, far above a chunk.
    offsets = np.arange(0, 16 * (count + 1), 16, dtype=np.int32)
    return pa.StringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(text))


@dataclass(frozen=True)
class CityProfile:
    """City-wide traits drawn once per seed, shared by every chunk of people."""

    community_share: Floats
    """Share of the population living in each community (sums to 1); sizes vary several-fold."""
    community_age_cdf: Floats
    """Per community, the CDF of age 0..100: some communities are much older than others."""
    age_distribution: Floats
    """The expected city-wide distribution of age 0..100 (the mixture of the community pyramids)."""
    community_low_income: Floats
    """Per community, a factor (mean about 1) on the chance of being low-income."""
    street_activity: Floats
    """Per street, a factor (mean about 1) on how many activities its party branch organises."""


def make_city_profile(rng: np.random.Generator) -> CityProfile:
    """Draw the seed-dependent traits of the city."""
    community_count = len(COMMUNITIES)
    size = rng.lognormal(0.0, 0.45, community_count)
    community_share = size / size.sum()
    # Tilting the pyramid by exp(ageing * (age - 40) / 40) makes old and young neighbourhoods.
    ageing = rng.normal(0.0, 0.35, community_count)
    age_weights = BASE_AGE_WEIGHTS * np.exp(np.outer(ageing, (_AGES - 40.0) / 40.0))
    age_weights /= age_weights.sum(axis=1, keepdims=True)
    # lognormal(-s^2/2, s) has mean 1, so the city-wide rates stay at their targets.
    low_income = rng.lognormal(-0.08, 0.4, community_count)
    street_count = community_count // COMMUNITIES_PER_STREET
    street_activity = rng.lognormal(-0.045, 0.3, street_count)
    return CityProfile(
        community_share=community_share,
        community_age_cdf=cumulative(age_weights),
        age_distribution=community_share @ age_weights,
        community_low_income=low_income,
        street_activity=street_activity,
    )


@dataclass(frozen=True)
class Population:
    """One chunk of people: consecutive person indices, one array entry per person.

    Categorical attributes are indices into the geography vocabularies (``COMMUNITIES``, ``SEXES``).
    """

    city: CityProfile
    first_index: int
    person_key: Any
    """pyarrow ``string`` array of pseudonymous keys."""
    community: Ints
    street: Ints
    district: Ints
    birth_year: Ints
    age: Ints
    sex: Ints
    household_size: Ints
    low_income: Bools
    disability: Bools
    lives_alone_elderly: Bools

    @property
    def size(self) -> int:
        """The number of people in the chunk."""
        return len(self.community)


def make_population(
    city: CityProfile,
    rng: np.random.Generator,
    *,
    seed: int,
    first_index: int,
    count: int,
    one_per_community: bool,
) -> Population:
    """Draw ``count`` people with indices from ``first_index``.

    ``one_per_community`` places one person in every community before drawing the rest (the first
    chunk does this), so that no community is ever empty, however small the city.
    """
    floor = 1 if one_per_community else 0
    per_community = rng.multinomial(count - floor * len(COMMUNITIES), city.community_share) + floor
    # People come out grouped by community; the keys are hashed, so this order reveals nothing.
    community = np.repeat(np.arange(len(COMMUNITIES), dtype=np.int64), per_community)
    age = categorical_by_group(community, city.community_age_cdf, rng.random(count))
    # Slightly more boys are born; women outlive men, so the oldest ages are mostly women.
    female_share = 0.485 + 0.15 * np.clip((age - 60.0) / 40.0, 0.0, 1.0)
    sex = (rng.random(count) >= female_share).astype(np.int64)
    age_class = np.searchsorted(_AGE_CLASS_LIMITS, age, side="right")
    household_size = 1 + categorical_by_group(
        age_class, cumulative(_HOUSEHOLD_SIZE_WEIGHTS), rng.random(count)
    )
    lives_alone_elderly = (age >= ELDERLY_AGE) & (household_size == 1)
    disability_chance = 0.01 + 0.19 * np.clip((age - 30.0) / 70.0, 0.0, 1.0) ** 1.5
    disability = rng.random(count) < disability_chance
    low_income_chance = (
        0.05
        * city.community_low_income[community]
        * np.where(age >= 70, 1.5, 1.0)
        * np.where(disability, 2.2, 1.0)
        * np.where(lives_alone_elderly, 1.3, 1.0)
    )
    low_income = rng.random(count) < low_income_chance
    street = COMMUNITY_STREET[community]
    return Population(
        city=city,
        first_index=first_index,
        person_key=person_keys(seed, first_index, count),
        community=community,
        street=street,
        district=COMMUNITY_DISTRICT[community],
        birth_year=REFERENCE_YEAR - age,
        age=age,
        sex=sex,
        household_size=household_size,
        low_income=low_income,
        disability=disability,
        lives_alone_elderly=lives_alone_elderly,
    )
