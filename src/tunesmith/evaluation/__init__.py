"""Evaluation: generation and task metrics."""
