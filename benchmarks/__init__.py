"""Benchmark harnesses (kernels, engine, router, store), the one timing helper and the one result writer."""
