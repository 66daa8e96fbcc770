"""Measuring a model and judging it: quality and parity on the test split, latency and memory benchmarks,
and the gate (policy clauses, absolute and relative to the champion, every failed clause spelled out).

May import ``models``, ``engines``, ``data``, ``reports`` and ``core``; never ``registry``.
"""
