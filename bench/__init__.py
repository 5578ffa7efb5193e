"""Benchmarks that write results (JSON + Markdown + plots) under bench/results; never timed asserts."""
