"""Benchmarks: each prints its figures next to a naive reference computed in the same run."""
