"""Quantization stages: dynamic INT8, FP16 and weight-only (``dynamic``), static INT8 with calibration
(``static``), and quantization-aware training (``qat``).
"""
