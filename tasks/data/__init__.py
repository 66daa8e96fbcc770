"""Datasets (the shipped tweets or a user's CSV, split and digested) and their Great Expectations checks.

May import ``kiln.tasks.core`` only.
"""
