"""Kiln's stage logic: plain functions and small classes, importable and testable without Prefect.

One package per concept, layered; a package imports only the packages listed below it (checked by the
``tasks-layers`` import contract in pyproject.toml)::

    rollout      canary judge, statistics, drift checks, the rollout driver and its traffic router
    lifecycle    promotion decisions and approvals, git-push retraining
    optimize     candidates for a registered model, publishing the winner, ``kiln bench``
    compress     recipes and the techniques they compose: quantization, prune, distill
    evaluate | registry    quality, latency, the gate  |  MLflow access, tags, aliases, lock, audit
    models       Hugging Face loading, ONNX export, packages and predictors, fine-tuning
    engines      ONNX Runtime and TensorRT behind one interface, Triton layout
    data | reports         datasets and data checks  |  tables, review page, plots (pure renderers)
    core         the stage shape, the stage cache, the registry vocabulary (tag and alias names)

Nothing here imports Prefect, the flows, the servers in ``infra`` or the CLI.
"""
