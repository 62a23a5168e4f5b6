"""Metrics (numpy only), reference-vs-backend comparison, reports and benchmarks."""
