"""Models as files: Hugging Face loading, pruned architectures, ONNX export, fine-tuning, and the
package + predictor that every candidate is served through.

May import ``engines``, ``data``, ``reports`` and ``core``.
"""
