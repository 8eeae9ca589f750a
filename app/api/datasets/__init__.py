"""Datasets: the built-in catalog and uploaded datasets."""
