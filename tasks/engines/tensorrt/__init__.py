"""TensorRT backend: build a plan from an ONNX graph, check that it fits this machine, run it on CUDA.

Written against the TensorRT 10.x and 11.x Python API. Precision comes from the ONNX graph itself (FP16
casts, Q/DQ nodes): TensorRT 11 builds only strongly typed networks and has no FP16/INT8 builder flags,
and on 10.x Kiln asks for the same strongly typed mode, so both versions build the same engine from the
same graph.

A plan runs only on the TensorRT version and GPU that built it (unless built version- or
hardware-compatible), so every ``model.plan`` has a sidecar ``model.plan.json`` saying where it was
built; :func:`~kiln.tasks.engines.tensorrt.plan.check_plan_compatible` reads it before TensorRT sees a
byte of the plan.

- ``build``: :class:`TensorRTBuildConfig` (shapes, workspace, compatibility) and :func:`build_engine`;
- ``runtime``: :class:`TensorRTEngine`, the plan run on torch CUDA tensors;
- ``plan``: the plan's sidecar metadata and the checks made against it before and while running;
- ``machine``: importing ``tensorrt`` and CUDA torch when asked, and what this machine has.

``tensorrt`` and a CUDA build of torch are optional: every ``import tensorrt`` is inside a function, so
these modules import, and their plain-Python logic is tested, on a CPU-only machine. They import only
``kiln.errors`` and ``kiln.tasks.engines.base``; load a plan through :func:`kiln.tasks.engines.load_engine`.
"""
