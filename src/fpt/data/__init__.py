"""Datasets, image decoding, the two views and synthetic demo data."""
