"""Synthetic department data (residents, members, patients, cases) for the demo and the tests."""
