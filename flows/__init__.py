"""Prefect flows: thin wiring of the stage functions in ``tasks/``."""
