"""Downstream tasks: datasets, metrics and evaluation, one module per task."""
