"""The ``kiln`` command line.

Holds ``app`` (the typer app and the pipeline's own commands), ``promote``, ``rollout``, ``stack`` and
``trigger`` (the command groups ``app`` adds), and ``support`` (``--config``, settings, errors to exit
statuses: 0 ok, 1 internal error, 2 bad input, 3 a decision said no). May import anything in Kiln; nothing
in Kiln imports it, and only ``kiln/__main__.py`` and the console script import ``kiln.cli.app``.
Commands import the heavy modules (MLflow, Prefect, torch) inside their bodies so ``--help`` stays fast.
"""
