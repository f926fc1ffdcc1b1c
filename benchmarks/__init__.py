"""Benchmarks: scripts that print figures; results are recorded under benchmarks/results/."""
