"""Benchmarks of the agent against the raw stack, run on the same machine in the same run.

Every figure is reported as a ratio against a raw-stack reference measured in the same run
(shared/DESIGN.md §4): absolute times on a shared machine drift, ratios much less. See
docs/benchmarks.md.
"""
