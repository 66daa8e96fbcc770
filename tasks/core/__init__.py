"""The ground floor of stage logic: the one stage shape, the resumable stage cache, the registry vocabulary.

Imports nothing else from ``kiln.tasks``.
"""
