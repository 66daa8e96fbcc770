"""Prefect flows: thin wiring of the stage functions in ``kiln.tasks``, with typed parameters for the UI.

Flows may import ``kiln.tasks``, settings and errors; never the servers in ``kiln.infra`` (they run as
their own processes) nor the CLI.
"""
