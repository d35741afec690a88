"""Datasets: the embedded demo set (and, later, the Aesthetic-4K builder and grain pipeline)."""
