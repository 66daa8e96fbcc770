"""Compression: recipes (ordered stages as data) and the techniques they compose.

``recipes`` on top; ``quantization`` (dynamic and static INT8, FP16, weight-only, QAT) may reuse
``distill`` (QAT's teacher loss); ``distill`` may reuse ``prune`` (structural surgery). May import
``evaluate``, ``models``, ``engines``, ``data`` and ``core``; never ``registry`` or anything above.
"""
