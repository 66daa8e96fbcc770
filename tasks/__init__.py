"""Kiln's stage logic: plain functions and small classes, importable and testable without Prefect."""
