"""Evaluation: domain benchmarks and memorization-leakage audits."""
