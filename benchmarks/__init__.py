"""Benchmarks and the independent literal reference implementation of CLASP."""
