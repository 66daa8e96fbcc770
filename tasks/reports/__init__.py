"""Pure renderers of dicts: terminal tables, the HTML review page, plots. They read no registry and run
no model.

May import ``kiln.tasks.core`` only.
"""
