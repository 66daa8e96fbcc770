"""A version's life after its gate: promotion (approvals, four-eyes, champion/previous), and retraining
from a pushed commit.

May import ``optimize``, ``registry`` and everything below them.
"""
