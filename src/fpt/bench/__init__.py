"""Benchmarks: training-memory meters and comparisons, the same harness for every method."""
