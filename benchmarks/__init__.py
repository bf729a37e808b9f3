"""Benchmarks of torchjd (run with `make bench`). Not tests: they measure, they do not assert."""
