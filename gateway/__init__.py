"""Silogate: a privacy-preserving data-sharing gateway (package ``gateway``)."""
