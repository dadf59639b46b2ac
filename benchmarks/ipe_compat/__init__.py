"""Helpers for benchmarks/compare_ipe.py: run the reference ``ipe`` package next to pathdb.

``loader`` imports ipe under transformer-lens 3.9, ``translate`` maps ipe nodes to pathdb labels,
``runners`` runs one matched search with each tool, ``compare`` diffs the two path sets.
"""
