"""Benchmarks (``make bench``). Each prints its figures as ratios against a baseline measured in
the same run on the same machine, never as absolute pass/fail timings."""
