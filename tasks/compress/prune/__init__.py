"""Pruning stages (``stages``: heads, FFN width, layers, unstructured), importance scores (``scores``),
the structural surgery that removes what was scored away (``surgery``), and vocabulary pruning (``vocab``).
"""
