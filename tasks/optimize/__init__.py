"""Optimizing one registered model: building and judging candidates, publishing the winner as
``@challenger``, and ``kiln bench``'s side-by-side comparison.

May import ``compress``, ``evaluate``, ``registry`` and everything below them.
"""
