"""Benchmarks: each script measures the real code path and prints JSON (see BENCHMARKS.md)."""
