"""Kiln: registered model in, smaller, faster, verified engine out."""

__version__ = "0.1.0"
