"""The four synthetic silos, one module each, in the order the generator writes them.

- :mod:`.org`: party members and their activities (``org.members``, ``org.activities``)
- :mod:`.civil`: residents and monthly subsidies (``civil.residents``, ``civil.subsidies``)
- :mod:`.health`: chronic-condition registry and home-care visits (``health.chronic``,
  ``health.visits``)
- :mod:`.events`: grid event cases (``events.cases``)

Each module exposes ``DEPARTMENT``; builders only draw from the generator they are given, so adding
a table to one silo never changes the rows of another.
"""

from __future__ import annotations

from gateway.demo._tables import Department
from gateway.demo.departments import civil, events, health, org

DEPARTMENTS: tuple[Department, ...] = (
    org.DEPARTMENT,
    civil.DEPARTMENT,
    health.DEPARTMENT,
    events.DEPARTMENT,
)
